//! Configuration: built-in defaults, then a TOML file, then `TRIBUTARY_*`
//! environment variables, then command-line flags, each layer overriding the
//! one before. Unknown keys are errors at every layer, so a typo never goes
//! unnoticed. `config/tributary.toml` documents every key with its default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Which model to train and serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// Dense features plus hashed sparse features, linear.
    Logistic,
    /// Dense features through hidden layers.
    Mlp,
    /// Bags of hashed embeddings per sparse field, concatenated with the dense
    /// features into an MLP, plus the linear part of `logistic`.
    WideDeep,
    /// A TorchScript module exported from PyTorch (`model.torchscript_path`),
    /// `forward(dense, ids)`: see `examples/torchscript/export.py`.
    #[serde(rename = "torchscript")]
    TorchScript,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Loss {
    /// Binary log-loss on a logit; labels in [0, 1]; predictions are probabilities.
    Logloss,
    /// Squared error; any finite label; predictions are the raw output.
    Squared,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    Sgd,
    Adagrad,
    Adam,
    /// FTRL-Proximal (McMahan et al. 2013): per-coordinate rates like
    /// Adagrad, with L1 that makes weights exactly zero.
    Ftrl,
}

impl OptimizerKind {
    /// Buffers of state per parameter besides the weights.
    pub fn slots(self) -> usize {
        match self {
            OptimizerKind::Sgd => 0,
            OptimizerKind::Adagrad => 1,
            OptimizerKind::Adam | OptimizerKind::Ftrl => 2,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Name under which the model is served (`/v1/models/{name}`).
    pub name: String,
    pub kind: ModelKind,
    /// Length of every event's `dense` array.
    pub dense_dim: usize,
    /// Names of the sparse fields an event may carry.
    pub sparse_fields: Vec<String>,
    /// Hash buckets per sparse field.
    pub buckets: u32,
    /// Embedding width per sparse field (`wide_deep`).
    pub embedding_dim: usize,
    /// Hidden layer widths (`mlp`, `wide_deep`).
    pub hidden: Vec<usize>,
    /// The module file of `kind = "torchscript"`.
    pub torchscript_path: PathBuf,
    pub loss: Loss,
    /// Unset: the kind's default ([`ModelConfig::optimizer`]).
    pub optimizer: Option<OptimizerKind>,
    /// The step size (FTRL's alpha). Unset: the optimizer's default
    /// ([`ModelConfig::step_size`]).
    pub learning_rate: Option<f32>,
    /// FTRL's beta: a coordinate's rate is `alpha / (beta + sqrt(n))`.
    pub ftrl_beta: f32,
    /// L1 and L2 strength (FTRL).
    pub l1: f32,
    pub l2: f32,
    /// Initial weights come from this seed: equal seeds, bit-identical weights.
    pub seed: u64,
    /// Gradients whose global L2 norm exceeds this are rejected.
    pub max_grad_norm: f32,
    /// How a gradient counts when other records changed the weights between
    /// the version it was computed at and its own offset.
    pub staleness_scaling: StalenessScaling,
}

/// A deterministic step for stale gradients: every replica computes the
/// same scale from the log (`offset - base`, the records the gradient did
/// not see).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StalenessScaling {
    /// Every gradient counts in full.
    None,
    /// The gradient is scaled by `1 / sqrt(1 + s)` for `s` records unseen.
    InverseSqrt,
}

impl CheckpointConfig {
    /// Whether this replica trims the update log after its checkpoints.
    pub fn trims_update_log(&self) -> bool {
        let shared = self.store.starts_with("postgres://") || self.store.starts_with("postgresql://");
        match self.trim_update_log.as_str() {
            "on" => true,
            "off" => false,
            _ => shared,
        }
    }
}

impl ModelConfig {
    /// A small model of `kind` (3 dense values, fields `a` and `b`, 64
    /// buckets, embeddings of 4, hidden layers [8, 4]), the defaults
    /// otherwise: the one fixture of unit tests that need a model quickly.
    pub fn small(kind: ModelKind) -> ModelConfig {
        ModelConfig {
            kind,
            dense_dim: 3,
            sparse_fields: vec!["a".into(), "b".into()],
            buckets: 64,
            embedding_dim: 4,
            hidden: vec![8, 4],
            ..Config::default().model
        }
    }

    /// The optimizer: as set, else FTRL for `logistic` (measured on the
    /// load report's click-through stream: 0.521 against Adagrad's 0.553
    /// and Vowpal Wabbit's 0.528) and Adagrad for the deep kinds.
    pub fn optimizer(&self) -> OptimizerKind {
        self.optimizer.unwrap_or(match self.kind {
            ModelKind::Logistic => OptimizerKind::Ftrl,
            _ => OptimizerKind::Adagrad,
        })
    }

    /// The step size: as set, else 0.3 for FTRL (its alpha) and 0.05 for
    /// the others.
    pub fn step_size(&self) -> f32 {
        self.learning_rate.unwrap_or(match self.optimizer() {
            OptimizerKind::Ftrl => 0.3,
            _ => 0.05,
        })
    }
}

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
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum EventFormat {
    #[default]
    Json,
    Avro,
}

/// The largest update-log record tributary supports: the `updates` topic's
/// `max.message.bytes` as it creates it, and its clients' limits.
pub const MAX_RECORD_BYTES: usize = 64 << 20;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Off: the replica applies the log and serves but learns nothing itself.
    pub enabled: bool,
    /// Most events per gradient record. A batch spans the trainer's
    /// partitions and is formed when a record can be sent, from what was
    /// read since: this large from a backlog, smaller when live.
    pub batch_size: usize,
    /// Gradient records of the trainer in flight (sent, not yet applied).
    /// More than 1 overlaps the next gradient with the round trip: it is
    /// computed against the served weights with the trainer's own records
    /// in flight stepped onto copies of the rows they touch, exactly as the
    /// applier will step them (`Config::trainer_overlaps`), so a lone
    /// trainer sees every record before its own at any number in flight.
    pub max_in_flight: usize,
    /// A gradient waits until the served weights miss at most this many
    /// records of the log (stale-synchronous: bounds what other replicas'
    /// records cost). 0: no bound.
    pub max_unseen_records: u64,
    /// Event-time alignment across the fleet: a trainer takes no event
    /// more than this many milliseconds of event time ahead of the slowest
    /// other trainer's progress (as its newest record in the log shows it).
    /// A trainer with no record for a second (idle, caught up, dead) holds
    /// no one back. 0: no alignment.
    pub max_event_time_lead_ms: u64,
    /// How often committed consumer offsets catch up with applied watermarks.
    pub commit_interval_ms: u64,
    /// Largest gradient record the trainer sends, in bytes: at most the
    /// `updates` topic's `max.message.bytes` (64 MiB as tributary creates
    /// it). A batch whose record would be larger is learned again in
    /// smaller batches; one event too large alone is skipped, and said.
    pub max_record_bytes: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyConfig {
    /// Upper bound on serving-snapshot swaps per second; an idle applier
    /// publishes at once. 0 turns swaps off once ready: serving keeps the
    /// start-up weights (the baseline of the swap benchmark, never for use).
    pub max_swaps_per_sec: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardConfig {
    /// Watch the progressive loss and roll back when it spikes.
    pub enabled: bool,
    /// A spike: the recent loss over this many times its moving baseline.
    pub loss_factor: f64,
    /// Examples learned (after start or a rollback) before the guard may fire.
    pub warmup_examples: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// The store: empty for `state_dir`, `file:PATH`, or `postgres://...`.
    pub store: String,
    /// Directory of the embedded checkpoint store.
    pub state_dir: PathBuf,
    /// A checkpoint is written this often while the position moves.
    pub interval_secs: u64,
    /// Checkpoints kept; older ones are deleted.
    pub keep: usize,
    /// Beyond `keep`, also keep the newest checkpoint of every interval of
    /// this many seconds (points to roll back to). 0: off.
    pub keep_one_every_secs: u64,
    /// A peer replica's base URL (`http://host:port`): when this replica's
    /// store holds no checkpoint, it fetches the peer's newest
    /// (`GET /v1/models/{name}/checkpoint`), verifies it and starts there.
    /// Empty: start from the seed weights.
    pub bootstrap_from: String,
    /// Bearer token of `GET /v1/models/{name}/checkpoint`, which this
    /// replica serves its peers, and which it sends to `bootstrap_from`:
    /// one token for the fleet, at least 16 characters. Empty: the endpoint
    /// is off (404) and a bootstrap sends none.
    pub peer_token: String,
    /// Delete update-log records below the oldest checkpoint the store
    /// keeps, after each checkpoint (Kafka DeleteRecords), so the log is
    /// bounded by `interval_secs` x `keep`: `auto` (on for PostgreSQL, where
    /// every replica can restore what the store keeps; off for a directory,
    /// whose checkpoints are one replica's), `on`, or `off`.
    pub trim_update_log: String,
}

/// The Open Inference Protocol over gRPC.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcConfig {
    /// `host:port` to serve `inference.GRPCInferenceService` on (Triton's
    /// and KServe's gRPC clients); empty: off.
    pub addr: String,
}

impl GrpcConfig {
    /// The address to serve on; `None` when off.
    pub fn socket_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        match self.addr.trim() {
            "" => Ok(None),
            addr => addr
                .parse()
                .map(Some)
                .map_err(|_| ConfigError::Invalid(format!("grpc.addr {addr:?} is not host:port (or empty: off)"))),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub addr: SocketAddr,
    /// Request bodies over this many bytes get 413.
    pub max_body_bytes: usize,
    /// Instances per predict request.
    pub max_batch: usize,
    /// Bearer token of the admin endpoints; empty turns them off.
    pub admin_token: String,
    /// `POST /v1/events` produces training events to the events topic.
    pub ingest: bool,
    /// Bearer token `POST /v1/events` requires; empty: none.
    pub ingest_token: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Names this replica in gradient records, logs and metrics.
    pub replica_id: String,
    pub model: ModelConfig,
    pub kafka: KafkaConfig,
    pub train: TrainConfig,
    pub apply: ApplyConfig,
    pub guard: GuardConfig,
    pub checkpoint: CheckpointConfig,
    pub http: HttpConfig,
    pub grpc: GrpcConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            replica_id: "replica-0".into(),
            model: ModelConfig {
                name: "default".into(),
                kind: ModelKind::WideDeep,
                dense_dim: 8,
                sparse_fields: ["f0", "f1", "f2", "f3"].map(String::from).to_vec(),
                buckets: 1 << 18,
                embedding_dim: 16,
                hidden: vec![64, 32],
                torchscript_path: PathBuf::new(),
                loss: Loss::Logloss,
                optimizer: None,
                learning_rate: None,
                ftrl_beta: 1.0,
                l1: 0.0,
                l2: 0.0,
                seed: 42,
                max_grad_norm: 1000.0,
                staleness_scaling: StalenessScaling::None,
            },
            kafka: KafkaConfig {
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
            },
            train: TrainConfig {
                enabled: true,
                batch_size: 1024,
                max_record_bytes: MAX_RECORD_BYTES,
                max_in_flight: 4,
                max_unseen_records: 0,
                max_event_time_lead_ms: 100,
                commit_interval_ms: 1000,
            },
            apply: ApplyConfig { max_swaps_per_sec: 20.0 },
            guard: GuardConfig { enabled: true, loss_factor: 3.0, warmup_examples: 10_000 },
            checkpoint: CheckpointConfig {
                store: String::new(),
                state_dir: PathBuf::from("./state"),
                interval_secs: 30,
                keep: 3,
                keep_one_every_secs: 0,
                bootstrap_from: String::new(),
                peer_token: String::new(),
                trim_update_log: "auto".into(),
            },
            http: HttpConfig {
                addr: "127.0.0.1:8080".parse().expect("valid literal"),
                max_body_bytes: 1 << 20,
                max_batch: 1024,
                admin_token: String::new(),
                ingest: true,
                ingest_token: String::new(),
            },
            grpc: GrpcConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("environment variable {var}: {reason}")]
    Env { var: String, reason: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Values given on the command line; `None` leaves the lower layers alone.
/// `tributary serve` takes them as its flags (`--brokers` is every
/// command's, so it is not one of these).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Overrides {
    /// Address of the HTTP API
    #[arg(long)]
    pub http_addr: Option<SocketAddr>,
    /// Address of the Open Inference Protocol's gRPC service (grpc.addr; none: off)
    #[arg(long)]
    pub grpc_addr: Option<SocketAddr>,
    #[arg(skip)]
    pub brokers: Option<String>,
    /// Names this replica in gradient records, logs and metrics
    #[arg(long)]
    pub replica_id: Option<String>,
    /// Directory of the embedded checkpoint store
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Checkpoint store: file:PATH or postgres://user@host/db (default: --state-dir)
    #[arg(long)]
    pub checkpoint_store: Option<String>,
    /// Bearer token of the admin endpoints (also TRIBUTARY_ADMIN_TOKEN; none: they are off)
    #[arg(long)]
    pub admin_token: Option<String>,
    /// A peer's base URL (http://host:port) to fetch a checkpoint from when the store has none
    #[arg(long)]
    pub bootstrap_from: Option<String>,
}

type Table = toml::map::Map<String, toml::Value>;

impl Config {
    /// Whether the trainer computes gradients during its records' round
    /// trips, over its own records in flight (`train.max_in_flight` > 1).
    /// Not with `staleness_scaling` (which counts every record since a
    /// gradient's base as unseen, its own too), nor a TorchScript model
    /// (its module takes whole weights), nor with swaps off (the served
    /// weights then never include the trainer's records).
    pub fn trainer_overlaps(&self) -> bool {
        self.train.max_in_flight > 1
            && self.model.staleness_scaling == StalenessScaling::None
            && self.model.torchscript_path.as_os_str().is_empty()
            && self.apply.max_swaps_per_sec > 0.0
    }

    /// Builds the configuration from every layer. `env` is passed in so tests
    /// need not touch the process environment.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut table = match toml::Value::try_from(Config::default()) {
            Ok(toml::Value::Table(t)) => t,
            _ => unreachable!("Config serializes to a table"),
        };
        if let Some(path) = file {
            let text =
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
            let layer: Table =
                toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source })?;
            merge(&mut table, layer);
        }
        merge(&mut table, env_layer(env)?);
        let mut config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.message().to_string()))?;
        if let Some(v) = flags.http_addr {
            config.http.addr = v;
        }
        if let Some(v) = flags.grpc_addr {
            config.grpc.addr = v.to_string();
        }
        if let Some(v) = &flags.brokers {
            config.kafka.brokers = v.clone();
        }
        if let Some(v) = &flags.replica_id {
            config.replica_id = v.clone();
        }
        if let Some(v) = &flags.state_dir {
            config.checkpoint.state_dir = v.clone();
        }
        if let Some(v) = &flags.checkpoint_store {
            config.checkpoint.store = v.clone();
        }
        if let Some(v) = &flags.admin_token {
            config.http.admin_token = v.clone();
        }
        if let Some(v) = &flags.bootstrap_from {
            config.checkpoint.bootstrap_from = v.clone();
        }
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.grpc.socket_addr()?;
        self.kafka.client_properties()?;
        if self.kafka.event_format == EventFormat::Avro && self.kafka.avro_schema.as_os_str().is_empty() {
            return Err(ConfigError::Invalid(
                "kafka.event_format = \"avro\" needs kafka.avro_schema (the writer schema, e.g. config/event.avsc)"
                    .into(),
            ));
        }
        let m = &self.model;
        let bad = |msg: &str| Err(ConfigError::Invalid(msg.to_string()));
        if m.name.is_empty() || m.name.contains(['/', ':']) {
            return bad("model.name must be non-empty without '/' or ':'");
        }
        if m.buckets == 0 || m.embedding_dim == 0 {
            return bad("model.buckets and model.embedding_dim must be positive");
        }
        if m.kind == ModelKind::Mlp && m.dense_dim == 0 {
            return bad("model.kind = \"mlp\" needs model.dense_dim > 0");
        }
        if m.kind == ModelKind::TorchScript && m.torchscript_path.as_os_str().is_empty() {
            return bad(
                "model.kind = \"torchscript\" needs model.torchscript_path (a module saved by torch.jit.script)",
            );
        }
        if m.hidden.contains(&0) {
            return bad("model.hidden widths must be positive");
        }
        let mut names: Vec<&String> = m.sparse_fields.iter().collect();
        names.sort();
        names.dedup();
        if names.len() != m.sparse_fields.len() {
            return bad("model.sparse_fields has a duplicate name");
        }
        if !m.learning_rate.is_none_or(|lr| lr.is_finite() && lr > 0.0) {
            return bad("model.learning_rate must be a positive number");
        }
        if !(m.ftrl_beta.is_finite() && m.ftrl_beta > 0.0) {
            return bad("model.ftrl_beta must be a positive number");
        }
        if ![m.l1, m.l2].iter().all(|v| v.is_finite() && *v >= 0.0) {
            return bad("model.l1 and model.l2 must be finite numbers, 0 or more");
        }
        if !(m.max_grad_norm.is_finite() && m.max_grad_norm > 0.0) {
            return bad("model.max_grad_norm must be a positive number");
        }
        if self.train.batch_size == 0 || self.train.max_in_flight == 0 {
            return bad("train.batch_size and train.max_in_flight must be positive");
        }
        let most = MAX_RECORD_BYTES;
        if !(1024..=most).contains(&self.train.max_record_bytes) {
            return bad(&format!("train.max_record_bytes must be between 1024 and {most}"));
        }
        if !["auto", "on", "off"].contains(&self.checkpoint.trim_update_log.as_str()) {
            return bad("checkpoint.trim_update_log must be auto, on or off");
        }
        if self.kafka.events_partitions < 1 {
            return bad("kafka.events_partitions must be at least 1");
        }
        if self.kafka.replication_factor < 1 {
            return bad("kafka.replication_factor must be at least 1");
        }
        if !(self.apply.max_swaps_per_sec >= 0.0 && self.apply.max_swaps_per_sec.is_finite()) {
            return bad("apply.max_swaps_per_sec must be a finite number, 0 or more");
        }
        if !(self.guard.loss_factor.is_finite() && self.guard.loss_factor > 1.0) {
            return bad("guard.loss_factor must be a number above 1");
        }
        if self.http.max_batch == 0 || self.checkpoint.keep == 0 {
            return bad("http.max_batch and checkpoint.keep must be positive");
        }
        if !self.checkpoint.peer_token.is_empty() && self.checkpoint.peer_token.len() < 16 {
            return bad("checkpoint.peer_token must be at least 16 characters (or empty: checkpoints not served)");
        }
        if !self.http.admin_token.is_empty() && self.http.admin_token.len() < 16 {
            return bad("http.admin_token must be at least 16 characters (or empty: admin endpoints off)");
        }
        if !self.http.ingest_token.is_empty() && self.http.ingest_token.len() < 16 {
            return bad("http.ingest_token must be at least 16 characters (or empty: POST /v1/events needs no token)");
        }
        if self.replica_id.is_empty() || self.replica_id.len() > 255 {
            return bad("replica_id must be 1 to 255 bytes");
        }
        Ok(())
    }
}

/// Short names for keys that deployments set by environment most often.
const ENV_ALIASES: [(&str, &str); 3] = [
    ("TRIBUTARY_CHECKPOINT_STORE", "TRIBUTARY_CHECKPOINT__STORE"),
    ("TRIBUTARY_ADMIN_TOKEN", "TRIBUTARY_HTTP__ADMIN_TOKEN"),
    ("TRIBUTARY_INGEST_TOKEN", "TRIBUTARY_HTTP__INGEST_TOKEN"),
];

/// `TRIBUTARY_*` variables that name no configuration key: the file to read
/// (`TRIBUTARY_CONFIG`, taken by the command line), the log format (read
/// before the configuration), and those of the project's scripts and tests,
/// which a replica they start inherits.
fn names_no_key(var: &str) -> bool {
    matches!(var, "TRIBUTARY_CONFIG" | "TRIBUTARY_LOG_FORMAT" | "TRIBUTARY_CACHE" | "TRIBUTARY_PYTHON")
        || var.starts_with("TRIBUTARY_TEST_")
}

/// `TRIBUTARY_KAFKA__BROKERS=x` becomes `kafka.brokers = "x"`; top-level keys
/// have no section (`TRIBUTARY_REPLICA_ID`); see also `ENV_ALIASES`. A value
/// that parses as TOML (a number, a bool, an array) is taken as such,
/// anything else as a string; the admin token is always a string.
fn env_layer(env: impl IntoIterator<Item = (String, String)>) -> Result<Table, ConfigError> {
    let mut layer = Table::new();
    let vars: BTreeMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("TRIBUTARY_") && !names_no_key(k))
        .map(|(k, v)| match ENV_ALIASES.iter().find(|(short, _)| *short == k) {
            Some((_, long)) => (long.to_string(), v),
            None => (k, v),
        })
        .collect();
    for (var, raw) in vars {
        let path: Vec<String> = var["TRIBUTARY_".len()..].split("__").map(str::to_ascii_lowercase).collect();
        if path.iter().any(String::is_empty) || path.len() > 2 {
            return Err(ConfigError::Env { var, reason: "expected TRIBUTARY_KEY or TRIBUTARY_SECTION__KEY".into() });
        }
        let as_string = var.ends_with("_TOKEN") || var.ends_with("CHECKPOINT__STORE");
        let value = (!as_string)
            .then(|| toml::from_str::<Table>(&format!("v = {raw}")).ok())
            .flatten()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(raw));
        let mut node = &mut layer;
        for key in &path[..path.len() - 1] {
            node = match node.entry(key.clone()).or_insert_with(|| toml::Value::Table(Table::new())) {
                toml::Value::Table(t) => t,
                _ => return Err(ConfigError::Env { var, reason: format!("{key} is not a section") }),
            };
        }
        node.insert(path[path.len() - 1].clone(), value);
    }
    Ok(layer)
}

/// Overlays `top` on `base`, section by section.
fn merge(base: &mut Table, top: Table) {
    for (key, value) in top {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(t)) => merge(b, t),
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn client_properties_read_their_secrets_and_may_not_override_tributarys() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("password");
        std::fs::write(&secret, "from-a-file\n").unwrap();
        let mut k = Config::default().kafka;
        k.client = [
            ("security.protocol", "SASL_SSL".to_string()),
            ("sasl.password", format!("${{file:{}}}", secret.display())),
            ("sasl.username", "${env:PATH}".to_string()),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect();
        let resolved: BTreeMap<String, String> = k.client_properties().unwrap().into_iter().collect();
        assert_eq!(resolved["sasl.password"], "from-a-file");
        assert_eq!(resolved["sasl.username"], std::env::var("PATH").unwrap());
        assert_eq!(resolved["security.protocol"], "SASL_SSL");
        let refused = |name: &str, value: &str, want: &str| {
            let mut k = Config::default().kafka;
            k.client.insert(name.into(), value.into());
            let err = k.client_properties().unwrap_err().to_string();
            assert!(err.contains(name) && err.contains(want), "{err}");
            assert!(!err.contains("hunter2"), "a value is never said: {err}");
        };
        refused("enable.idempotence", "hunter2", "sets this property itself");
        refused("auto.offset.reset", "earliest", "sets this property itself");
        refused("sasl.password", "${env:TRIBUTARY_NO_SUCH_VARIABLE}", "is not set");
        refused("sasl.password", "${vault:hunter2}", "${env:NAME} or ${file:PATH}");
        refused("sasl.password", "${file:/no/such/file}", "cannot read");
    }

    #[test]
    fn layers_override_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.toml");
        std::fs::write(&file, "replica_id = \"file\"\n[model]\nkind = \"mlp\"\nbuckets = 7\n").unwrap();
        let flags = Overrides { replica_id: Some("flag".into()), ..Default::default() };
        let c = Config::load(
            Some(&file),
            env(&[("TRIBUTARY_MODEL__BUCKETS", "9"), ("TRIBUTARY_REPLICA_ID", "env"), ("HOME", "x")]),
            &flags,
        )
        .unwrap();
        assert_eq!(c.model.kind, ModelKind::Mlp);
        assert_eq!(c.model.buckets, 9);
        assert_eq!(c.replica_id, "flag");
        assert_eq!(c.model.embedding_dim, Config::default().model.embedding_dim);
    }

    #[test]
    fn variables_of_the_process_and_the_scripts_are_not_keys() {
        let vars = [
            ("TRIBUTARY_CONFIG", "/etc/tributary.toml"),
            ("TRIBUTARY_LOG_FORMAT", "json"),
            ("TRIBUTARY_TEST_PG", "postgres://x"),
            ("TRIBUTARY_TEST_KAFKA", "127.0.0.1:1"),
        ];
        assert_eq!(Config::load(None, env(&vars), &Overrides::default()).unwrap(), Config::default());
        let err = Config::load(None, env(&[("TRIBUTARY_CONFIGG", "x")]), &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("configg"), "a misspelt key is still refused: {err}");
    }

    #[test]
    fn short_environment_names_and_string_secrets() {
        let c = Config::load(
            None,
            env(&[
                ("TRIBUTARY_CHECKPOINT_STORE", "postgres://db/x"),
                ("TRIBUTARY_ADMIN_TOKEN", "1234567890123456"),
                ("TRIBUTARY_INGEST_TOKEN", "6543210987654321"),
            ]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!((c.checkpoint.store.as_str(), c.http.admin_token.as_str()), ("postgres://db/x", "1234567890123456"));
        assert_eq!(c.http.ingest_token, "6543210987654321", "a number-like token stays a string");
        let err = Config::load(None, env(&[("TRIBUTARY_ADMIN_TOKEN", "short")]), &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("16 characters"), "{err}");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = Config::load(None, env(&[("TRIBUTARY_MODEL__BUCKTES", "9")]), &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("bucktes"), "{err}");
        let err = Config::load(None, env(&[("TRIBUTARY_MODEL__KIND", "forest")]), &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("forest"), "{err}");
    }

    #[test]
    fn documented_defaults_equal_the_code() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tributary.toml");
        let documented = Config::load(Some(&path), Vec::new(), &Overrides::default()).unwrap();
        assert_eq!(documented, Config::default(), "config/tributary.toml drifted from Config::default()");
    }
}
