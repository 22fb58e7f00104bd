//! The join's reading side: its consumer of the predictions and labels
//! topics (the range assignor: partition p of both to one member), the
//! rebalances it follows, and the partitions' [`Clock`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, ConsumerGroupMetadata, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::clock::Clock;
use crate::config::Config;
use crate::update_log::kafka;

/// Rebalances, as the consumer's callbacks saw them, for the loop to act on.
#[derive(Default)]
struct JoinContext {
    revoked: AtomicBool,
    assigned: Mutex<Option<Vec<i32>>>,
}

impl ClientContext for JoinContext {}

impl ConsumerContext for JoinContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(_) = rebalance {
            self.revoked.store(true, Ordering::Release);
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            *self.assigned.lock().expect("assigned lock") = Some(partitions_of(tpl));
        }
    }
}

/// The partitions of both topics in `tpl`, each once, in order.
fn partitions_of(tpl: &TopicPartitionList) -> Vec<i32> {
    let mut partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
    partitions.sort_unstable();
    partitions.dedup();
    partitions
}

/// What the last poll's rebalance callbacks did.
pub struct Rebalanced {
    /// Every partition was revoked: what was read since the last commit
    /// is read again.
    pub revoked: bool,
    /// The partitions now assigned, if an assignment came.
    pub assigned: Option<Vec<i32>>,
}

pub struct Reader {
    consumer: BaseConsumer<JoinContext>,
    pub predictions: String,
    pub labels: String,
    pub clock: Clock,
    /// When each partition's end was last asked of the broker.
    asked: HashMap<(bool, i32), Instant>,
}

impl Reader {
    pub fn new(config: &Config) -> anyhow::Result<Reader> {
        let (k, f) = (&config.kafka, &config.feedback);
        // Partition p of both topics to one member: co-partitioned by id.
        let connection = kafka::Connection::of(k)?;
        let client = format!("{}-join", config.replica_id);
        let consumer: BaseConsumer<JoinContext> =
            kafka::group_member_config(&connection, &client, &format!("{}-join", k.group_id), k)
                .set("isolation.level", "read_committed")
                .set("partition.assignment.strategy", "range")
                .create_with_context(JoinContext::default())?;
        Ok(Reader {
            consumer,
            predictions: f.predictions_topic.clone(),
            labels: f.labels_topic.clone(),
            clock: Clock::default(),
            asked: HashMap::new(),
        })
    }

    /// Joins the group over both topics.
    pub fn subscribe(&self) -> Result<(), KafkaError> {
        self.consumer.subscribe(&[&self.predictions, &self.labels])
    }

    /// The next record, waiting up to `timeout`; rebalance callbacks run
    /// inside, and [`Reader::rebalanced`] says what they did.
    pub fn poll(&self, timeout: Duration) -> Option<Result<BorrowedMessage<'_>, KafkaError>> {
        self.consumer.poll(timeout)
    }

    /// Takes what the rebalance callbacks of the last polls did; an
    /// assignment starts the clock at the committed offsets.
    pub fn rebalanced(&mut self) -> Result<Rebalanced, KafkaError> {
        let context = self.consumer.context();
        let revoked = context.revoked.swap(false, Ordering::AcqRel);
        let assigned = context.assigned.lock().expect("assigned lock").take();
        if revoked || assigned.is_some() {
            self.clock.clear();
        }
        if assigned.is_some() {
            self.start_clock()?;
        }
        Ok(Rebalanced { revoked, assigned })
    }

    /// The clock started at the committed offsets of the assignment, with
    /// each partition's end as the broker gives it now.
    fn start_clock(&mut self) -> Result<TopicPartitionList, KafkaError> {
        let committed = self.consumer.committed(Duration::from_secs(30))?;
        for e in committed.elements() {
            let ends = self.consumer.fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(5)).ok();
            // No offset committed: reading starts at the partition's start.
            let next = match (e.offset(), ends) {
                (Offset::Offset(o), _) => o,
                (_, Some((low, _))) => low,
                _ => 0,
            };
            self.clock.starts(e.topic() == self.labels, e.partition(), next, ends.map(|(_, high)| high));
        }
        Ok(committed)
    }

    /// Back to the committed offsets (after an aborted transaction); the
    /// partitions assigned.
    pub fn rewind(&mut self) -> anyhow::Result<Vec<i32>> {
        self.clock.clear();
        let committed = self.start_clock()?;
        let mut positions = TopicPartitionList::new();
        for e in committed.elements() {
            let offset = match e.offset() {
                Offset::Offset(o) => Offset::Offset(o),
                _ => Offset::Beginning,
            };
            positions.add_partition_offset(e.topic(), e.partition(), offset)?;
        }
        self.consumer.seek_partitions(positions, Duration::from_secs(30))?;
        Ok(partitions_of(&committed))
    }

    /// The labels topic's name, or the predictions'.
    pub fn topic(&self, is_label: bool) -> &str {
        if is_label {
            &self.labels
        } else {
            &self.predictions
        }
    }

    /// `partition`'s time at wall-clock `now` ([`Clock::time`]). A
    /// partition whose end neither a fetch nor the assignment told is asked
    /// of the broker, at most once a second.
    pub fn time(&mut self, partition: i32, now: i64) -> i64 {
        for is_label in [false, true] {
            let unknown = kafka::fetched_end(&self.consumer, self.topic(is_label), partition).is_none()
                && !self.clock.has_end(is_label, partition);
            let asked = self.asked.get(&(is_label, partition));
            if unknown && asked.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                self.asked.insert((is_label, partition), Instant::now());
                let topic = self.topic(is_label);
                if let Ok((_, high)) = self.consumer.fetch_watermarks(topic, partition, Duration::from_secs(1)) {
                    self.clock.ends_at(is_label, partition, high);
                }
            }
        }
        self.clock.time(partition, now, |is_label, p| kafka::fetched_end(&self.consumer, self.topic(is_label), p))
    }

    pub fn group(&self) -> Option<ConsumerGroupMetadata> {
        self.consumer.group_metadata()
    }
}
