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
//! Owns the loop: batches read ([`reader`]), decided by the window
//! ([`window`], on the partitions' time, [`clock`]) and committed
//! ([`writer`]); reads the served model's featurizer only to build and
//! check events.

mod changelog;
mod clock;
mod reader;
mod records;
mod window;
mod writer;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use tracing::{info, warn};

use self::reader::Reader;
use self::window::{Ending, Out, Window};
use self::writer::Writer;
use crate::config::Config;
use crate::event::Featurizer;
use crate::lifecycle::StopRequest;
use crate::metrics::{JoinMetrics, Metrics};
use crate::telemetry::unix_ms;

/// A batch (one transaction) ends this long after its first record: the
/// label's wait to be joined and learnable, on top of the commit.
const BATCH_TIME: Duration = Duration::from_millis(20);
/// ... or at this many records read.
const BATCH_RECORDS: usize = 5000;
/// How long the joiner waits for a first record before it moves the
/// partitions' time on without one.
const IDLE_POLL: Duration = Duration::from_millis(100);

/// What one batch read and decided, committed together.
#[derive(Default)]
pub struct Batch {
    out: Vec<Out>,
    /// Next offset per `(topic is labels, partition)`.
    offsets: HashMap<(bool, i32), i64>,
    /// Record times of the labels that joined a prediction in this batch.
    labels_joined_at: Vec<i64>,
    /// Records not of their topic's form: `(partition, is label, record, why)`.
    invalid: Vec<(i32, bool, Vec<u8>, String)>,
    records: usize,
}

pub struct Joiner {
    config: Arc<Config>,
    reader: Reader,
    writer: Writer,
    window: Window,
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
        let f = &config.feedback;
        Ok(Joiner {
            reader: Reader::new(&config)?,
            writer: Writer::new(&config, featurizer)?,
            window: Window::new(f.window_ms, f.max_open),
            metrics: metrics.join.clone(),
            stop,
            config,
        })
    }

    /// Joins until asked to stop; an error it cannot start again from
    /// (fenced, the changelog unreadable) ends the role.
    pub fn run(mut self) -> anyhow::Result<()> {
        self.writer.init().context("the join's transactional producer")?;
        self.reader.subscribe()?;
        info!(predictions = %self.reader.predictions, labels = %self.reader.labels, "joining");
        while !self.stop.is_requested() {
            let batch = self.read_batch()?;
            if batch.out.is_empty() && batch.offsets.is_empty() {
                continue;
            }
            let started = Instant::now();
            match self.commit(&batch) {
                Ok(()) => {
                    let took = started.elapsed();
                    tracing::debug!(records = batch.records, out = batch.out.len(), ?took, "join batch committed");
                    self.metrics.commit_duration.observe(took.as_secs_f64());
                    self.count(&batch)
                }
                Err(e) => self.start_over(e)?,
            }
        }
        self.writer.flush();
        Ok(())
    }

    /// Reads records for up to `BATCH_TIME` from the first, then moves
    /// every partition's time on and bounds the window. A revoke drops
    /// what was read so far: the consumer reads it again from the
    /// committed offsets.
    fn read_batch(&mut self) -> anyhow::Result<Batch> {
        let mut batch = Batch::default();
        let mut first: Option<Instant> = None;
        loop {
            let timeout = first.map_or(IDLE_POLL, |t| BATCH_TIME.saturating_sub(t.elapsed()));
            let polled = self.reader.poll(timeout).map(|m| m.map(|m| Record::of(&m, &self.reader.labels)));
            let rebalanced = self.reader.rebalanced()?;
            if rebalanced.revoked {
                self.window.clear();
                (batch, first) = (Batch::default(), None);
            }
            if let Some(partitions) = rebalanced.assigned {
                restore(&self.config, &partitions, &mut self.window)?;
            }
            match polled {
                None => break,
                Some(Err(e)) => warn!(error = %e, "the join's consumer"),
                Some(Ok(record)) => {
                    first.get_or_insert_with(Instant::now);
                    self.take(record, &mut batch);
                }
            }
            if batch.records >= BATCH_RECORDS || first.is_some_and(|t| t.elapsed() >= BATCH_TIME) {
                break;
            }
        }
        let now = unix_ms();
        for p in self.window.partitions() {
            let time = self.reader.time(p, now);
            if batch.records == 0 && self.window.len() > 0 {
                tracing::debug!(partition = p, behind_ms = now.saturating_sub(time), "the join idle, its time");
            }
            self.window.advance(p, time, &mut batch.out);
        }
        self.window.bound(&mut batch.out);
        Ok(batch)
    }

    /// One record of either topic into the window.
    fn take(&mut self, record: Record, batch: &mut Batch) {
        let Record { is_label, partition: p, offset, time, payload } = record;
        batch.records += 1;
        batch.offsets.insert((is_label, p), offset + 1);
        let parsed = match is_label {
            true => records::label_id(&payload).map(|id| (id, time)),
            false => records::prediction_head(&payload),
        };
        // A prediction's time is when it was served; any other record's,
        // its timestamp.
        let read_at = parsed.as_ref().map_or(time, |&(_, t)| t);
        self.reader.clock.read(is_label, p, offset, read_at);
        let (id, time) = match parsed {
            Ok(head) => head,
            Err(why) => return batch.invalid.push((p, is_label, payload, why)),
        };
        match is_label {
            true => {
                let before = batch.out.len();
                self.window.label(p, &id, payload.into(), time, &mut batch.out);
                if batch.out[before..].iter().any(|o| matches!(o, Out::Joined { .. })) {
                    batch.labels_joined_at.push(time);
                }
            }
            false => self.window.prediction(p, &id, payload.into(), time, &mut batch.out),
        }
    }

    /// The batch and its consumed offsets, in one transaction.
    fn commit(&self, batch: &Batch) -> Result<(), KafkaError> {
        let mut offsets = TopicPartitionList::new();
        for (&(is_label, p), &next) in &batch.offsets {
            offsets.add_partition_offset(self.reader.topic(is_label), p, Offset::Offset(next))?;
        }
        let group = self.reader.group().ok_or_else(|| KafkaError::Subscription("no group metadata yet".into()))?;
        self.writer.commit(batch, &offsets, &group)
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
        let now = unix_ms();
        for at in &batch.labels_joined_at {
            m.latency.observe((now - at).max(0) as f64 / 1000.0);
        }
        m.open.set(self.window.open() as i64);
        m.entries.set(self.window.len() as i64);
    }

    /// A transaction failed: it is aborted, and the joiner starts again
    /// from the last commit (the consumer at the committed offsets, the
    /// window read back). A fatal error (a fenced producer) ends the role.
    fn start_over(&mut self, error: KafkaError) -> anyhow::Result<()> {
        if matches!(&error, KafkaError::Transaction(e) if e.is_fatal()) {
            return Err(error).context("the join's transaction");
        }
        warn!(error = %error, "a join transaction failed; starting again from the last commit");
        self.metrics.transactions.with_label_values(&["aborted"]).inc();
        self.writer.abort().context("aborting the join's transaction")?;
        self.window.clear();
        let partitions = self.reader.rewind()?;
        restore(&self.config, &partitions, &mut self.window)
    }
}

/// A record read, owned: the consumer's borrow ends before the window
/// takes it.
struct Record {
    is_label: bool,
    partition: i32,
    offset: i64,
    /// The record's timestamp (ms).
    time: i64,
    payload: Vec<u8>,
}

impl Record {
    fn of(m: &BorrowedMessage<'_>, labels: &str) -> Record {
        Record {
            is_label: m.topic() == labels,
            partition: m.partition(),
            offset: m.offset(),
            time: m.timestamp().to_millis().unwrap_or(0),
            payload: m.payload().unwrap_or_default().to_vec(),
        }
    }
}

/// Reads `partitions`' changelog back into `window`.
fn restore(config: &Config, partitions: &[i32], window: &mut Window) -> anyhow::Result<()> {
    let started = Instant::now();
    let read = changelog::restore(config, partitions, window)?;
    info!(?partitions, read, entries = window.len(), took = ?started.elapsed(), "the join's window read back");
    Ok(())
}

fn ending_name(ending: Ending) -> &'static str {
    match ending {
        Ending::Labeled => "labeled",
        Ending::Expired => "expired",
        Ending::ExpiredEarly => "expired_early",
    }
}
