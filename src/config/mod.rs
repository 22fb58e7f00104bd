//! Configuration: built-in defaults, then a TOML file, then `TRIBUTARY_*`
//! environment variables, then command-line flags, each layer overriding the
//! one before. Unknown keys are errors at every layer, so a typo never goes
//! unnoticed. `config/tributary.toml` documents every key with its default.
//!
//! One file per section (`model`, `kafka`, `checkpoint`; the smaller ones in
//! `sections`), each with its defaults and its own check; string-valued
//! modes are enums parsed at load; tokens and passwords are [`Secret`]s,
//! never printed.

mod checkpoint;
mod features;
mod feedback;
mod kafka;
mod model;
mod secret;
mod sections;
mod shard;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use checkpoint::{CheckpointConfig, CheckpointStore, TrimUpdateLog};
pub use features::{
    DenseFeature, FeaturesConfig, IfMissing, LabelFeature, Scalar, SparseFeature, TimeFeature, TimeUnit, Transform,
};
pub use feedback::{FeedbackConfig, OnExpiry};
pub use kafka::{EventFormat, KafkaConfig, PROTECTED_CLIENT_PROPERTIES};
pub use model::{Loss, ModelConfig, ModelKind, OptimizerKind, StalenessScaling};
pub use secret::Secret;
pub use sections::{ApplyConfig, GrpcConfig, GuardConfig, HttpConfig, TrainConfig, MAX_RECORD_BYTES};
pub use shard::ShardConfig;

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
    pub shard: ShardConfig,
    pub feedback: FeedbackConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            replica_id: "replica-0".into(),
            model: ModelConfig::default(),
            kafka: KafkaConfig::default(),
            train: TrainConfig::default(),
            apply: ApplyConfig::default(),
            guard: GuardConfig::default(),
            checkpoint: CheckpointConfig::default(),
            http: HttpConfig::default(),
            grpc: GrpcConfig::default(),
            shard: ShardConfig::default(),
            feedback: FeedbackConfig::default(),
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
    /// weights then never include the trainer's records). A shard overlaps
    /// too: it gathers the other shards' rows with their optimizer slots.
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
            config.checkpoint.store = CheckpointStore::try_from(v.clone()).map_err(ConfigError::Invalid)?;
        }
        if let Some(v) = &flags.admin_token {
            config.http.admin_token = Secret::new(v.as_str());
        }
        if let Some(v) = &flags.bootstrap_from {
            config.checkpoint.bootstrap_from = v.clone();
        }
        config.model.adopt_features();
        config.validate()?;
        Ok(config)
    }

    /// Every section's own check, and the replica's id.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.model.validate()?;
        self.kafka.validate()?;
        self.train.validate()?;
        self.apply.validate()?;
        self.guard.validate()?;
        self.checkpoint.validate()?;
        self.http.validate()?;
        self.grpc.socket_addr()?;
        self.shard.validate()?;
        self.feedback.validate()?;
        self.validate_shards()?;
        if self.replica_id.is_empty() || self.replica_id.len() > 255 {
            return Err(ConfigError::Invalid("replica_id must be 1 to 255 bytes".into()));
        }
        Ok(())
    }
}

impl Config {
    /// What a sharded replica needs of the other sections.
    fn validate_shards(&self) -> Result<(), ConfigError> {
        if !self.shard.is_sharded() {
            return Ok(());
        }
        let bad = |msg: &str| Err(ConfigError::Invalid(msg.to_string()));
        if self.model.kind == ModelKind::TorchScript {
            return bad("a TorchScript model cannot be sharded (its module reads whole tables): shard.count must be 1");
        }
        if self.checkpoint.peer_token.is_empty() {
            return bad("a sharded replica needs checkpoint.peer_token: shards gather rows from each other with it");
        }
        if self.shard.count > self.model.buckets {
            return bad("shard.count must be at most model.buckets: a shard of no rows holds nothing");
        }
        if self.checkpoint.trim_update_log == TrimUpdateLog::On {
            return bad(
                "checkpoint.trim_update_log = \"on\" cannot be used with shards: each shard's checkpoints are its own, \
                 and one shard trimming the log could remove what another still needs to recover",
            );
        }
        Ok(())
    }

    /// Whether this replica trims the update log after its checkpoints:
    /// never for a shard (see `validate_shards`).
    pub fn trims_update_log(&self) -> bool {
        !self.shard.is_sharded() && self.checkpoint.trims_update_log()
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
        assert_eq!(String::from(c.checkpoint.store), "postgres://db/x");
        assert_eq!(c.http.admin_token.expose(), "1234567890123456");
        assert_eq!(c.http.ingest_token.expose(), "6543210987654321", "a number-like token stays a string");
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
