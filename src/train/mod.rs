//! The trainer: a member of the consumer group over `events`, on its own OS
//! thread (parsing and gradients are CPU work). For each owned partition it
//! batches events, computes the progressive loss and the gradient against
//! the current serving snapshot, and appends a gradient record to `updates`.
//! It never changes weights itself.
//!
//! The trainer rule (DESIGN.md section 3): on assignment, wait until the
//! applier has read the log up to its end as of then, and start each new
//! partition at its applied watermark; keep at most K records in flight; when
//! a record of its own is rejected, seek back to the watermark.

mod context;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, info, warn};

pub use context::{Rebalanced, TrainerContext};

use crate::apply::applier::Progress;
use crate::apply::rule::check_gradient;
use crate::config::{Config, TrainConfig};
use crate::event::Example;
use crate::log::kafka;
use crate::log::record::{GradientRecord, Record, RecordMeta};
use crate::metrics::Metrics;
use crate::model::{Gradient, Model};
use crate::serving::Serving;

/// A record sent and not yet applied (or rejected).
#[derive(Debug, Clone, Copy)]
struct InFlight {
    from: i64,
    to: i64,
    sent: Instant,
}

/// Events taken from a partition and not yet sent as a record.
#[derive(Debug, Default)]
struct Batch {
    examples: Vec<Example>,
    /// Invalid events: counted, learned from by no one.
    skipped: u32,
    oldest_ts: i64,
    /// Offset after its last event: the record's `to`, once closed.
    to: i64,
}

impl Batch {
    fn len(&self) -> usize {
        self.examples.len() + self.skipped as usize
    }
}

/// Closed batches a partition may hold while K records are in flight. Reading
/// on into them keeps the fetch streaming without a seek; past them the
/// partition blocks.
const WAITING_LIMIT: usize = 32;

/// What the trainer knows of one partition it owns.
#[derive(Debug)]
struct Partition {
    /// `from` of the next record: the previous record's `to`.
    next_from: i64,
    /// Offset after the last event taken.
    end: i64,
    /// The batch events go into; closed when full or `max_wait` old.
    open: Batch,
    /// When the open batch took its first event: it closes `max_wait` later.
    first_at: Option<Instant>,
    /// Closed batches waiting for a slot among the K in flight, oldest first.
    /// A gradient is computed when its batch is sent, against the newest
    /// weights, so staleness stays bounded by K.
    waiting: VecDeque<Batch>,
    in_flight: VecDeque<InFlight>,
    /// `WAITING_LIMIT` batches wait: events are refused until one is sent,
    /// then the partition is sought back to `end`. (Not `pause`: librdkafka
    /// drops what it had fetched for a paused partition.)
    blocked: bool,
    /// Assigned before the applier had read the log to this position: no
    /// event is taken until it has, then the partition restarts at the
    /// watermark it has by then. (Learning from a stale watermark would only
    /// append records that every replica rejects.)
    hold_until: Option<i64>,
}

impl Partition {
    fn at(watermark: i64) -> Partition {
        Partition {
            next_from: watermark,
            end: watermark,
            open: Batch::default(),
            first_at: None,
            waiting: VecDeque::new(),
            in_flight: VecDeque::new(),
            blocked: false,
            hold_until: None,
        }
    }
    /// Closes the open batch (if it holds anything) and queues it to be sent.
    fn close(&mut self) {
        self.first_at = None;
        if self.open.len() > 0 {
            let mut batch = std::mem::take(&mut self.open);
            batch.to = self.end;
            self.waiting.push_back(batch);
        }
    }

    /// Whether the event at `offset` is one to take: at or after `end`.
    /// One before it was fetched before a seek back, or is redelivered when
    /// librdkafka restarts a fetch at an earlier position; it is not ours to
    /// learn again. One beyond `end` follows a gap (transaction markers,
    /// compaction, retention), which the next record's range covers.
    fn takes(&self, offset: i64) -> bool {
        offset >= self.end
    }

    /// Blocked or held: events are refused, fetched again after a seek.
    fn refusing(&self) -> bool {
        self.blocked || self.hold_until.is_some()
    }
}

/// A record produce failure, reported by the producer's delivery callback.
pub type DeliveryFailures = Arc<Mutex<Vec<(i32, i64, i64)>>>;

pub struct Trainer {
    pub model: Arc<Model>,
    pub serving: Serving,
    pub consumer: BaseConsumer<TrainerContext>,
    pub producer: ThreadedProducer<context::DeliveryContext>,
    pub failures: DeliveryFailures,
    /// Writes invalid events to `dlq_topic`.
    pub dead_letters: ThreadedProducer<context::DeadLetterContext>,
    pub dlq_topic: String,
    pub config: TrainConfig,
    pub events_topic: String,
    pub updates_topic: String,
    pub replica_id: String,
    pub metrics: Arc<Metrics>,
    pub progress: Arc<Progress>,
    pub stop: Arc<AtomicBool>,
    partitions: HashMap<i32, Partition>,
}

impl Trainer {
    /// Builds the consumer (joining no group yet) and the producer.
    pub fn new(
        config: &Config,
        model: Arc<Model>,
        serving: Serving,
        metrics: Arc<Metrics>,
        progress: Arc<Progress>,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<Trainer> {
        let k = &config.kafka;
        let mut c = kafka::base_config(&k.brokers, &config.replica_id);
        c.set("group.id", &k.group_id)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", k.session_timeout_ms.to_string())
            // Frequent heartbeats: a member learns of a rebalance (a peer left)
            // on its next heartbeat, and a hand-over should take well under 2 s.
            .set("heartbeat.interval.ms", (k.session_timeout_ms / 10).clamp(100, 1000).to_string())
            .set("fetch.wait.max.ms", "10")
            // Also bounds how long librdkafka waits on a JoinGroup before it
            // retries (the default is five minutes). The rebalance callback
            // blocks poll for at most CATCH_UP_LIMIT plus a watermark query,
            // well under this.
            .set("max.poll.interval.ms", "10000");
        if !k.group_instance_id.is_empty() {
            c.set("group.instance.id", &k.group_instance_id);
        }
        let context = TrainerContext::new(k.updates_topic.clone(), progress.clone(), stop.clone());
        let consumer: BaseConsumer<TrainerContext> = c.create_with_context(context)?;
        let failures = DeliveryFailures::default();
        let producer = kafka::producer_config(&k.brokers, &config.replica_id)
            .create_with_context(context::DeliveryContext { failures: failures.clone() })?;
        let dead_letters = kafka::producer_config(&k.brokers, &format!("{}-dlq", config.replica_id))
            .create_with_context(context::DeadLetterContext { metrics: metrics.clone() })?;
        Ok(Trainer {
            model,
            serving,
            consumer,
            producer,
            failures,
            dead_letters,
            dlq_topic: k.dlq_topic.clone(),
            config: config.train.clone(),
            events_topic: k.events_topic.clone(),
            updates_topic: k.updates_topic.clone(),
            replica_id: config.replica_id.clone(),
            metrics,
            progress,
            stop,
            partitions: HashMap::new(),
        })
    }

    pub fn run(mut self) -> anyhow::Result<()> {
        self.consumer.subscribe(&[&self.events_topic])?;
        info!(topic = %self.events_topic, "trainer joined the consumer group");
        let max_wait = Duration::from_millis(self.config.max_wait_ms);
        let commit_every = Duration::from_millis(self.config.commit_interval_ms);
        let mut last_commit = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            if let Some((partition, offset, payload)) = self.next_event(Duration::from_millis(5)) {
                self.take_rebalances();
                self.take_event(partition, offset, &payload);
                // Drain what is already fetched before looking at timers.
                for _ in 0..self.config.batch_size {
                    let Some((partition, offset, payload)) = self.next_event(Duration::ZERO) else { break };
                    self.take_rebalances();
                    self.take_event(partition, offset, &payload);
                }
            }
            self.take_rebalances();
            self.follow_applier();
            let due: Vec<i32> = (self.partitions.iter())
                .filter(|(_, p)| p.first_at.is_some_and(|t| t.elapsed() >= max_wait))
                .map(|(&id, _)| id)
                .collect();
            for id in due {
                if let Some(p) = self.partitions.get_mut(&id) {
                    p.close();
                }
                self.send_waiting(id);
            }
            if last_commit.elapsed() >= commit_every {
                self.commit(CommitMode::Async);
                last_commit = Instant::now();
            }
        }
        self.shut_down();
        Ok(())
    }

    /// Graceful stop: send what is batched, flush the producer, then leave
    /// the group so the partitions move at once.
    fn shut_down(mut self) {
        let ids: Vec<i32> = self.partitions.keys().copied().collect();
        for id in ids {
            self.partitions.get_mut(&id).expect("owned").close();
            // What does not fit in flight is left to whoever takes the partition.
            self.send_waiting(id);
        }
        let _ = self.producer.flush(Duration::from_secs(10));
        let _ = self.dead_letters.flush(Duration::from_secs(10));
        self.commit(CommitMode::Sync);
        self.consumer.unsubscribe();
        drop(self.consumer);
        info!("trainer left the consumer group");
    }

    /// The next event fetched, as (partition, offset, payload). Rebalance
    /// callbacks run inside this poll.
    fn next_event(&self, timeout: Duration) -> Option<(i32, i64, Vec<u8>)> {
        match self.consumer.poll(timeout)? {
            Ok(m) => Some((m.partition(), m.offset(), m.payload().unwrap_or(&[]).to_vec())),
            Err(e) => {
                warn!(error = %e, "consumer error");
                None
            }
        }
    }

    fn take_rebalances(&mut self) {
        for event in self.consumer.context().take_events() {
            match event {
                Rebalanced::Assigned(list, hold) => {
                    for (id, watermark) in list {
                        info!(partition = id, watermark, "partition assigned");
                        let mut p = Partition::at(watermark);
                        p.hold_until = hold;
                        self.partitions.insert(id, p);
                    }
                }
                Rebalanced::Revoked(list) => {
                    for id in list {
                        info!(partition = id, "partition revoked");
                        self.partitions.remove(&id);
                        let _ = self.metrics.consumer_lag.remove_label_values(&[&id.to_string()]);
                    }
                }
            }
        }
    }

    fn take_event(&mut self, id: i32, offset: i64, payload: &[u8]) {
        let Some(p) = self.partitions.get_mut(&id) else { return };
        if p.refusing() {
            return;
        }
        if !p.takes(offset) {
            return;
        }
        if offset > p.end {
            // Legitimate with transactions or compaction; worth seeing otherwise.
            debug!(partition = id, expected = p.end, offset, "gap in the events partition");
        }
        self.metrics.events_consumed.inc();
        match self.model.featurizer().event(payload) {
            Ok(example) => {
                if let Some(ts) = example.ts.filter(|&ts| ts > 0) {
                    p.open.oldest_ts = if p.open.oldest_ts == 0 { ts } else { p.open.oldest_ts.min(ts) };
                }
                p.open.examples.push(example);
            }
            Err(e) => {
                self.metrics.events_invalid.inc();
                debug!(partition = id, offset, error = %e, "invalid event: to the dead-letter topic");
                p.open.skipped += 1;
                self.dead_letter(id, offset, payload, &e);
            }
        }
        let Some(p) = self.partitions.get_mut(&id) else { return };
        p.end = offset + 1;
        p.first_at.get_or_insert_with(Instant::now);
        if p.open.len() >= self.config.batch_size {
            p.close();
            if p.waiting.len() >= WAITING_LIMIT {
                debug!(partition = id, end = p.end, "max in flight and batches waiting: blocking");
                p.blocked = true;
            }
            self.send_waiting(id);
        }
    }

    /// Writes an invalid event to the dead-letter topic: the payload as it
    /// came, the reason, source topic, partition and offset in headers, and
    /// `partition:offset` as the key. After a seek back the same event may be
    /// written again, under the same key (a compacted topic keeps one). A
    /// delivery failure is logged and counted, not retried: the event's range
    /// is learned, and the partition moves on.
    fn dead_letter(&self, partition: i32, offset: i64, payload: &[u8], error: &crate::event::SchemaError) {
        let (reason, offset_text, partition_text) = (error.to_string(), offset.to_string(), partition.to_string());
        let headers = OwnedHeaders::new()
            .insert(Header { key: "tributary.reason", value: Some(reason.as_str()) })
            .insert(Header { key: "tributary.reason_kind", value: Some(error.kind()) })
            .insert(Header { key: "tributary.topic", value: Some(self.events_topic.as_str()) })
            .insert(Header { key: "tributary.partition", value: Some(partition_text.as_str()) })
            .insert(Header { key: "tributary.offset", value: Some(offset_text.as_str()) })
            .insert(Header { key: "tributary.replica", value: Some(self.replica_id.as_str()) });
        let key = format!("{partition}:{offset}");
        let record = BaseRecord::with_opaque_to(&self.dlq_topic, Box::new((partition, offset)))
            .payload(payload)
            .key(&key)
            .headers(headers);
        if let Err((e, _)) = self.dead_letters.send(record) {
            warn!(partition, offset, error = %e, "dead letter not queued");
            self.metrics.dead_letters.with_label_values(&["failed"]).inc();
        }
    }

    /// Sends waiting batches of partition `id` while fewer than K records
    /// are in flight.
    fn send_waiting(&mut self, id: i32) {
        let k = self.config.max_in_flight;
        while let Some(batch) =
            self.partitions.get_mut(&id).filter(|p| p.in_flight.len() < k).and_then(|p| p.waiting.pop_front())
        {
            if let Err(batch) = self.send(id, batch) {
                // Nothing was sent: keep the batch, try again at the next tick.
                self.partitions.get_mut(&id).expect("owned").waiting.push_front(batch);
                return;
            }
        }
    }

    /// Sends `batch` of partition `id` as one gradient record; gives it back
    /// if the producer's queue refuses it.
    fn send(&mut self, id: i32, batch: Batch) -> Result<(), Batch> {
        let Some(p) = self.partitions.get_mut(&id) else { return Ok(()) };
        let snapshot = self.serving.load_full();
        let mut gradient = match self.model.gradient_at(Some(snapshot.position), &snapshot.weights, &batch.examples) {
            Ok(g) => g,
            Err(e) => {
                if !batch.examples.is_empty() {
                    warn!(partition = id, error = %e, "gradient failed; batch skipped");
                }
                Gradient::default()
            }
        };
        let mut examples = batch.examples.len() as u32;
        let mut skipped = batch.skipped;
        // The applier would reject this record, and a retry would compute the
        // same gradient: skip the batch instead, so the partition moves on.
        let max_norm = self.model.config().max_grad_norm;
        if let Err(reason) = check_gradient(self.model.params(), max_norm, &gradient.tensors)
            .and_then(|()| gradient.loss_sum.is_finite().then_some(()).ok_or(crate::apply::rule::Reject::NonFinite))
        {
            warn!(
                partition = id,
                from = p.next_from,
                to = batch.to,
                reason = reason.as_str(),
                "gradient refused; batch skipped"
            );
            skipped += examples;
            examples = 0;
            gradient = Gradient::default();
        }
        let meta = RecordMeta {
            fingerprint: self.model.fingerprint(),
            partition: id,
            from: p.next_from,
            to: batch.to,
            base: snapshot.position,
            examples,
            skipped,
            oldest_ts: batch.oldest_ts,
            producer: self.replica_id.clone(),
        };
        let bytes = Record::Gradient(GradientRecord::new(meta, gradient)).encode();
        let key = id.to_be_bytes();
        let opaque = Box::new((id, p.next_from, batch.to));
        let record = BaseRecord::with_opaque_to(&self.updates_topic, opaque).payload(&bytes).key(&key);
        match self.producer.send(record) {
            Ok(()) => {
                self.metrics.records_produced.inc();
                p.in_flight.push_back(InFlight { from: p.next_from, to: batch.to, sent: Instant::now() });
                p.next_from = batch.to;
                Ok(())
            }
            Err((e, _)) => {
                warn!(partition = id, error = %e, "cannot queue gradient record");
                Err(batch)
            }
        }
    }

    /// Retires records the applier applied; seeks back after a rejection of
    /// one of ours, a delivery failure, or when another trainer moved the
    /// watermark (a rebalance overlap); sends waiting batches into the freed
    /// slots and unblocks partitions.
    fn follow_applier(&mut self) {
        let (position, watermarks, rejected) = {
            let mut applied = self.progress.applied.lock().expect("progress lock");
            (applied.position, applied.watermarks.clone(), std::mem::take(&mut applied.rejected_own))
        };
        let failed = std::mem::take(&mut *self.failures.lock().expect("failures lock"));
        let (mut reseek, mut sendable) = (Vec::new(), Vec::new());
        for (&id, p) in self.partitions.iter_mut() {
            let wm = watermarks.get(&id).copied().unwrap_or(0);
            if let Some(until) = p.hold_until {
                if position >= until {
                    info!(partition = id, watermark = wm, "the applier caught up: starting the held partition");
                    reseek.push((id, wm));
                }
                continue;
            }
            while let Some(r) = p.in_flight.front().filter(|r| r.to <= wm) {
                self.metrics.record_round_trip.observe(r.sent.elapsed().as_secs_f64());
                p.in_flight.pop_front();
            }
            let ours = |&(pid, from, to): &(i32, i64, i64)| {
                pid == id && p.in_flight.iter().any(|r| r.from == from && r.to == to)
            };
            let lost = rejected.iter().any(ours) || failed.iter().any(ours);
            let stale = p.in_flight.front().is_some_and(|r| r.sent.elapsed() > Duration::from_secs(30));
            // Our view is consistent iff our next record continues the
            // watermark, directly or through records still in flight.
            let expected_wm = p.in_flight.front().map_or(p.next_from, |r| r.from);
            if lost || stale || expected_wm != wm && p.in_flight.is_empty() {
                reseek.push((id, wm));
            } else {
                sendable.push(id);
            }
        }
        for (id, wm) in reseek {
            self.seek_back(id, wm);
        }
        for id in sendable {
            self.send_waiting(id);
            let p = self.partitions.get_mut(&id).expect("owned");
            if p.blocked && p.waiting.len() < WAITING_LIMIT {
                let end = p.end;
                if self.seek(id, end) {
                    debug!(partition = id, end, "unblocked");
                    self.partitions.get_mut(&id).expect("owned").blocked = false;
                }
            }
        }
    }

    /// Sends partition `id` back to the applied watermark, dropping what was
    /// batched and in flight.
    fn seek_back(&mut self, id: i32, watermark: i64) {
        info!(partition = id, watermark, "seeking back to the applied watermark");
        if self.seek(id, watermark) {
            self.partitions.insert(id, Partition::at(watermark));
        }
    }

    /// Makes `offset` the next event fetched from partition `id`. Events
    /// fetched before are discarded by librdkafka once this returns.
    fn seek(&self, id: i32, offset: i64) -> bool {
        let mut tpl = TopicPartitionList::new();
        let result = (tpl.add_partition_offset(&self.events_topic, id, Offset::Offset(offset)))
            .and_then(|()| self.consumer.seek_partitions(tpl, Duration::from_secs(5)))
            .and_then(|tpl| tpl.elements().first().and_then(|e| e.error().err()).map_or(Ok(()), Err));
        if let Err(e) = &result {
            warn!(partition = id, offset, error = %e, "seek failed; will retry");
        }
        result.is_ok()
    }

    /// Commits the applied watermarks of owned partitions as the group's
    /// offsets, and refreshes the lag gauges.
    fn commit(&mut self, mode: CommitMode) {
        let watermarks: BTreeMap<i32, i64> = self.progress.applied.lock().expect("progress lock").watermarks.clone();
        let mut tpl = TopicPartitionList::new();
        for &id in self.partitions.keys() {
            if let Some(&wm) = watermarks.get(&id) {
                let _ = tpl.add_partition_offset(&self.events_topic, id, Offset::Offset(wm));
            }
            if let Ok((_, high)) = self.consumer.fetch_watermarks(&self.events_topic, id, Duration::from_millis(500)) {
                let lag = high - watermarks.get(&id).copied().unwrap_or(0);
                self.metrics.consumer_lag.with_label_values(&[&id.to_string()]).set(lag.max(0));
            }
        }
        if tpl.count() > 0 {
            if let Err(e) = self.consumer.commit(&tpl, mode) {
                debug!(error = %e, "offset commit failed; the next one catches up");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_takes_its_next_offset_and_crosses_gaps_but_never_goes_back() {
        let mut p = Partition::at(100);
        assert!(!p.takes(99), "fetched before the seek, or redelivered");
        assert!(p.takes(100));
        p.end = 101;
        // Offsets 101..=149 are transaction markers or compacted away.
        assert!(p.takes(150));
        p.end = 151;
        assert!(!p.takes(150), "a redelivery after a fetch restart is not learned twice");
    }
}
