//! The `[kafka]` section: brokers, topics, the consumer group, the event
//! format, and the librdkafka properties a deployment adds (security).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::ConfigError;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port]`.
    pub brokers: String,
    pub events_topic: String,
    pub updates_topic: String,
    /// Where events that fail parsing or validation go, with the reason.
    pub dlq_topic: String,
    /// Partitions given to the events topic when `serve` creates it.
    pub events_partitions: i32,
    /// Replicas of each topic `serve` creates (events, updates, dead
    /// letters); `min.insync.replicas` is set to 2 when this is 3 or more,
    /// so an acknowledged record survives the death of any one broker.
    pub replication_factor: i32,
    pub group_id: String,
    /// Static membership (`group.instance.id`): a restart within the session
    /// timeout keeps its partitions without a rebalance. Empty: off.
    pub group_instance_id: String,
    pub session_timeout_ms: u32,
    /// How training events are encoded: `json`, or `avro` (the Confluent
    /// wire format: magic byte, schema id, Avro body).
    pub event_format: EventFormat,
    /// The Avro writer schema (`.avsc`), for `event_format = "avro"`.
    pub avro_schema: PathBuf,
    /// The one schema id accepted in the framing; absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avro_schema_id: Option<u32>,
    /// librdkafka properties given to every Kafka client the replica and
    /// `tributary produce` make: `security.protocol`, `sasl.mechanisms`,
    /// `sasl.username`, `ssl.ca.location`, ... A value `${env:NAME}` is read
    /// from the environment and `${file:PATH}` from a file (its trailing
    /// newline dropped), so that secrets stay out of the configuration;
    /// values are never logged. The properties tributary sets itself
    /// ([`PROTECTED_CLIENT_PROPERTIES`]) are refused.
    #[serde(default)]
    pub client: BTreeMap<String, String>,
}

/// Client properties tributary sets itself, which `kafka.client` may not
/// override: its guarantees rest on them (docs/operating.md, "Kafka settings").
pub const PROTECTED_CLIENT_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "client.id",
    "group.id",
    "group.instance.id",
    "enable.idempotence",
    "acks",
    "enable.auto.commit",
    "auto.offset.reset",
    "isolation.level",
    "partition.assignment.strategy",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "max.poll.interval.ms",
    "message.max.bytes",
    "message.timeout.ms",
    "fetch.max.bytes",
    "max.partition.fetch.bytes",
    "queued.min.messages",
    "queued.max.messages.kbytes",
    "fetch.queue.backoff.ms",
    "enable.partition.eof",
    "linger.ms",
    "transactional.id",
];

impl KafkaConfig {
    /// `client` with every `${env:NAME}` and `${file:PATH}` value read; an
    /// error names the property and where its value was to come from, never
    /// a value.
    pub fn client_properties(&self) -> Result<Vec<(String, String)>, ConfigError> {
        let bad = |name: &str, reason: String| ConfigError::Invalid(format!("kafka.client.{name}: {reason}"));
        (self.client.iter())
            .map(|(name, value)| {
                if PROTECTED_CLIENT_PROPERTIES.contains(&name.as_str()) {
                    return Err(bad(name, "tributary sets this property itself; it cannot be overridden".into()));
                }
                let resolved = match value.strip_prefix("${").and_then(|v| v.strip_suffix('}')) {
                    None => value.clone(),
                    Some(reference) => match reference.split_once(':') {
                        Some(("env", var)) => std::env::var(var)
                            .map_err(|_| bad(name, format!("the environment variable {var} is not set")))?,
                        Some(("file", path)) => std::fs::read_to_string(path)
                            .map(|text| text.trim_end_matches(['\r', '\n']).to_string())
                            .map_err(|e| bad(name, format!("cannot read {path}: {e}")))?,
                        _ => return Err(bad(name, "a reference is ${env:NAME} or ${file:PATH}".into())),
                    },
                };
                Ok((name.clone(), resolved))
            })
            .collect()
    }

    /// The kafka section's own check.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.client_properties()?;
        let bad = |msg: &str| Err(ConfigError::Invalid(msg.to_string()));
        if self.event_format == EventFormat::Avro && self.avro_schema.as_os_str().is_empty() {
            return bad(
                "kafka.event_format = \"avro\" needs kafka.avro_schema (the writer schema, e.g. config/event.avsc)",
            );
        }
        if self.events_partitions < 1 {
            return bad("kafka.events_partitions must be at least 1");
        }
        if self.replication_factor < 1 {
            return bad("kafka.replication_factor must be at least 1");
        }
        Ok(())
    }
}

impl Default for KafkaConfig {
    fn default() -> KafkaConfig {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            events_topic: "events".into(),
            updates_topic: "updates".into(),
            dlq_topic: "events.dlq".into(),
            events_partitions: 8,
            replication_factor: 1,
            group_id: "tributary".into(),
            group_instance_id: String::new(),
            session_timeout_ms: 6000,
            event_format: EventFormat::Json,
            avro_schema: PathBuf::new(),
            avro_schema_id: None,
            client: BTreeMap::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum EventFormat {
    #[default]
    Json,
    Avro,
}
