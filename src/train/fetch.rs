//! What the trainer fetches: each owned events partition from a librdkafka
//! queue of its own, so that the merge can take the partition it needs next.
//!
//! Why not the consumer's one queue: it hands out events in the order
//! librdkafka fetched them, partition by partition, so the events of the
//! partition the merge waits for sit behind thousands of the others'. The
//! trainer could only read past those (unbounded memory) or pause the
//! partitions it had enough of, and librdkafka drops what it prefetched for
//! a partition when it is paused and fetches it again on resume: one
//! replica's merge waited on fetches 45 % of the time, and learned a
//! backlog at under 100 000 events/s. With a queue per partition, each is
//! read only while its read-ahead is short, and librdkafka stops fetching a
//! partition whose queue holds `queued.min.messages` (its own flow control,
//! per partition once the queues are split).
//!
//! Owns the consumer's settings, the partition queues and the wake-up when
//! one fills; knows nothing of the merge, records or the applier.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Message};
use tracing::warn;

use super::context::TrainerContext;
use crate::apply::progress::Progress;
use crate::config::Config;
use crate::update_log::kafka;

/// Events librdkafka keeps queued per partition (`queued.min.messages`):
/// about half a second of a partition at 400 000 events/s over 8.
pub const QUEUED_PER_PARTITION: usize = 2048;
/// And at most this many kilobytes of them (`queued.max.messages.kbytes`).
pub const QUEUED_KBYTES_PER_PARTITION: usize = 1024;

/// Bytes a fetch takes from one events partition, at least one producer
/// batch (librdkafka's default is 1 MB).
const TRAINER_PARTITION_FETCH_BYTES: usize = 64 * 1024;

/// An event as the consumer fetched it.
pub struct Fetched {
    pub partition: i32,
    pub offset: i64,
    /// The Kafka record's timestamp (ms), if it has one.
    pub record_ts: Option<i64>,
    pub payload: Vec<u8>,
}

impl Fetched {
    /// What a poll returned, as an event (an error is logged: librdkafka
    /// goes on fetching after it).
    fn of(polled: Option<KafkaResult<BorrowedMessage<'_>>>) -> Option<Fetched> {
        match polled? {
            Ok(m) => Some(Fetched {
                partition: m.partition(),
                offset: m.offset(),
                record_ts: m.timestamp().to_millis(),
                payload: m.payload().unwrap_or(&[]).to_vec(),
            }),
            Err(e) => {
                warn!(error = %e, "consumer error");
                None
            }
        }
    }
}

/// The consumer and a queue per owned partition.
pub struct Fetcher {
    consumer: Arc<BaseConsumer<TrainerContext>>,
    topic: String,
    queues: HashMap<i32, PartitionQueue<TrainerContext>>,
    /// Notified when a partition queue becomes non-empty: the trainer's one
    /// wait is on the applier's progress, so events wake it as well.
    progress: Arc<Progress>,
}

impl Fetcher {
    pub fn new(consumer: Arc<BaseConsumer<TrainerContext>>, topic: &str, progress: Arc<Progress>) -> Fetcher {
        Fetcher { consumer, topic: topic.to_string(), queues: HashMap::new(), progress }
    }

    /// Gives a newly assigned partition its own queue. Events fetched
    /// before are still in the consumer's queue: [`Fetcher::poll_consumer`]
    /// must be drained before the partition's queue is read, or they would
    /// look like a gap.
    pub fn split(&mut self, partition: i32) {
        match self.consumer.split_partition_queue(&self.topic, partition) {
            Some(mut queue) => {
                let progress = self.progress.clone();
                queue.set_nonempty_callback(move || progress.notify());
                self.queues.insert(partition, queue);
            }
            None => warn!(partition, "no queue of its own for the partition: its events come through the consumer's"),
        }
    }

    /// Drops a revoked partition's queue.
    pub fn forget(&mut self, partition: i32) {
        self.queues.remove(&partition);
    }

    pub fn forget_all(&mut self) {
        self.queues.clear();
    }

    /// The next event in the consumer's own queue, waiting up to `timeout`
    /// (events fetched before their partition's queue was split, and any
    /// of a partition without one). Rebalance callbacks run inside it.
    pub fn poll_consumer(&self, timeout: Duration) -> Option<Fetched> {
        Fetched::of(self.consumer.poll(timeout))
    }

    /// The next event queued for `partition`, without waiting.
    pub fn poll_partition(&self, partition: i32) -> Option<Fetched> {
        Fetched::of(self.queues.get(&partition)?.poll(Duration::ZERO))
    }
}

/// The consumer's settings, each with why.
pub fn consumer_config(connection: &kafka::Connection, config: &Config) -> rdkafka::ClientConfig {
    let k = &config.kafka;
    let mut c = kafka::group_member_config(connection, &config.replica_id, &k.group_id, k);
    c.set("partition.assignment.strategy", "cooperative-sticky")
        // Small fetches per partition, so that the read-ahead holds
        // every partition to merge, not a megabyte of one: with 1 MB the
        // read-ahead often held few partitions when a batch was taken, and
        // `logistic` learned 1.7 % worse than in order (64 KB: 0.4 %).
        .set("max.partition.fetch.bytes", TRAINER_PARTITION_FETCH_BYTES.to_string())
        // Also bounds how long librdkafka waits on a JoinGroup before it
        // retries (the default is five minutes). The rebalance callback
        // blocks poll for at most CATCH_UP_LIMIT plus a watermark query,
        // well under this.
        .set("max.poll.interval.ms", "10000")
        // librdkafka's queue per partition small, and its fetches
        // prompt: the read-ahead is the trainer's buffer. With the
        // defaults (100 000 events or 64 MB, then a fetch postponed by a
        // second) the partition the merge waited for was not fetched
        // for a second, and the merge went on without it.
        .set("queued.min.messages", QUEUED_PER_PARTITION.to_string())
        .set("queued.max.messages.kbytes", QUEUED_KBYTES_PER_PARTITION.to_string())
        .set("fetch.queue.backoff.ms", "10");
    if !k.group_instance_id.is_empty() {
        c.set("group.instance.id", &k.group_instance_id);
    }
    c
}
