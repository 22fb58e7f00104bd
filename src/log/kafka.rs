//! Kafka client settings and topic management, shared by the trainer, the
//! applier and `tributary produce`.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaConfig;

/// Gradient records of a large model are big; the broker default (1 MB) is not.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("cannot reach the Kafka brokers at {brokers}: {source}")]
    Unreachable { brokers: String, source: rdkafka::error::KafkaError },
    #[error("cannot create topic {topic}: {reason}")]
    Create { topic: String, reason: String },
    #[error("topic {topic} has {partitions} partitions; the update log needs exactly one (total order). Recreate it with one partition.")]
    UpdatesPartitions { topic: String, partitions: usize },
}

pub fn base_config(brokers: &str, client_id: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("client.id", client_id)
        // Tansu listens on IPv4 only; "localhost" may resolve to ::1 first.
        .set("broker.address.family", "v4")
        .set("log_level", "4");
    // librdkafka's own debug contexts (e.g. "cgrp,fetch"), for diagnosis.
    if let Ok(contexts) = std::env::var("LIBRDKAFKA_DEBUG") {
        c.set("debug", contexts).set("log_level", "7");
    }
    c
}

/// Producer of gradient records (and, with batching, events): every write
/// acknowledged by all in-sync replicas, low latency over batching.
///
/// One record per batch: the Tansu broker's memory engine serves a fetch
/// from the first batch whose *base* offset is at or after the requested
/// one, so a consumer that starts in the middle of a batch skips the rest of
/// it. Appliers start the update log at a checkpoint's position, anywhere.
/// Kafka has no such flaw; the cost of single-record batches for gradient
/// records (large, a few hundred a second) is nil. The trainer, which reads
/// events batched by any producer, probes back instead (`train::Resume`).
pub fn producer_config(brokers: &str, client_id: &str) -> ClientConfig {
    let mut c = base_config(brokers, client_id);
    c.set("acks", "all")
        .set("linger.ms", "1")
        .set("batch.num.messages", "1")
        .set("message.max.bytes", MAX_MESSAGE_BYTES.to_string())
        .set("message.timeout.ms", "30000");
    c
}

/// Reader of the update log: no group semantics (it assigns partition 0 by
/// hand), fetches as soon as a record lands.
pub fn log_reader_config(brokers: &str, client_id: &str) -> ClientConfig {
    let mut c = base_config(brokers, client_id);
    c.set("group.id", format!("{client_id}-log-reader"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "10")
        .set("fetch.max.bytes", (2 * MAX_MESSAGE_BYTES).to_string())
        .set("max.partition.fetch.bytes", MAX_MESSAGE_BYTES.to_string())
        .set("receive.message.max.bytes", (2 * MAX_MESSAGE_BYTES + 1024).to_string());
    c
}

/// The high watermark of partition 0 of `topic` as the last fetch response
/// reported it: no request is made, and there is none before the first
/// fetch. Tansu 0.6 answers ListOffsets ([`log_end`]) with the batch written
/// last by modification time, which ties when many land in one instant, so
/// that answer can fall short; its fetch responses carry the true end.
pub fn fetched_end(consumer: &BaseConsumer<impl rdkafka::consumer::ConsumerContext>, topic: &str) -> Option<i64> {
    fetched_partition_end(consumer, topic, 0)
}

/// [`fetched_end`] of any partition.
pub fn fetched_partition_end(
    consumer: &BaseConsumer<impl rdkafka::consumer::ConsumerContext>,
    topic: &str,
    partition: i32,
) -> Option<i64> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: a live client handle, a NUL-terminated topic name and two
    // out-parameters that outlive the call.
    let err = unsafe {
        rdkafka_sys::rd_kafka_get_watermark_offsets(consumer.client().native_ptr(), topic.as_ptr(), partition, &mut low, &mut high)
    };
    (err == rdkafka_sys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some(high)
}

/// The high watermark (end) of partition 0 of `topic`.
pub fn log_end(consumer: &BaseConsumer<impl rdkafka::consumer::ConsumerContext>, topic: &str) -> Option<i64> {
    consumer.fetch_watermarks(topic, 0, Duration::from_secs(2)).ok().map(|(_, high)| high)
}

/// Creates each `(topic, partitions)` that does not exist yet; an existing
/// topic is left as it is.
pub async fn create_missing(brokers: &str, topics: &[(&str, i32)]) -> Result<AdminClient<DefaultClientContext>, TopicError> {
    let unreachable = |source| TopicError::Unreachable { brokers: brokers.to_string(), source };
    let admin: AdminClient<DefaultClientContext> = base_config(brokers, "tributary-admin").create().map_err(unreachable)?;
    let wanted: Vec<NewTopic> = topics.iter().map(|&(t, p)| NewTopic::new(t, p, TopicReplication::Fixed(1))).collect();
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

/// Creates the events, updates and dead-letter topics if missing, and refuses an updates
/// topic with more than one partition.
pub async fn ensure_topics(k: &KafkaConfig) -> Result<(), TopicError> {
    let unreachable = |source| TopicError::Unreachable { brokers: k.brokers.clone(), source };
    let topics = [(k.events_topic.as_str(), k.events_partitions), (&k.updates_topic, 1), (&k.dlq_topic, 1)];
    let admin = create_missing(&k.brokers, &topics).await?;
    let metadata = admin
        .inner()
        .fetch_metadata(Some(&k.updates_topic), Duration::from_secs(10))
        .map_err(unreachable)?;
    if let Some(t) = metadata.topics().first() {
        if t.partitions().len() != 1 {
            return Err(TopicError::UpdatesPartitions { topic: k.updates_topic.clone(), partitions: t.partitions().len() });
        }
    }
    Ok(())
}
