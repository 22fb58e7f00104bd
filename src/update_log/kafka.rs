//! Kafka client settings and topic management, shared by the trainer, the
//! applier and `tributary produce`.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

use crate::config::{ConfigError, FeedbackConfig, KafkaConfig};

/// Gradient records of a large model are big; the broker default (1 MB) is not.
pub const MAX_MESSAGE_BYTES: usize = crate::config::MAX_RECORD_BYTES;

/// What one fetch of the update log asks for. A record larger comes whole
/// all the same (the broker returns a fetch's first batch whatever its
/// size, up to `receive.message.max.bytes`). Fetches of 64 MB were each a
/// fresh mapping of memory, faulted in page by page by librdkafka's thread
/// and unmapped by the applier: a third of a replay's time.
const LOG_FETCH_BYTES: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("cannot reach the Kafka brokers at {brokers}: {source}")]
    Unreachable { brokers: String, source: rdkafka::error::KafkaError },
    #[error("cannot create topic {topic}: {reason}")]
    Create { topic: String, reason: String },
    #[error("topic {topic} does not show in the brokers' metadata 10 s after it was created")]
    NotVisible { topic: String },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("topic {topic} has {partitions} partitions; the update log needs exactly one (total order). Recreate it with one partition.")]
    UpdatesPartitions { topic: String, partitions: usize },
    #[error("topics {topics:?} have {partitions:?} partitions; the join needs them co-partitioned (as many partitions each)")]
    NotCoPartitioned { topics: Vec<String>, partitions: Vec<usize> },
}

/// Where the brokers are and how to reach them: `kafka.brokers` and the
/// `kafka.client` properties (TLS, SASL, ...), their secrets read. Every
/// Kafka client of the replica and of `tributary produce` is made from one.
/// Its `Debug` names the properties, never their values.
#[derive(Clone)]
pub struct Connection {
    pub brokers: String,
    properties: Vec<(String, String)>,
}

impl Connection {
    /// The connection `k` configures; an error names a property whose value
    /// cannot be read, or one tributary sets itself.
    pub fn of(k: &KafkaConfig) -> Result<Connection, ConfigError> {
        Ok(Connection { brokers: k.brokers.clone(), properties: k.client_properties()? })
    }

    /// Plaintext brokers, no client properties.
    pub fn plain(brokers: &str) -> Connection {
        Connection { brokers: brokers.to_string(), properties: Vec::new() }
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.properties.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("Connection").field("brokers", &self.brokers).field("properties", &names).finish()
    }
}

/// The settings of every client: `connection`'s, and `client_id`.
pub fn base_config(connection: &Connection, client_id: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &connection.brokers)
        .set("client.id", client_id)
        // Test brokers listen on 127.0.0.1 only; "localhost" may resolve to ::1 first.
        .set("broker.address.family", "v4")
        .set("log_level", "4");
    for (name, value) in &connection.properties {
        c.set(name, value);
    }
    // librdkafka's own debug contexts (e.g. "cgrp,fetch"), for diagnosis.
    if let Ok(contexts) = std::env::var("LIBRDKAFKA_DEBUG") {
        c.set("debug", contexts).set("log_level", "7");
    }
    c
}

/// A member of consumer group `group` that commits its offsets itself
/// (the trainer's and the join's), from the earliest offset when the group
/// has none. Frequent heartbeats: a member learns of a rebalance (a peer
/// left) on its next heartbeat, and a hand-over should take well under 2 s.
pub fn group_member_config(connection: &Connection, client_id: &str, group: &str, k: &KafkaConfig) -> ClientConfig {
    let mut c = base_config(connection, client_id);
    c.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", k.session_timeout_ms.to_string())
        .set("heartbeat.interval.ms", (k.session_timeout_ms / 10).clamp(100, 1000).to_string())
        .set("fetch.wait.max.ms", "10");
    c
}

/// Producer of gradient records (and, with batching, events).
///
/// - Idempotence (which implies `acks=all`): a write is acknowledged once
///   every in-sync replica has it, and librdkafka's retries after a broker's
///   death neither duplicate nor reorder records. A trainer's records of one
///   partition must reach the log in the order sent, or the later ones are
///   rejected (their `from` is not the watermark yet) and relearned.
/// - `message.timeout.ms` well above a leader election (the controller
///   fences a dead broker after `broker.session.timeout.ms`, 9 s by
///   default): a record is retried through it, not failed.
/// - `linger.ms` 1 (the trainer's gradient producer sets 0: one record in
///   flight has no batch-mates to wait for); freshness matters
///   more than batching for records of a few kB to MB.
pub fn producer_config(connection: &Connection, client_id: &str) -> ClientConfig {
    let mut c = base_config(connection, client_id);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1")
        .set("message.max.bytes", MAX_MESSAGE_BYTES.to_string())
        .set("message.timeout.ms", "60000")
        .set("request.timeout.ms", "10000");
    c
}

/// Reader of the update log: no group semantics (it assigns partition 0 by
/// hand), fetches as soon as a record lands.
///
/// `fetch.queue.backoff.ms` 10: once librdkafka's queue of fetched records
/// passes `queued.max.messages.kbytes` (64 MB, about 2 300 `wide_deep`
/// records of one event), it fetches again this long after the queue falls
/// below, not librdkafka's default second. With the default, a replay
/// fetched 57 MB in 50 ms, then waited a second with the applier idle:
/// 100 000 such records took 27 s with the machine 80 % idle.
///
/// `auto.offset.reset` is `error`: a position the broker does not hold is
/// reported, never silently replaced by the log's start or end, which would
/// skip or repeat records and fork this replica's state from the fleet's.
pub fn log_reader_config(connection: &Connection, client_id: &str) -> ClientConfig {
    let mut c = base_config(connection, client_id);
    c.set("group.id", format!("{client_id}-log-reader"))
        .set("auto.offset.reset", "error")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "10")
        .set("fetch.queue.backoff.ms", "10")
        .set("fetch.max.bytes", LOG_FETCH_BYTES.to_string())
        .set("max.partition.fetch.bytes", LOG_FETCH_BYTES.to_string())
        .set("receive.message.max.bytes", (2 * MAX_MESSAGE_BYTES + 1024).to_string());
    c
}

/// The high watermark of `partition` of `topic` as the last fetch response
/// reported it: no request is made, and there is none before the first
/// fetch. The applier's start-up asks the broker for the log end
/// ([`log_end`]); when the broker cannot be reached then, the first fetch
/// response tells it instead.
pub fn fetched_end(
    consumer: &BaseConsumer<impl rdkafka::consumer::ConsumerContext>,
    topic: &str,
    partition: i32,
) -> Option<i64> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: a live client handle, a NUL-terminated topic name and two
    // out-parameters that outlive the call.
    let err = unsafe {
        rdkafka_sys::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka_sys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some(high)
}

/// Waits up to `limit` until every message `producer` queued is delivered
/// (or failed). The rdkafka crate's `flush` waits in steps of 100 ms while
/// any is in flight: a transaction committed every few tens of ms then took
/// 100 ms each. A threaded producer's own thread serves the delivery
/// reports meanwhile.
pub fn flush_promptly<C: rdkafka::producer::ProducerContext>(
    producer: &rdkafka::producer::ThreadedProducer<C>,
    limit: Duration,
) -> Result<(), rdkafka::error::KafkaError> {
    use rdkafka::producer::Producer;
    let limit_ms = limit.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: a live producer handle; librdkafka only waits on it.
    let err = unsafe { rdkafka_sys::rd_kafka_flush(producer.client().native_ptr(), limit_ms) };
    match err {
        rdkafka_sys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR => Ok(()),
        e => Err(rdkafka::error::KafkaError::Flush(e.into())),
    }
}

/// The low watermark (start) of partition 0 of `topic`: the first record
/// the broker still holds.
pub fn log_start(consumer: &BaseConsumer<impl rdkafka::consumer::ConsumerContext>, topic: &str) -> Option<i64> {
    consumer.fetch_watermarks(topic, 0, Duration::from_secs(2)).ok().map(|(low, _)| low)
}

/// Whether a read error says the position is not in the log any more
/// (`auto.offset.reset` is `error` on the log reader).
pub fn is_position_gone(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode;
    matches!(e.rdkafka_error_code(), Some(RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange))
}

/// The high watermark (end) of partition 0 of `topic`.
pub fn log_end(consumer: &BaseConsumer<impl rdkafka::consumer::ConsumerContext>, topic: &str) -> Option<i64> {
    consumer.fetch_watermarks(topic, 0, Duration::from_secs(2)).ok().map(|(_, high)| high)
}

/// What a topic holds, which decides the settings it is created with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicRole {
    /// Training events (or their dead letters): the user's data, kept as
    /// long as the broker's retention says.
    Events,
    /// The update log: one partition, every record kept, records up to
    /// [`MAX_MESSAGE_BYTES`].
    Updates,
    /// A changelog keyed by id: compacted, so it keeps each id's last entry.
    Changelog,
}

/// The settings tributary relies on for a topic of `role` replicated
/// `replication` times (docs/operating.md, "Kafka settings").
pub fn topic_settings(role: TopicRole, replication: i32) -> Vec<(&'static str, String)> {
    // With 3 or more copies, an acknowledged write (acks=all) is on at least
    // two brokers, so one broker's death loses nothing and stops no write.
    let min_isr = if replication >= 3 { 2 } else { 1 };
    let mut settings = vec![
        ("min.insync.replicas", min_isr.to_string()),
        // A replica that missed writes must never become leader: it would
        // silently drop acknowledged records (and, for updates, fork the log).
        ("unclean.leader.election.enable", "false".to_string()),
    ];
    if role == TopicRole::Updates {
        settings.extend([
            // The update log is the model's history: a replica rebuilds its
            // state from a checkpoint plus every record after it.
            ("retention.ms", "-1".to_string()),
            ("retention.bytes", "-1".to_string()),
            ("cleanup.policy", "delete".to_string()),
            // A gradient record of a large model is far above the 1 MB default.
            ("max.message.bytes", MAX_MESSAGE_BYTES.to_string()),
        ]);
    }
    if role == TopicRole::Changelog {
        settings.push(("cleanup.policy", "compact".to_string()));
    }
    settings
}

/// Creates each `(topic, partitions, role)` that does not exist yet, with
/// `replication` copies and [`topic_settings`]; an existing topic is left
/// as it is.
pub async fn create_missing(
    connection: &Connection,
    replication: i32,
    topics: &[(&str, i32, TopicRole)],
) -> Result<AdminClient<DefaultClientContext>, TopicError> {
    let unreachable = |source| TopicError::Unreachable { brokers: connection.brokers.clone(), source };
    let admin: AdminClient<DefaultClientContext> =
        base_config(connection, "tributary-admin").create().map_err(unreachable)?;
    let settings: Vec<Vec<(&str, String)>> =
        topics.iter().map(|&(_, _, role)| topic_settings(role, replication)).collect();
    let wanted: Vec<NewTopic> = (topics.iter().zip(&settings))
        .map(|(&(t, p, _), settings)| {
            settings
                .iter()
                .fold(NewTopic::new(t, p, TopicReplication::Fixed(replication)), |topic, (k, v)| topic.set(k, v))
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin.create_topics(&wanted, &opts).await.map_err(unreachable)?;
    for result in results {
        if let Err((topic, code)) = result {
            if code != RDKafkaErrorCode::TopicAlreadyExists {
                return Err(TopicError::Create { topic, reason: code.to_string() });
            }
        }
    }
    Ok(admin)
}

/// Creates the join's topics when missing (`feedback`: predictions,
/// labels and the join's changelog) with the events topic's partitions,
/// and refuses them when they are not co-partitioned.
pub async fn ensure_feedback_topics(k: &KafkaConfig, feedback: &FeedbackConfig) -> Result<(), TopicError> {
    let changelog = feedback.changelog_topic();
    let names = [feedback.predictions_topic.as_str(), &feedback.labels_topic, &changelog];
    let topics =
        names.map(|t| (t, k.events_partitions, if t == changelog { TopicRole::Changelog } else { TopicRole::Events }));
    let admin = create_missing(&Connection::of(k)?, k.replication_factor, &topics).await?;
    let unreachable = |source| TopicError::Unreachable { brokers: k.brokers.clone(), source };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut partitions = Vec::new();
        for topic in names {
            let metadata = admin.inner().fetch_metadata(Some(topic), Duration::from_secs(10)).map_err(unreachable)?;
            partitions.push(metadata.topics().first().map_or(0, |t| t.partitions().len()));
        }
        match partitions.iter().position(|&n| n == 0) {
            Some(_) if std::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Some(i) => return Err(TopicError::NotVisible { topic: names[i].to_string() }),
            None if partitions.iter().all(|&n| n == partitions[0]) => return Ok(()),
            None => {
                let topics = names.map(String::from).to_vec();
                return Err(TopicError::NotCoPartitioned { topics, partitions });
            }
        }
    }
}

/// Creates the events, updates and dead-letter topics if missing, and refuses an updates
/// topic with more than one partition.
pub async fn ensure_topics(k: &KafkaConfig) -> Result<(), TopicError> {
    let unreachable = |source| TopicError::Unreachable { brokers: k.brokers.clone(), source };
    let topics = [
        (k.events_topic.as_str(), k.events_partitions, TopicRole::Events),
        (&k.updates_topic, 1, TopicRole::Updates),
        (&k.dlq_topic, 1, TopicRole::Events),
    ];
    let admin = create_missing(&Connection::of(k)?, k.replication_factor, &topics).await?;
    // A topic just created reaches the brokers' metadata a moment later
    // (Kafka propagates it from the controller): until then it shows no
    // partitions, which is not an answer yet.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let metadata =
            admin.inner().fetch_metadata(Some(&k.updates_topic), Duration::from_secs(10)).map_err(unreachable)?;
        let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len());
        match partitions {
            1 => return Ok(()),
            0 if std::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            0 => return Err(TopicError::NotVisible { topic: k.updates_topic.clone() }),
            n => return Err(TopicError::UpdatesPartitions { topic: k.updates_topic.clone(), partitions: n }),
        }
    }
}
