//! The join (docs/design.md section 8b): a role of the replica, a member of
//! the consumer group `{kafka.group_id}-join` over the predictions and
//! labels topics, co-partitioned by id (the range assignor gives partition
//! p of both to one member). It holds each logged prediction until its
//! label comes or `feedback.window_ms` passes ([`window`]), then writes one
//! training event (the served instance, the label or the default, `ts` =
//! the prediction's time) to the events topic.
//!
//! Exactly once: each batch is one Kafka transaction holding the joined
//! events, the dead letters, the changelog's changes of the window
//! ([`changelog`]) and the consumed offsets of both topics (KIP-447: the
//! offsets commit with the group's generation, so a member that lost its
//! partitions cannot commit them). A SIGKILL loses the open transaction and
//! nothing else: the next owner of a partition reads its changelog back and
//! consumes from the committed offsets. Any failed transaction is aborted
//! and the joiner starts again from the last commit the same way.
//!
//! Owns its consumer, its transactional producer and the window; reads the
//! served model's featurizer only to build and check events.

mod changelog;
mod records;
mod window;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tracing::{info, warn};

use self::records::Joining;
use self::window::{Ending, Out, Window};
use crate::config::{Config, OnExpiry};
use crate::event::{EventCodec, Featurizer};
use crate::lifecycle::StopRequest;
use crate::metrics::{JoinMetrics, Metrics};
use crate::update_log::kafka;

/// A batch (one transaction) ends this long after its first record: the
/// label's wait to be joined and learnable, on top of the commit.
const BATCH_TIME: Duration = Duration::from_millis(20);
/// ... or at this many records read.
const BATCH_RECORDS: usize = 5000;
/// How long the joiner waits for a record before it treats its
/// partitions as read to their end and moves their time to the clock's.
const IDLE_POLL: Duration = Duration::from_millis(100);
const TRANSACTION_LIMIT: Duration = Duration::from_secs(30);

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
            let mut partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            partitions.sort_unstable();
            partitions.dedup();
            *self.assigned.lock().expect("assigned lock") = Some(partitions);
        }
    }
}

/// The topics the join reads and writes.
struct Topics {
    predictions: String,
    labels: String,
    changelog: String,
    events: String,
    dead_letters: String,
}

/// What one batch read and decided, committed together.
#[derive(Default)]
struct Batch {
    out: Vec<Out>,
    /// Next offset per `(topic is labels, partition)`.
    offsets: HashMap<(bool, i32), i64>,
    /// Record times of the labels that joined a prediction in this batch.
    labels_joined_at: Vec<i64>,
    /// Records not of their topic's form: `(partition, topic, record, why)`.
    invalid: Vec<(i32, String, Vec<u8>, String)>,
    records: usize,
}

pub struct Joiner {
    config: Arc<Config>,
    consumer: BaseConsumer<JoinContext>,
    producer: ThreadedProducer<DefaultProducerContext>,
    topics: Topics,
    window: Window,
    featurizer: Featurizer,
    codec: EventCodec,
    metrics: JoinMetrics,
    stop: StopRequest,
}

impl Joiner {
    pub fn new(
        config: Arc<Config>,
        featurizer: Featurizer,
        metrics: &Metrics,
        stop: StopRequest,
    ) -> anyhow::Result<Joiner> {
        let (k, f) = (&config.kafka, &config.feedback);
        let connection = kafka::Connection::of(k)?;
        let consumer = kafka::base_config(&connection, &format!("{}-join", config.replica_id))
            .set("group.id", format!("{}-join", k.group_id))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            // Partition p of both topics to one member: co-partitioned by id.
            .set("partition.assignment.strategy", "range")
            .set("session.timeout.ms", k.session_timeout_ms.to_string())
            .set("heartbeat.interval.ms", (k.session_timeout_ms / 10).clamp(100, 1000).to_string())
            .set("fetch.wait.max.ms", "10")
            .create_with_context(JoinContext::default())?;
        let producer = kafka::producer_config(&connection, &format!("{}-join", config.replica_id))
            // One id per replica: a restarted joiner fences its own former
            // self; another member's zombie is fenced by the group's
            // generation when it commits offsets (KIP-447).
            .set("transactional.id", format!("tributary-join-{}", config.replica_id))
            .set("linger.ms", "5")
            .set("partitioner", "murmur2_random")
            .create()?;
        let codec = EventCodec::new(k, &featurizer).map_err(anyhow::Error::msg)?;
        Ok(Joiner {
            topics: Topics {
                predictions: f.predictions_topic.clone(),
                labels: f.labels_topic.clone(),
                changelog: f.changelog_topic(),
                events: k.events_topic.clone(),
                dead_letters: k.dlq_topic.clone(),
            },
            window: Window::new(f.window_ms, f.max_open),
            consumer,
            producer,
            featurizer,
            codec,
            metrics: metrics.join.clone(),
            stop,
            config,
        })
    }

    /// Joins until asked to stop; an error the joiner cannot start again
    /// from (fenced, the broker gone through a whole restore) ends it.
    pub fn run(mut self) -> anyhow::Result<()> {
        self.producer.init_transactions(TRANSACTION_LIMIT).context("the join's transactional producer")?;
        self.consumer.subscribe(&[&self.topics.predictions, &self.topics.labels])?;
        info!(predictions = %self.topics.predictions, labels = %self.topics.labels, "joining");
        while !self.stop.is_requested() {
            let batch = self.read_batch()?;
            if batch.out.is_empty() && batch.offsets.is_empty() {
                continue;
            }
            match self.commit(&batch) {
                Ok(()) => self.count(&batch),
                Err(e) => self.start_over(e)?,
            }
        }
        let _ = self.producer.flush(Duration::from_secs(5));
        Ok(())
    }

    /// Reads records for up to `BATCH_TIME` from the first, and decides
    /// what they end. A revoke drops what was read so far: the consumer
    /// reads it again from the committed offsets.
    fn read_batch(&mut self) -> anyhow::Result<Batch> {
        let mut batch = Batch::default();
        let mut first: Option<Instant> = None;
        loop {
            let timeout = first.map_or(IDLE_POLL, |t| BATCH_TIME.saturating_sub(t.elapsed()));
            let polled = self.consumer.poll(timeout);
            if follow_rebalance(&self.config, self.consumer.context(), &mut self.window)? {
                (batch, first) = (Batch::default(), None);
            }
            match polled {
                None if first.is_none() => {
                    self.idle(&mut batch);
                    break;
                }
                None => break,
                Some(Err(e)) => warn!(error = %e, "the join's consumer"),
                Some(Ok(m)) => {
                    first.get_or_insert_with(Instant::now);
                    take(&mut self.window, &self.topics, &m, &mut batch);
                }
            }
            if batch.records >= BATCH_RECORDS || first.is_some_and(|t| t.elapsed() >= BATCH_TIME) {
                break;
            }
        }
        self.window.bound(&mut batch.out);
        Ok(batch)
    }

    /// Nothing to read: every partition's time moves to the clock's.
    fn idle(&mut self, batch: &mut Batch) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        for p in self.window.partitions() {
            self.window.advance(p, now, &mut batch.out);
        }
    }

    /// Writes the batch and its offsets in one transaction.
    fn commit(&self, batch: &Batch) -> Result<(), KafkaError> {
        self.producer.begin_transaction()?;
        let joining = Joining {
            featurizer: &self.featurizer,
            codec: &self.codec,
            default_label: &self.config.feedback.default_label,
        };
        for out in &batch.out {
            self.write(out, &joining)?;
        }
        for (partition, topic, record, why) in &batch.invalid {
            self.dead_letter(*partition, None, topic, record, "record_invalid", why)?;
        }
        let mut offsets = TopicPartitionList::new();
        for (&(is_label, p), &next) in &batch.offsets {
            let topic = if is_label { &self.topics.labels } else { &self.topics.predictions };
            offsets.add_partition_offset(topic, p, Offset::Offset(next))?;
        }
        let group =
            self.consumer.group_metadata().ok_or_else(|| KafkaError::Subscription("no group metadata yet".into()))?;
        self.producer.send_offsets_to_transaction(&offsets, &group, TRANSACTION_LIMIT)?;
        self.producer.commit_transaction(TRANSACTION_LIMIT)
    }

    /// One decision of the window as records of the transaction.
    fn write(&self, out: &Out, joining: &Joining<'_>) -> Result<(), KafkaError> {
        match out {
            Out::Joined { partition, id, prediction, label, .. } => {
                if label.is_none() && self.config.feedback.on_expiry == OnExpiry::Drop {
                    return Ok(());
                }
                match joining.event(prediction, label.as_deref()) {
                    Ok((event, ts)) => {
                        let record = BaseRecord::to(&self.topics.events).key(id.as_bytes()).payload(&event[..]);
                        self.send(record.timestamp(ts))
                    }
                    Err(why) => {
                        let record = label.as_deref().unwrap_or(prediction);
                        self.dead_letter(*partition, Some(id), &self.topics.predictions, record, "event_invalid", &why)
                    }
                }
            }
            Out::DeadLetter { partition, id, record, refused } => {
                let topic = match refused {
                    window::Refused::DuplicatePrediction => &self.topics.predictions,
                    _ => &self.topics.labels,
                };
                let why = match refused {
                    window::Refused::Unknown => "no prediction had this id within the window",
                    window::Refused::Late => "the prediction's window had passed",
                    window::Refused::Duplicate => "the prediction already had a label",
                    window::Refused::DuplicatePrediction => "a prediction was logged under this id already",
                };
                self.dead_letter(*partition, Some(id), topic, record, refused.kind(), why)
            }
            Out::Changelog { partition, id, entry } => {
                let value = entry.as_ref().map(|(e, _)| changelog::value_of(e));
                let mut record: BaseRecord<'_, [u8], [u8]> =
                    BaseRecord::to(&self.topics.changelog).partition(*partition).key(id.as_bytes());
                if let (Some(value), Some((_, time))) = (&value, entry) {
                    record = record.payload(value).timestamp(*time);
                }
                self.send(record)
            }
        }
    }

    fn dead_letter(
        &self,
        partition: i32,
        id: Option<&str>,
        topic: &str,
        record: &[u8],
        kind: &str,
        why: &str,
    ) -> Result<(), KafkaError> {
        let partition = partition.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header { key: "tributary.reason", value: Some(why) })
            .insert(Header { key: "tributary.reason_kind", value: Some(kind) })
            .insert(Header { key: "tributary.topic", value: Some(topic) })
            .insert(Header { key: "tributary.partition", value: Some(partition.as_str()) })
            .insert(Header { key: "tributary.replica", value: Some(self.config.replica_id.as_str()) });
        let mut dead: BaseRecord<'_, [u8], [u8]> =
            BaseRecord::to(&self.topics.dead_letters).payload(record).headers(headers);
        dead.key = id.map(str::as_bytes);
        self.send(dead)
    }

    /// Queues one record of the transaction, waiting while the queue is full.
    fn send(&self, mut record: BaseRecord<'_, [u8], [u8]>) -> Result<(), KafkaError> {
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// A committed batch, counted.
    fn count(&self, batch: &Batch) {
        let m = &self.metrics;
        m.transactions.with_label_values(&["committed"]).inc();
        for out in &batch.out {
            match out {
                Out::Joined { ending, .. } => m.predictions.with_label_values(&[ending_name(*ending)]).inc(),
                Out::DeadLetter { refused, .. } => m.dead_letters.with_label_values(&[refused.kind()]).inc(),
                Out::Changelog { .. } => {}
            }
        }
        m.dead_letters.with_label_values(&["record_invalid"]).inc_by(batch.invalid.len() as u64);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        for at in &batch.labels_joined_at {
            m.latency.observe((now - at).max(0) as f64 / 1000.0);
        }
        m.open.set(self.window.open() as i64);
        m.entries.set(self.window.len() as i64);
    }

    /// A transaction failed: it is aborted, and the joiner starts again
    /// from the last commit (the window read back, the consumer at the
    /// committed offsets). A fenced producer cannot go on: the error ends
    /// the role.
    fn start_over(&mut self, error: KafkaError) -> anyhow::Result<()> {
        let fatal = matches!(&error, KafkaError::Transaction(e) if e.is_fatal());
        if fatal {
            return Err(error).context("the join's transaction");
        }
        warn!(error = %error, "a join transaction failed; starting again from the last commit");
        self.metrics.transactions.with_label_values(&["aborted"]).inc();
        self.producer.abort_transaction(TRANSACTION_LIMIT).context("aborting the join's transaction")?;
        self.window.clear();
        let committed = self.consumer.committed(TRANSACTION_LIMIT)?;
        let mut positions = TopicPartitionList::new();
        for e in committed.elements() {
            let offset = match e.offset() {
                Offset::Offset(o) => Offset::Offset(o),
                _ => Offset::Beginning,
            };
            positions.add_partition_offset(e.topic(), e.partition(), offset)?;
        }
        self.consumer.seek_partitions(positions, TRANSACTION_LIMIT)?;
        let mut partitions: Vec<i32> = committed.elements().iter().map(|e| e.partition()).collect();
        partitions.sort_unstable();
        partitions.dedup();
        restore(&self.config, &partitions, &mut self.window)
    }
}

/// Acts on a rebalance the last poll ran: a revoke forgets the window
/// (`true`: the batch read so far is to be dropped), an assignment reads
/// the assigned partitions' changelog back.
fn follow_rebalance(config: &Config, context: &JoinContext, window: &mut Window) -> anyhow::Result<bool> {
    let revoked = context.revoked.swap(false, Ordering::AcqRel);
    if revoked {
        window.clear();
    }
    let assigned = context.assigned.lock().expect("assigned lock").take();
    if let Some(partitions) = assigned {
        restore(config, &partitions, window)?;
    }
    Ok(revoked)
}

/// Reads `partitions`' changelog back into `window`.
fn restore(config: &Config, partitions: &[i32], window: &mut Window) -> anyhow::Result<()> {
    let started = Instant::now();
    let read = changelog::restore(config, partitions, window)?;
    info!(?partitions, read, entries = window.len(), took = ?started.elapsed(), "the join's window read back");
    Ok(())
}

/// One record of either topic into the window.
fn take(window: &mut Window, topics: &Topics, m: &BorrowedMessage<'_>, batch: &mut Batch) {
    let (p, is_label) = (m.partition(), m.topic() == topics.labels);
    batch.records += 1;
    batch.offsets.insert((is_label, p), m.offset() + 1);
    let record = m.payload().unwrap_or_default();
    let time = m.timestamp().to_millis().unwrap_or(0);
    let parsed = match is_label {
        true => records::label_id(record).map(|id| (id, time)),
        false => records::prediction_head(record),
    };
    let (id, time) = match parsed {
        Ok(head) => head,
        Err(why) => return batch.invalid.push((p, m.topic().to_string(), record.to_vec(), why)),
    };
    match is_label {
        true => {
            let before = batch.out.len();
            window.label(p, &id, record.into(), time, &mut batch.out);
            if batch.out[before..].iter().any(|o| matches!(o, Out::Joined { .. })) {
                batch.labels_joined_at.push(time);
            }
        }
        false => window.prediction(p, &id, record.into(), time, &mut batch.out),
    }
}

fn ending_name(ending: Ending) -> &'static str {
    match ending {
        Ending::Labeled => "labeled",
        Ending::Expired => "expired",
        Ending::ExpiredEarly => "expired_early",
    }
}
