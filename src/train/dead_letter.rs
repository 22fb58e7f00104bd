//! The dead-letter topic: the events the trainer cannot learn, each with
//! why (a reason and its kind), where it came from and which replica sent
//! it, in headers. Owns its producer; knows nothing of batches or weights.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use tracing::warn;

use super::context::DeadLetterContext;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::state::Reject;
use crate::update_log::kafka;

/// Why the gradient of some events is not sent: the apply rule would
/// reject it, or the model could not compute it.
#[derive(Debug)]
pub enum Refusal {
    Rejected(Reject),
    Failed(String),
}

impl Refusal {
    /// A short, stable name: a label value, a dead letter's reason kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::Rejected(Reject::NormBound) => "gradient_norm",
            Refusal::Rejected(Reject::NonFinite) => "gradient_non_finite",
            Refusal::Rejected(_) | Refusal::Failed(_) => "gradient_failed",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Rejected(Reject::NormBound) => write!(f, "the gradient's norm is over model.max_grad_norm"),
            Refusal::Rejected(Reject::NonFinite) => write!(f, "the gradient or the loss is not finite"),
            Refusal::Rejected(other) => write!(f, "the apply rule would reject the gradient ({})", other.as_str()),
            Refusal::Failed(e) => write!(f, "the model failed to compute the gradient: {e}"),
        }
    }
}

/// The dead-letter producer of one replica's trainer.
pub struct DeadLetters {
    producer: ThreadedProducer<DeadLetterContext>,
    /// `kafka.dlq_topic`.
    topic: String,
    events_topic: String,
    replica_id: String,
    metrics: Arc<Metrics>,
}

impl DeadLetters {
    pub fn new(connection: &kafka::Connection, config: &Config, metrics: Arc<Metrics>) -> anyhow::Result<DeadLetters> {
        let producer = kafka::producer_config(connection, &format!("{}-dlq", config.replica_id))
            .create_with_context(DeadLetterContext { metrics: metrics.clone() })?;
        Ok(DeadLetters {
            producer,
            topic: config.kafka.dlq_topic.clone(),
            events_topic: config.kafka.events_topic.clone(),
            replica_id: config.replica_id.clone(),
            metrics,
        })
    }

    /// Writes an event no one will learn to the dead-letter topic: the
    /// payload as it came, the reason (`kind`, a stable name, and `reason`,
    /// for people), source topic, partition and offset in headers, and
    /// `partition:offset` as the key. After a seek back the same event may be
    /// written again, under the same key (a compacted topic keeps one). A
    /// delivery failure is logged and counted, not retried: the event's range
    /// is learned, and the partition moves on.
    pub fn send(&self, partition: i32, offset: i64, payload: &[u8], kind: &str, reason: &str) {
        let (offset_text, partition_text) = (offset.to_string(), partition.to_string());
        let headers = OwnedHeaders::new()
            .insert(Header { key: "tributary.reason", value: Some(reason) })
            .insert(Header { key: "tributary.reason_kind", value: Some(kind) })
            .insert(Header { key: "tributary.topic", value: Some(self.events_topic.as_str()) })
            .insert(Header { key: "tributary.partition", value: Some(partition_text.as_str()) })
            .insert(Header { key: "tributary.offset", value: Some(offset_text.as_str()) })
            .insert(Header { key: "tributary.replica", value: Some(self.replica_id.as_str()) });
        let key = format!("{partition}:{offset}");
        let record = BaseRecord::with_opaque_to(&self.topic, Box::new((partition, offset)))
            .payload(payload)
            .key(&key)
            .headers(headers);
        if let Err((e, _)) = self.producer.send(record) {
            warn!(partition, offset, error = %e, "dead letter not queued");
            self.metrics.trainer.dead_letters.with_label_values(&["failed"]).inc();
        }
    }

    /// Waits up to `timeout` for the dead letters queued to be sent.
    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer.flush(timeout);
    }
}
