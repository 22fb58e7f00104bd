//! The smaller sections: `[train]`, `[apply]`, `[guard]`, `[http]` and
//! `[grpc]`, each with its defaults and its own check.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::{ConfigError, Secret};

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
    pub admin_token: Secret,
    /// `POST /v1/events` produces training events to the events topic.
    pub ingest: bool,
    /// Bearer token `POST /v1/events` requires; empty: none.
    pub ingest_token: Secret,
}

impl TrainConfig {
    /// The train section's own check.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Invalid(msg));
        if self.batch_size == 0 || self.max_in_flight == 0 {
            return bad("train.batch_size and train.max_in_flight must be positive".into());
        }
        if !(1024..=MAX_RECORD_BYTES).contains(&self.max_record_bytes) {
            return bad(format!("train.max_record_bytes must be between 1024 and {MAX_RECORD_BYTES}"));
        }
        Ok(())
    }
}

impl Default for TrainConfig {
    fn default() -> TrainConfig {
        TrainConfig {
            enabled: true,
            batch_size: 1024,
            max_record_bytes: MAX_RECORD_BYTES,
            max_in_flight: 4,
            max_unseen_records: 0,
            max_event_time_lead_ms: 100,
            commit_interval_ms: 1000,
        }
    }
}

impl ApplyConfig {
    /// The apply section's own check.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.max_swaps_per_sec >= 0.0 && self.max_swaps_per_sec.is_finite()) {
            return Err(ConfigError::Invalid("apply.max_swaps_per_sec must be a finite number, 0 or more".into()));
        }
        Ok(())
    }
}

impl Default for ApplyConfig {
    fn default() -> ApplyConfig {
        ApplyConfig { max_swaps_per_sec: 20.0 }
    }
}

impl GuardConfig {
    /// The guard section's own check.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.loss_factor.is_finite() && self.loss_factor > 1.0) {
            return Err(ConfigError::Invalid("guard.loss_factor must be a number above 1".into()));
        }
        Ok(())
    }
}

impl Default for GuardConfig {
    fn default() -> GuardConfig {
        GuardConfig { enabled: true, loss_factor: 3.0, warmup_examples: 10_000 }
    }
}

impl HttpConfig {
    /// The http section's own check.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: &str| Err(ConfigError::Invalid(msg.to_string()));
        if self.max_batch == 0 {
            return bad("http.max_batch must be positive");
        }
        if !self.admin_token.is_empty() && self.admin_token.len() < 16 {
            return bad("http.admin_token must be at least 16 characters (or empty: admin endpoints off)");
        }
        if !self.ingest_token.is_empty() && self.ingest_token.len() < 16 {
            return bad("http.ingest_token must be at least 16 characters (or empty: POST /v1/events needs no token)");
        }
        Ok(())
    }
}

impl Default for HttpConfig {
    fn default() -> HttpConfig {
        HttpConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 1 << 20,
            max_batch: 1024,
            admin_token: Secret::default(),
            ingest: true,
            ingest_token: Secret::default(),
        }
    }
}
