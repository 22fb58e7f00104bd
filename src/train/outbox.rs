//! The trainer's records side: a batch's gradient encoded as one record
//! within the size limit, produced to `updates`, and followed while in
//! flight until the applier applied it, or it was lost (refused by the
//! broker, rejected by the applier, or never heard of again).
//!
//! Owns the producer and what is in flight; knows nothing of events,
//! partitions or weights.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use tracing::{error, warn};

use super::context::DeliveryContext;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::model::Gradient;
use crate::update_log::kafka;
use crate::update_log::record::{EventRange, GradientRecord, Record, RecordMeta};

/// A record in flight longer than this is taken as lost.
const LOST_AFTER: Duration = Duration::from_secs(30);

/// A record the producer could not deliver, from its delivery callback.
#[derive(Debug, Clone, Copy)]
pub struct DeliveryFailure {
    /// The trainer's sequence number of the record.
    pub seq: u64,
    /// The broker refused it as larger than the topic's `max.message.bytes`.
    pub too_large: bool,
}

pub type DeliveryFailures = Arc<Mutex<Vec<DeliveryFailure>>>;

/// A record sent and not yet applied (or lost).
#[derive(Debug, Clone)]
struct InFlight {
    /// Numbers the trainer's records, for delivery reports.
    seq: u64,
    ranges: Vec<EventRange>,
    sent: Instant,
}

/// A batch's record, as encoded.
pub(super) enum Encoded {
    /// Within the size limit.
    Fits(Vec<u8>),
    /// One event whose gradient alone is over the limit: a record that
    /// skips it, without a gradient.
    SkipsAlone(Vec<u8>),
    /// Over the limit: the batch limit is halved; read the events again.
    Split,
}

pub(super) struct Outbox {
    producer: ThreadedProducer<DeliveryContext>,
    failures: DeliveryFailures,
    in_flight: VecDeque<InFlight>,
    next_seq: u64,
    /// Most events in the next batch: `batch_size`, halved while records
    /// come out larger than `max_record_bytes` (or the broker's limit),
    /// doubled back while they are small.
    batch_limit: usize,
    batch_size: usize,
    max_record_bytes: usize,
    topic: String,
    /// The replica's id: keys its records (`updates` has one partition,
    /// the key is for people).
    key: String,
    metrics: Arc<Metrics>,
}

impl Outbox {
    pub(super) fn new(config: &Config, metrics: Arc<Metrics>) -> anyhow::Result<Outbox> {
        let connection = kafka::Connection::of(&config.kafka)?;
        let failures = DeliveryFailures::default();
        // One record in flight has nothing to wait for batch-mates for.
        let producer = kafka::producer_config(&connection, &config.replica_id)
            .set("linger.ms", "0")
            .create_with_context(DeliveryContext { failures: failures.clone() })?;
        Ok(Outbox {
            producer,
            failures,
            in_flight: VecDeque::new(),
            next_seq: 0,
            batch_limit: config.train.batch_size,
            batch_size: config.train.batch_size,
            max_record_bytes: config.train.max_record_bytes,
            topic: config.kafka.updates_topic.clone(),
            key: config.replica_id.clone(),
            metrics,
        })
    }

    pub(super) fn batch_limit(&self) -> usize {
        self.batch_limit
    }

    pub(super) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Encodes `gradient` as a record, within `max_record_bytes`: a record
    /// over it halves the batch limit, or, for one event, skips the event,
    /// said, rather than trying it again for ever; a record under half of
    /// it doubles the limit back towards `batch_size`.
    pub(super) fn encode(&mut self, meta: RecordMeta, gradient: Gradient) -> Encoded {
        let events = (meta.examples + meta.skipped) as usize;
        let (ranges, examples, skipped) = (meta.ranges.clone(), meta.examples, meta.skipped);
        let bytes = Record::Gradient(GradientRecord::new(meta.clone(), gradient)).encode();
        let limit = self.max_record_bytes;
        if bytes.len() * 2 < limit {
            self.batch_limit = (self.batch_limit * 2).min(self.batch_size);
        }
        if bytes.len() <= limit {
            return Encoded::Fits(bytes);
        }
        self.metrics.trainer.records_too_large.inc();
        if events > 1 {
            self.batch_limit = (events / 2).max(1);
            warn!(
                bytes = bytes.len(),
                limit,
                events,
                batch_limit = self.batch_limit,
                "gradient record over the size limit: learning these events in smaller batches"
            );
            return Encoded::Split;
        }
        error!(
            ?ranges,
            bytes = bytes.len(),
            limit,
            "one event's gradient record is over the size limit: the event is skipped"
        );
        let skipped_alone = RecordMeta { examples: 0, skipped: skipped + examples, ..meta };
        Encoded::SkipsAlone(Record::Gradient(GradientRecord::new(skipped_alone, Gradient::default())).encode())
    }

    /// Queues `bytes` in the producer as the record of `ranges`; false if
    /// the producer's queue refuses it.
    pub(super) fn queue(&mut self, bytes: &[u8], ranges: Vec<EventRange>) -> bool {
        let seq = self.next_seq;
        let record = BaseRecord::with_opaque_to(&self.topic, Box::new(seq)).payload(bytes).key(self.key.as_bytes());
        if let Err((e, _)) = self.producer.send(record) {
            warn!(error = %e, "cannot queue gradient record");
            return false;
        }
        self.next_seq += 1;
        self.metrics.trainer.records_produced.inc();
        self.in_flight.push_back(InFlight { seq, ranges, sent: Instant::now() });
        true
    }

    /// The oldest record in flight, once `watermark` says each of its
    /// ranges is applied: no longer in flight; returns when it was sent.
    pub(super) fn pop_applied(&mut self, watermark: impl Fn(i32) -> i64) -> Option<Instant> {
        let r = self.in_flight.front().filter(|r| r.ranges.iter().all(|g| watermark(g.partition) >= g.to))?;
        let sent = r.sent;
        self.metrics.trainer.record_round_trip.observe(sent.elapsed().as_secs_f64());
        self.in_flight.pop_front();
        Some(sent)
    }

    /// Whether a record in flight is lost: the producer failed to deliver
    /// it, the applier rejected its ranges (`rejected`), or it is in flight
    /// for longer than `LOST_AFTER`. A record the broker refused as too
    /// large halves the batch limit.
    pub(super) fn take_lost(&mut self, rejected: &[Vec<EventRange>]) -> bool {
        let failed = std::mem::take(&mut *self.failures.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        if failed.iter().any(|f| f.too_large) {
            self.metrics.trainer.records_too_large.inc();
            self.batch_limit = (self.batch_limit / 2).max(1);
            warn!(batch_limit = self.batch_limit, "the broker refused a gradient record as too large: smaller batches");
        }
        let lost = |r: &InFlight| failed.iter().any(|f| f.seq == r.seq) || rejected.contains(&r.ranges);
        let stale = self.in_flight.front().is_some_and(|r| r.sent.elapsed() > LOST_AFTER);
        self.in_flight.iter().any(lost) || stale
    }

    /// Forgets every record in flight (their events are read again).
    pub(super) fn clear(&mut self) {
        self.in_flight.clear();
    }

    pub(super) fn flush(&self, timeout: Duration) {
        let _ = self.producer.flush(timeout);
    }
}
