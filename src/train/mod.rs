//! The trainer: a member of the consumer group over `events`, on its own OS
//! thread (parsing and gradients are CPU work). It reads ahead into a buffer
//! per partition, merges the partitions by event time into one batch,
//! computes the progressive loss and the gradient against the newest served
//! weights, and appends one gradient record with a `[from, to)` range per
//! partition to `updates`. It never changes weights itself.
//!
//! The trainer rule (docs/design.md section 4): on assignment, wait until the
//! applier has read the log up to its end as of then, and start each new
//! partition at its applied watermark; keep at most K records in flight;
//! when a record of its own is lost (rejected, undelivered), seek every
//! partition back to its watermark.
//!
//! Staleness, and why the batch spans partitions: a gradient computed at
//! version v and applied at offset o missed the `o - v` records in between.
//! With one record per trainer rather than per partition, and the next
//! gradient computed against the served weights with the trainer's own
//! records in flight stepped on (`overlay`: exactly as the applier will
//! step them), a lone replica learns exactly as a sequential learner would
//! with up to `max_in_flight` records in flight, its gradients computed
//! during its records' round trips; each further replica adds the records
//! it appends during a round trip. (Without the overlay, with
//! `staleness_scaling` or a TorchScript model, the next gradient waits until
//! the served weights include the trainer's previous record.) Batches
//! adapt: a batch is formed when a record can be sent, from what was read
//! since, up to `batch_size`, so they are large from a backlog and small
//! (fresh) when live.
//!
//! Why merge by event time: see `read_ahead`.

mod context;
mod dead_letter;
mod fetch;
pub mod overlay;
mod read_ahead;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, error, info, warn};

pub use context::{Rebalanced, TrainerContext};

use self::dead_letter::{DeadLetters, Refusal};
use self::fetch::{Fetched, Fetcher};
use self::overlay::{Overlaid, Overlay};
use self::read_ahead::{aligned_bound, event_time, merge_by_event_time, Batch, Partition, ReadAhead, Source};
use crate::apply::progress::Progress;
use crate::config::{Config, TrainConfig};
use crate::event::{EventCodec, Example};
use crate::lifecycle::StopRequest;
use crate::metrics::Metrics;
use crate::model::{Gradient, Model};
use crate::snapshot::{Serving, Snapshot};
use crate::state::check_gradient;
use crate::update_log::kafka;
use crate::update_log::record::{EventRange, GradientRecord, Record, RecordMeta};

/// The weights a gradient is computed at.
enum At<'a> {
    /// The served snapshot.
    Served(&'a Snapshot),
    /// The served snapshot with the trainer's records in flight stepped on.
    Overlaid(Overlaid<'a>),
}

/// A record sent and not yet applied (or lost).
#[derive(Debug, Clone)]
struct InFlight {
    /// Numbers the trainer's records, for delivery reports.
    seq: u64,
    ranges: Vec<EventRange>,
    sent: Instant,
}

/// Events read ahead, over all partitions: enough for every partition of a
/// backlog to be present when a batch is merged (a producer batch is up to
/// a megabyte, about 3 000 events of the load report's stream), and a few
/// megabytes of parsed events. Each partition is read from its own queue
/// while it has less than its share (`partition_read_ahead`).
const READ_AHEAD: usize = 32_768;

/// A partition's share of the read-ahead stays within these: a batch's
/// worth at least, and no more than the merge needs of one partition.
const PARTITION_READ_AHEAD: std::ops::RangeInclusive<usize> = 1024..=4096;

/// How long the merge waits for a partition with events still to fetch
/// before it merges without it (its events then come later than their
/// event time). A fetch takes milliseconds; this covers a slow leader, and a
/// partition whose end is a transaction marker (no event to fetch up to
/// the high watermark), which holds once per position only.
const MAX_HOLD: Duration = Duration::from_millis(100);

/// How long a trainer with every event read past the fleet's bound waits
/// before it learns a batch regardless (see `send_batches`).
const MAX_ALIGNMENT_WAIT: Duration = Duration::from_millis(50);

/// How long a commit may spend asking the broker for its partitions' ends
/// (for the lag), on the poll thread; one more ask may run 500 ms over.
const LAG_QUERY_BUDGET: Duration = Duration::from_millis(1000);

/// Bytes a fetch takes from one events partition, at least one producer
/// batch (librdkafka's default is 1 MB).
const TRAINER_PARTITION_FETCH_BYTES: usize = 64 * 1024;

/// The stages of a trainer's record cycle, timed in
/// `tributary_trainer_stage_seconds`: where the learning rate goes.
#[derive(Debug, Clone, Copy)]
enum Stage {
    /// Taking a batch from the read-ahead, merged by event time.
    Merge,
    /// Loading the served weights; the progressive loss and the gradient.
    Gradient,
    /// Encoding the record and queueing it in the producer.
    Send,
    /// Queued to seen applied: produce (`acks=all`), the broker, the
    /// applier's fetch, decode and apply.
    Applied,
    /// Seen applied to seen served: the swap, and the trainer's loop
    /// noticing.
    Served,
    /// Seen served to the next batch's start: waiting for events.
    Starved,
}

impl Stage {
    fn as_str(self) -> &'static str {
        match self {
            Stage::Merge => "merge",
            Stage::Gradient => "gradient",
            Stage::Send => "send",
            Stage::Applied => "applied",
            Stage::Served => "served",
            Stage::Starved => "starved",
        }
    }
}

/// A record the producer could not deliver, from its delivery callback.
#[derive(Debug, Clone, Copy)]
pub struct DeliveryFailure {
    /// The trainer's sequence number of the record.
    pub seq: u64,
    /// The broker refused it as larger than the topic's `max.message.bytes`.
    pub too_large: bool,
}

pub type DeliveryFailures = Arc<Mutex<Vec<DeliveryFailure>>>;

pub struct Trainer {
    model: Arc<Model>,
    /// JSON or Avro (`kafka.event_format`).
    events: EventCodec,
    serving: Serving,
    consumer: Arc<BaseConsumer<TrainerContext>>,
    /// The partitions' queues, read from the same consumer.
    fetcher: Fetcher,
    producer: ThreadedProducer<context::DeliveryContext>,
    failures: DeliveryFailures,
    /// Where events it cannot learn go, with why.
    dead_letters: DeadLetters,
    config: TrainConfig,
    events_topic: String,
    updates_topic: String,
    replica_id: String,
    metrics: Arc<Metrics>,
    progress: Arc<Progress>,
    stop: StopRequest,
    /// Whether the served weights follow the log once ready (swaps on): a
    /// gradient then waits for the trainer's previous record to be served.
    follows_served: bool,
    partitions: HashMap<i32, Partition>,
    in_flight: VecDeque<InFlight>,
    /// The trainer's records not yet served, stepped onto the weights its
    /// gradients see (`Config::trainer_overlaps`); `None`: each gradient
    /// waits until the served weights include its previous record.
    overlay: Option<Overlay>,
    next_seq: u64,
    /// When the last record was seen applied: the wait for it to be served
    /// is the cycle's `served` stage.
    retired_at: Option<Instant>,
    /// When the last record was seen served: the wait for events to batch
    /// from there is the cycle's `starved` stage.
    served_at: Option<Instant>,
    /// The served version that includes the trainer's last applied record;
    /// the next gradient is computed at it or later.
    see_from: i64,
    /// The applier's count of state jumps (rollbacks, restores), as last seen.
    state_jumps_seen: u64,
    /// The partition whose lag a commit asked about last.
    lag_cursor: i32,
    /// Most events in the next batch: `batch_size`, halved while records
    /// come out larger than `max_record_bytes` (or the broker's limit),
    /// doubled back while they are small.
    batch_limit: usize,
    /// `events_topic` for librdkafka's C API.
    events_topic_c: std::ffi::CString,
    /// Since when the merge waits for a partition (see [`Partition::holds`]).
    held_since: Option<Instant>,
    /// Since when every event read is past the fleet's bound.
    aligned_since: Option<Instant>,
}

impl Trainer {
    /// Builds the consumer (joining no group yet) and the producer.
    pub fn new(
        config: &Config,
        model: Arc<Model>,
        serving: Serving,
        metrics: Arc<Metrics>,
        progress: Arc<Progress>,
        stop: StopRequest,
    ) -> anyhow::Result<Trainer> {
        let k = &config.kafka;
        let connection = kafka::Connection::of(k)?;
        let mut c = kafka::base_config(&connection, &config.replica_id);
        c.set("group.id", &k.group_id)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", k.session_timeout_ms.to_string())
            // Frequent heartbeats: a member learns of a rebalance (a peer left)
            // on its next heartbeat, and a hand-over should take well under 2 s.
            .set("heartbeat.interval.ms", (k.session_timeout_ms / 10).clamp(100, 1000).to_string())
            .set("fetch.wait.max.ms", "10")
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
            .set("queued.min.messages", fetch::QUEUED_PER_PARTITION.to_string())
            .set("queued.max.messages.kbytes", fetch::QUEUED_KBYTES_PER_PARTITION.to_string())
            .set("fetch.queue.backoff.ms", "10");
        if !k.group_instance_id.is_empty() {
            c.set("group.instance.id", &k.group_instance_id);
        }
        let context = TrainerContext::new(k.updates_topic.clone(), progress.clone(), stop.clone());
        let consumer: Arc<BaseConsumer<TrainerContext>> = Arc::new(c.create_with_context(context)?);
        let failures = DeliveryFailures::default();
        // One record in flight has nothing to wait for batch-mates for.
        let producer = kafka::producer_config(&connection, &config.replica_id)
            .set("linger.ms", "0")
            .create_with_context(context::DeliveryContext { failures: failures.clone() })?;
        let dead_letters = DeadLetters::new(&connection, config, metrics.clone())?;
        let state_jumps_seen = progress.applied().state_jumps;
        Ok(Trainer {
            events: EventCodec::new(k).map_err(anyhow::Error::msg)?,
            model,
            serving,
            fetcher: Fetcher::new(consumer.clone(), &k.events_topic, progress.clone()),
            consumer,
            producer,
            failures,
            dead_letters,
            config: config.train.clone(),
            events_topic: k.events_topic.clone(),
            updates_topic: k.updates_topic.clone(),
            replica_id: config.replica_id.clone(),
            metrics,
            progress,
            stop,
            follows_served: config.apply.max_swaps_per_sec > 0.0,
            partitions: HashMap::new(),
            in_flight: VecDeque::new(),
            overlay: config.trainer_overlaps().then(Overlay::default),
            next_seq: 0,
            see_from: 0,
            retired_at: None,
            served_at: None,
            batch_limit: config.train.batch_size,
            state_jumps_seen,
            lag_cursor: -1,
            events_topic_c: std::ffi::CString::new(k.events_topic.as_str())?,
            held_since: None,
            aligned_since: None,
        })
    }

    pub fn run(mut self) -> anyhow::Result<()> {
        self.consumer.subscribe(&[&self.events_topic])?;
        info!(topic = %self.events_topic, "trainer joined the consumer group");
        let commit_every = Duration::from_millis(self.config.commit_interval_ms);
        let mut last_commit = Instant::now();
        while !self.stop.is_requested() {
            if self.progress.applied().stalled {
                self.leave_while_stalled();
                return Ok(());
            }
            let taken = self.take_fetched();
            self.take_rebalances();
            self.follow_applier();
            self.note_served();
            let sent = self.send_batches();
            if taken == 0 && sent == 0 {
                // Woken by the applier's progress or by events arriving in
                // a partition's queue; short while a record is in flight.
                let wait = if self.in_flight.is_empty() { 5 } else { 1 };
                self.progress.wait_changed(Duration::from_millis(wait));
            }
            if last_commit.elapsed() >= commit_every {
                self.commit(CommitMode::Async);
                last_commit = Instant::now();
                // The commit's lag queries block this thread (up to
                // LAG_QUERY_BUDGET): a wait for a partition counts from
                // when polling resumes, not the time spent here.
                if self.held_since.is_some() {
                    self.held_since = Some(last_commit);
                }
            }
        }
        self.shut_down();
        Ok(())
    }

    /// The applier stopped applying: this replica's weights are behind the
    /// log, or not the fleet's, so its gradients must not reach the log and
    /// its partitions belong with healthy replicas. Leaves the consumer
    /// group at once (they move within a rebalance, not a session timeout),
    /// sends nothing more and commits nothing, and waits for the stop.
    fn leave_while_stalled(&mut self) {
        error!("the applier stopped applying the update log: the trainer leaves the consumer group");
        self.consumer.unsubscribe();
        self.fetcher.forget_all();
        self.partitions.clear();
        self.in_flight.clear();
        self.overlay.iter_mut().for_each(Overlay::clear);
        // Polled on, so that librdkafka serves the leave (and a join still
        // in flight when it was asked) instead of holding the partitions
        // until the member is evicted; whatever it hands over is dropped.
        while !self.stop.is_requested() {
            let _ = self.fetcher.poll_consumer(Duration::from_millis(200));
            let _ = self.consumer.context().take_events();
        }
    }

    /// Graceful stop: send what was read while a slot is free, flush the
    /// producer, then leave the group so the partitions move at once.
    fn shut_down(mut self) {
        // What does not fit in flight is left to whoever takes the partitions.
        self.follows_served = false;
        self.send_batches();
        let _ = self.producer.flush(Duration::from_secs(10));
        self.dead_letters.flush(Duration::from_secs(10));
        self.commit(CommitMode::Sync);
        self.consumer.unsubscribe();
        // The last holder of the consumer: it closes here.
        drop(self.fetcher);
        drop(self.consumer);
        info!("trainer left the consumer group");
    }

    /// Takes what was fetched into the read-ahead: first whatever is in the
    /// consumer's own queue (events fetched before their partition's queue
    /// was split come before that queue's), then from each partition's
    /// queue until its read-ahead holds its share or the queue is empty.
    /// Returns the events taken.
    fn take_fetched(&mut self) -> usize {
        let mut taken = 0;
        while let Some(fetched) = self.fetcher.poll_consumer(Duration::ZERO) {
            self.take_rebalances();
            self.take_event(fetched);
            taken += 1;
        }
        self.take_rebalances();
        let share = self.partition_read_ahead();
        let short: Vec<i32> =
            (self.partitions.iter()).filter(|(_, p)| p.read_ahead.len() < share).map(|(&id, _)| id).collect();
        for id in short {
            while self.partitions.get(&id).is_some_and(|p| p.read_ahead.len() < share) {
                let Some(fetched) = self.fetcher.poll_partition(id) else { break };
                self.take_event(fetched);
                taken += 1;
            }
        }
        taken
    }

    /// Events to read ahead of each partition: an equal share of
    /// `READ_AHEAD`, within `PARTITION_READ_AHEAD`.
    fn partition_read_ahead(&self) -> usize {
        let share = READ_AHEAD / self.partitions.len().max(1);
        share.clamp(*PARTITION_READ_AHEAD.start(), *PARTITION_READ_AHEAD.end())
    }

    /// Notes each partition's high watermark as librdkafka last fetched it
    /// (from its cache: no request to the broker).
    fn note_fetched_ends(&mut self) {
        let client = self.consumer.client().native_ptr();
        for (&id, p) in self.partitions.iter_mut() {
            let (mut low, mut high) = (-1i64, -1i64);
            // SAFETY: the client lives as long as `self.consumer`; the topic
            // is a NUL-terminated string that outlives the call; librdkafka
            // only writes the two offsets.
            let err = unsafe {
                rdkafka::bindings::rd_kafka_get_watermark_offsets(
                    client,
                    self.events_topic_c.as_ptr(),
                    id,
                    &mut low,
                    &mut high,
                )
            };
            if err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0 {
                p.fetched_end = high;
            }
        }
    }

    /// Whether the merge should wait for a partition with events still to
    /// fetch, up to `MAX_HOLD`; past it, those partitions stop holding at
    /// their position, and the merge goes on without them.
    fn merge_waits(&mut self) -> bool {
        if !self.partitions.values().any(Partition::holds) {
            self.held_since = None;
            return false;
        }
        let since = *self.held_since.get_or_insert_with(Instant::now);
        if since.elapsed() < MAX_HOLD {
            return true;
        }
        for (id, p) in self.partitions.iter_mut().filter(|(_, p)| p.holds()) {
            debug!(
                partition = id,
                end = p.end,
                fetched_end = p.fetched_end,
                "merging without a partition still to fetch"
            );
            p.released_at = Some(p.end);
        }
        self.metrics.merge_holds_released.inc();
        self.held_since = None;
        false
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
                        self.fetcher.split(id);
                    }
                }
                Rebalanced::Revoked(list) => {
                    for id in list {
                        info!(partition = id, "partition revoked");
                        self.partitions.remove(&id);
                        self.fetcher.forget(id);
                        let _ = self.metrics.consumer_lag.remove_label_values(&[&id.to_string()]);
                    }
                }
            }
        }
    }

    /// Parses a fetched event into its partition's read-ahead (an invalid
    /// one goes to the dead-letter topic and is kept as skipped).
    fn take_event(&mut self, fetched: Fetched) {
        let Fetched { partition: id, offset, record_ts, payload } = fetched;
        let Some(p) = self.partitions.get_mut(&id) else { return };
        if p.hold_until.is_some() || !p.takes(offset) {
            return;
        }
        if offset > p.end {
            // Legitimate with transactions or compaction; worth seeing otherwise.
            debug!(partition = id, expected = p.end, offset, "gap in the events partition");
        }
        p.end = offset + 1;
        self.metrics.events_consumed.inc();
        let example = match self.events.example(self.model.featurizer(), &payload) {
            Ok(example) => Some((example, payload)),
            Err(e) => {
                self.metrics.events_invalid.inc();
                debug!(partition = id, offset, error = %e, "invalid event: to the dead-letter topic");
                self.dead_letters.send(id, offset, &payload, e.kind(), &e.to_string());
                None
            }
        };
        if let Some(p) = self.partitions.get_mut(&id) {
            let ts = event_time(example.as_ref().map(|(e, _)| e), record_ts);
            p.last_ts = ts;
            p.read_ahead.push_back(ReadAhead { offset, ts, example });
        }
    }

    /// Events read ahead, over all partitions.
    fn read_ahead(&self) -> usize {
        self.partitions.values().map(|p| p.read_ahead.len()).sum()
    }

    /// Whether a gradient computed now sees the trainer's own records (the
    /// overlay steps them on, or the served weights include the last one
    /// applied) and all but `max_unseen_records` of the log's.
    fn sees_own_records(&self) -> bool {
        if !self.follows_served {
            return true;
        }
        let served = self.serving.load().position;
        let bound = self.config.max_unseen_records as i64;
        let log_end = if bound > 0 { self.progress.applied().log_end } else { 0 };
        let own_seen = self.overlay.is_some() || served >= self.see_from;
        own_seen && (bound == 0 || served >= log_end - bound)
    }

    /// Sends batches from the read-ahead while fewer than K records are in
    /// flight and the gradient would see the trainer's own records.
    /// Returns the records sent.
    fn send_batches(&mut self) -> usize {
        let mut sent = 0;
        while self.read_ahead() > 0 && self.has_slot() && self.sees_own_records() {
            // Served by now, even if the loop had not yet seen it.
            self.end_served_stage();
            self.note_fetched_ends();
            if self.merge_waits() {
                return sent;
            }
            if let Some(served) = self.served_at.take() {
                self.observe(Stage::Starved, served);
            }
            let started = Instant::now();
            // Past MAX_ALIGNMENT_WAIT the bound is dropped for a batch: a
            // trainer held back sends no record, so its progress stands
            // still, and trainers that all hold one another back would wait
            // for each other until they count as idle.
            let waited_out = self.aligned_since.is_some_and(|since| since.elapsed() >= MAX_ALIGNMENT_WAIT);
            let until = if waited_out { None } else { self.event_time_bound() };
            let batch = merge_by_event_time(&mut self.partitions, self.batch_limit, until);
            self.observe(Stage::Merge, started);
            if batch.ranges.is_empty() {
                // Every event read is ahead of the fleet: wait for it.
                self.aligned_since.get_or_insert_with(Instant::now);
                return sent;
            }
            self.aligned_since = None;
            if !self.send(batch) {
                // Its events left the read-ahead: read them again.
                let watermarks = self.progress.applied().watermarks.clone();
                self.seek_back(&watermarks);
                return sent;
            }
            sent += 1;
        }
        sent
    }

    /// Whether a record may be sent now: none is in flight, or fewer than
    /// `max_in_flight` are and a full batch is read ahead. Live, a record
    /// is sent per round trip with what came meanwhile, as with one in
    /// flight: more in flight would only split the same events into more,
    /// smaller records, each costing the applier a dense step on every
    /// replica (three live `wide_deep` replicas at 4 in flight: freshness
    /// p99 1 s, against 125 ms at 1).
    fn has_slot(&self) -> bool {
        let in_flight = self.in_flight.len();
        in_flight == 0 || (in_flight < self.config.max_in_flight && self.read_ahead() >= self.batch_limit)
    }

    /// The newest event time this trainer may take: the slowest other
    /// trainer's progress plus `max_event_time_lead_ms`, over the trainers
    /// with a record within `TRAINER_IDLE_AFTER` (none: no bound), as Flink
    /// aligns watermarks across sources. So the fleet's records follow the
    /// stream's time, not each trainer's own pace through its partitions.
    fn event_time_bound(&self) -> Option<i64> {
        let lead = self.config.max_event_time_lead_ms;
        if lead == 0 {
            return None;
        }
        let applied = self.progress.applied();
        aligned_bound(&applied.trainers, &self.replica_id, lead, Instant::now())
    }

    /// Once the trainer's last record is served: the `served` stage ends.
    fn note_served(&mut self) {
        if self.retired_at.is_some() && self.sees_own_records() {
            self.end_served_stage();
        }
    }

    /// Ends the `served` stage of the record last seen applied, if open.
    fn end_served_stage(&mut self) {
        if let Some(retired) = self.retired_at.take() {
            self.observe(Stage::Served, retired);
            self.served_at = Some(Instant::now());
        }
    }

    /// Notes how long `stage` of a record's cycle took, from `since` to now.
    fn observe(&self, stage: Stage, since: Instant) {
        self.metrics.trainer_stage.with_label_values(&[stage.as_str()]).observe(since.elapsed().as_secs_f64());
    }

    /// The progressive loss and gradient of `examples` at `at`, checked as
    /// the applier will check it; none for no examples (a batch of invalid
    /// events, or of refused ones only).
    fn checked_gradient(&self, at: &At<'_>, examples: &[Example]) -> Result<Gradient, Refusal> {
        if examples.is_empty() {
            return Ok(Gradient::default());
        }
        let gradient = match at {
            At::Served(snapshot) => self.model.gradient_at(Some(snapshot.position), &snapshot.weights, examples),
            At::Overlaid(weights) => self.model.gradient_on(weights, examples),
        };
        let gradient = gradient.map_err(|e| Refusal::Failed(e.to_string()))?;
        check_gradient(&self.model, examples.len() as u32, gradient.loss_sum, &gradient.tensors)
            .map_err(Refusal::Rejected)?;
        Ok(gradient)
    }

    /// The progressive loss and gradient of `batch` against the served
    /// weights, checked as the applier will check it; the batch loses the
    /// events it could not learn. A batch whose gradient the applier would
    /// refuse (a retry would compute the same one) has each event's
    /// gradient checked alone at the same weights: the events refused alone
    /// go to the dead-letter topic and count as skipped, and the rest are
    /// learned. (The rest's gradient is the sum of gradients each within the
    /// per-example bound, so it is within the batch's.)
    fn gradient(&mut self, batch: &mut Batch) -> (i64, Gradient) {
        let snapshot = self.serving.load_full();
        let overlaid = self.overlay.as_mut().and_then(|overlay| {
            overlay.retire(&snapshot.watermarks);
            overlay.over(&self.model, &snapshot, &batch.examples)
        });
        let at = overlaid.map_or(At::Served(&snapshot), At::Overlaid);
        let refusal = match self.checked_gradient(&at, &batch.examples) {
            Ok(gradient) => return (snapshot.position, gradient),
            Err(refusal) => refusal,
        };
        warn!(ranges = ?batch.ranges, events = batch.examples.len(), reason = %refusal,
            "gradient refused: checking each event's alone");
        let refused: Vec<(usize, Refusal)> = (0..batch.examples.len())
            .filter_map(|i| Some((i, self.checked_gradient(&at, &batch.examples[i..=i]).err()?)))
            .collect();
        for (i, refusal) in refused.iter().rev() {
            batch.examples.remove(*i);
            self.refuse_event(&batch.sources.remove(*i), refusal);
            batch.skipped += 1;
        }
        match self.checked_gradient(&at, &batch.examples) {
            Ok(gradient) => (snapshot.position, gradient),
            Err(refusal) => {
                // Not reached while the gradient is a sum over events; if it
                // is, the batch is skipped whole rather than sent to be refused.
                error!(ranges = ?batch.ranges, reason = %refusal,
                    "the gradient of the events each accepted alone is refused: batch skipped");
                batch.skipped += batch.examples.len() as u32;
                batch.examples.clear();
                batch.sources.clear();
                (snapshot.position, Gradient::default())
            }
        }
    }

    /// Dead-letters an event whose gradient alone is refused, and counts it.
    fn refuse_event(&self, source: &Source, refusal: &Refusal) {
        let Source { partition, offset, payload } = source;
        warn!(partition, offset, reason = %refusal, "an event's gradient alone is refused: to the dead-letter topic");
        self.metrics.events_refused.with_label_values(&[refusal.kind()]).inc();
        self.dead_letters.send(*partition, *offset, payload, refusal.kind(), &refusal.to_string());
    }

    /// Sends `batch` as one gradient record; false if the producer's queue
    /// refuses it, or if the record would be too large (then the batch limit
    /// is halved, and its events are read again into smaller batches).
    fn send(&mut self, mut batch: Batch) -> bool {
        let started = Instant::now();
        let (base, gradient) = self.gradient(&mut batch);
        let (examples, skipped) = (batch.examples.len() as u32, batch.skipped);
        self.observe(Stage::Gradient, started);
        let started = Instant::now();
        let meta = RecordMeta {
            fingerprint: self.model.fingerprint(),
            ranges: batch.ranges.clone(),
            base,
            examples,
            skipped,
            oldest_ts: batch.oldest_ts,
            producer: self.replica_id.clone(),
        };
        // What the overlay steps on once the record is sent.
        let mut stepped = self.overlay.is_some().then(|| gradient.tensors.clone());
        let mut bytes = Record::Gradient(GradientRecord::new(meta.clone(), gradient)).encode();
        let limit = self.config.max_record_bytes;
        if bytes.len() > limit {
            self.metrics.records_too_large.inc();
            let events = batch.examples.len() + batch.skipped as usize;
            if events > 1 {
                self.batch_limit = (events / 2).max(1);
                warn!(
                    bytes = bytes.len(),
                    limit,
                    events,
                    batch_limit = self.batch_limit,
                    "gradient record over the size limit: learning these events in smaller batches"
                );
                return false;
            }
            // One event whose gradient alone is too large cannot be learned:
            // it is skipped, and said, rather than tried again for ever.
            error!(ranges = ?batch.ranges, bytes = bytes.len(), limit,
                "one event's gradient record is over the size limit: the event is skipped");
            let skipped_alone = RecordMeta { examples: 0, skipped: skipped + examples, ..meta };
            stepped = None;
            bytes = Record::Gradient(GradientRecord::new(skipped_alone, Gradient::default())).encode();
        } else if bytes.len() * 2 < limit {
            self.batch_limit = (self.batch_limit * 2).min(self.config.batch_size);
        }
        let seq = self.next_seq;
        // Keyed by the trainer: `updates` has one partition, the key is for people.
        let record = BaseRecord::with_opaque_to(&self.updates_topic, Box::new(seq))
            .payload(&bytes)
            .key(self.replica_id.as_bytes());
        match self.producer.send(record) {
            Ok(()) => {
                self.observe(Stage::Send, started);
                self.next_seq += 1;
                self.metrics.records_produced.inc();
                if let (Some(overlay), Some(tensors)) = (&mut self.overlay, stepped) {
                    overlay.push(batch.ranges.clone(), tensors);
                }
                self.in_flight.push_back(InFlight { seq, ranges: batch.ranges, sent: Instant::now() });
                true
            }
            Err((e, _)) => {
                warn!(error = %e, "cannot queue gradient record");
                false
            }
        }
    }

    /// Retires records the applier applied; starts held partitions once the
    /// applier has caught up; seeks every partition back after a rejection
    /// of one of ours, a delivery failure, or when another trainer moved a
    /// watermark (a rebalance overlap).
    fn follow_applier(&mut self) {
        let (position, watermarks, rejected, jumps) = {
            let mut applied = self.progress.applied();
            let rejected = std::mem::take(&mut applied.rejected_own);
            (applied.position, applied.watermarks.clone(), rejected, applied.state_jumps)
        };
        let jumped = std::mem::replace(&mut self.state_jumps_seen, jumps) != jumps;
        let failed = std::mem::take(&mut *self.failures.lock().expect("failures lock"));
        let watermark = |id: i32| watermarks.get(&id).copied().unwrap_or(0);
        let held: Vec<i32> = (self.partitions.iter())
            .filter(|(_, p)| p.hold_until.is_some_and(|until| position >= until))
            .map(|(&id, _)| id)
            .collect();
        for id in held {
            info!(partition = id, watermark = watermark(id), "the applier caught up: starting the held partition");
            if self.seek(id, watermark(id)) {
                // A held partition reads nothing ahead.
                self.partitions.insert(id, Partition::at(watermark(id)));
            }
        }
        while let Some(r) = self.in_flight.front().filter(|r| r.ranges.iter().all(|g| watermark(g.partition) >= g.to)) {
            self.metrics.record_round_trip.observe(r.sent.elapsed().as_secs_f64());
            self.observe(Stage::Applied, r.sent);
            self.in_flight.pop_front();
            self.see_from = position;
            self.retired_at = Some(Instant::now());
        }
        if failed.iter().any(|f| f.too_large) {
            self.metrics.records_too_large.inc();
            self.batch_limit = (self.batch_limit / 2).max(1);
            warn!(batch_limit = self.batch_limit, "the broker refused a gradient record as too large: smaller batches");
        }
        let lost =
            (self.in_flight.iter()).any(|r| failed.iter().any(|f| f.seq == r.seq) || rejected.contains(&r.ranges));
        let stale = self.in_flight.front().is_some_and(|r| r.sent.elapsed() > Duration::from_secs(30));
        // Our view is consistent iff each partition's next range continues
        // its watermark, directly or through records still in flight.
        let moved = self.in_flight.is_empty()
            && (self.partitions.iter()).any(|(&id, p)| p.hold_until.is_none() && p.next_from != watermark(id));
        if lost || stale || moved || jumped {
            info!(lost, stale, moved, jumped, "seeking every partition back to its applied watermark");
            self.seek_back(&watermarks);
        }
    }

    /// Sends every partition back to its applied watermark, dropping what
    /// was read ahead and in flight.
    fn seek_back(&mut self, watermarks: &BTreeMap<i32, i64>) {
        self.in_flight.clear();
        self.overlay.iter_mut().for_each(Overlay::clear);
        let ids: Vec<i32> = self.partitions.iter().filter(|(_, p)| p.hold_until.is_none()).map(|(&id, _)| id).collect();
        for id in ids {
            let wm = watermarks.get(&id).copied().unwrap_or(0);
            if self.seek(id, wm) {
                self.partitions.insert(id, Partition::at(wm));
            }
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

    /// An events partition that ends below the watermark the fleet learned
    /// it to: the topic was deleted and recreated (or truncated), and its
    /// new events at offsets below the watermark will never be learned,
    /// since the watermark says they were. Only the operator can tell which
    /// history is right; the replica says so, once per assignment.
    fn report_below_watermark(&mut self, id: i32, end: i64, watermark: i64) {
        let Some(p) = self.partitions.get_mut(&id).filter(|p| !p.below_watermark) else { return };
        p.below_watermark = true;
        self.metrics.events_below_watermark.inc();
        error!(
            topic = %self.events_topic,
            partition = id,
            end,
            watermark,
            "the events partition ends below its applied watermark: the topic was deleted and recreated, or \
             truncated; its events at offsets below the watermark will not be learned. Restore the topic, or \
             start the fleet afresh (a new update log and no checkpoints) to learn the new one"
        );
    }

    /// Commits the applied watermarks of owned partitions as the group's
    /// offsets, refreshes the lag gauges, and says so when a partition ends
    /// below its watermark. The lag is a round trip per partition on the
    /// poll thread, so a commit asks about partitions only until
    /// [`LAG_QUERY_BUDGET`] is spent, starting where the last one stopped:
    /// with many partitions and a slow broker the gauges refresh less often,
    /// and the poll thread still polls well within `max.poll.interval.ms`.
    /// (On a thread and client of its own the check cost three replicas
    /// learning a backlog a fifth of their rate in the quality scenario, so
    /// it stays here.)
    fn commit(&mut self, mode: CommitMode) {
        let watermarks: BTreeMap<i32, i64> = self.progress.applied().watermarks.clone();
        let mut tpl = TopicPartitionList::new();
        let mut ids: Vec<i32> = self.partitions.keys().copied().collect();
        ids.sort_unstable();
        for &id in &ids {
            if let Some(&wm) = watermarks.get(&id) {
                let _ = tpl.add_partition_offset(&self.events_topic, id, Offset::Offset(wm));
            }
        }
        let start = ids.iter().position(|&id| id > self.lag_cursor).unwrap_or(0);
        let budget = Instant::now() + LAG_QUERY_BUDGET;
        for &id in ids[start..].iter().chain(&ids[..start]) {
            if Instant::now() >= budget {
                break;
            }
            self.lag_cursor = id;
            let wm = watermarks.get(&id).copied();
            if let Ok((_, high)) = self.consumer.fetch_watermarks(&self.events_topic, id, Duration::from_millis(500)) {
                let lag = high - wm.unwrap_or(0);
                self.metrics.consumer_lag.with_label_values(&[&id.to_string()]).set(lag.max(0));
                if let Some(wm) = wm.filter(|&wm| high < wm) {
                    self.report_below_watermark(id, high, wm);
                }
            }
        }
        if tpl.count() > 0 {
            if let Err(e) = self.consumer.commit(&tpl, mode) {
                debug!(error = %e, "offset commit failed; the next one catches up");
            }
        }
    }
}
