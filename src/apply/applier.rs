//! The applier loop: one OS thread that reads `updates` from the state's
//! position, applies every record by the rule, publishes serving snapshots
//! (coalesced), writes checkpoints, and tells the local trainer what became
//! of its records.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, error, info, warn};

use super::attest::{Attestor, ATTESTATION_INTERVAL};
use super::checkpointing::{Checkpointer, LogTrimmer};
use super::handle::reachable_by_the_fleet;
use super::progress::{Progress, RollbackOutcome, TrainerProgress, TRAINER_PROGRESS_KEPT};
use super::rollback::{self, Guard, LogSource, Spike};
use super::staleness::StalenessMeter;
use crate::checkpoint::{SharedStore, Store};
use crate::config::Config;
use crate::lifecycle::{Backoff, DrainRequest};
use crate::metrics::Metrics;
use crate::model::{settings_diff, Model};
use crate::snapshot::{Publisher, Serving};
use crate::state::{Outcome, ReplicaState};
use crate::update_log::control::ControlLog;
use crate::update_log::kafka;
use crate::update_log::record::{EventRange, EventsSince, RollbackRecord, SettingsRecord};

/// Attestation positions a replaying replica checks, counted back from the
/// log end it started at (see [`Applier::attest_when_due`]).
const REPLAY_ATTESTED_INTERVALS: i64 = 4;

/// How many times the start-up asks the broker for the update log's end
/// (each ask waits up to 2 s) before reading on without it.
const LOG_END_ATTEMPTS: u32 = 5;

/// The divergence guard, where it appends its rollback records, and the
/// runtime that appends them off the apply path.
struct GuardLink {
    guard: Guard,
    control: ControlLog,
    runtime: tokio::runtime::Handle,
}

/// What one drain of the log read.
#[derive(Default)]
struct Drained {
    records: usize,
    /// A record of this replica's trainer was applied: it waits to see it
    /// served before its next gradient, so publish at once.
    own_applied: bool,
    /// A rollback was taken: its weights are published before reading on.
    rolled_back: bool,
    /// The ranges of this replica's records that were rejected.
    own_rejections: Vec<Vec<EventRange>>,
    /// The newest event-time progress of each trainer whose records were
    /// applied (once ready: a replay reads the past).
    trainers: Vec<(String, i64)>,
}

pub struct Applier {
    model: Arc<Model>,
    state: ReplicaState,
    publisher: Publisher,
    consumer: BaseConsumer,
    updates_topic: String,
    replica_id: String,
    metrics: Arc<Metrics>,
    progress: Arc<Progress>,
    store: SharedStore,
    /// For the reader that replays the log to rebuild a state.
    connection: kafka::Connection,
    guard: Option<GuardLink>,
    /// Whether the trainer bounds the records it has not seen
    /// (`train.max_unseen_records`), and so needs the log end reported.
    report_log_end: bool,
    /// Least time between swaps. `None`: swaps are off once ready, so the
    /// served weights stay those of start-up (a benchmark baseline only).
    min_swap_interval: Option<Duration>,
    /// Set once the state has caught up with the log end seen at start-up.
    ready: Arc<AtomicBool>,
    drain: DrainRequest,
    /// The log end as of start-up: listed, or the first fetch response's
    /// when the broker could not list it (see `kafka::fetched_end`).
    start_end: Option<i64>,
    last_swap: Instant,
    /// Event times of the records applied since the last swap, for freshness.
    pending_ts: Vec<i64>,
    last_read_error: Option<Instant>,
    staleness: StalenessMeter,
    /// Whether the state is known to be learned under this replica's
    /// settings: restored from a checkpoint (which carries the same
    /// fingerprint), or a settings record equal to its own was read.
    settings_agreed: bool,
    /// Why this replica stopped applying: the log no longer continues its
    /// position (records deleted below it, or a gap), or its weights are not
    /// the fleet's (an attestation disagrees). It serves on, not ready, and
    /// says why.
    stalled: Option<String>,
    /// Its own weights digests, the fleet's attestations compared with them.
    attestor: Attestor,
    /// Writes checkpoints when due, off the apply path.
    checkpoints: Checkpointer,
}

impl Applier {
    /// The applier of `state` (restored or seeded), with its serving
    /// publisher and log reader; `control` is where the divergence guard
    /// appends its rollbacks. Must be called inside the tokio runtime.
    pub fn new(
        config: &Config,
        model: Arc<Model>,
        state: ReplicaState,
        store: SharedStore,
        metrics: Arc<Metrics>,
        control: ControlLog,
    ) -> anyhow::Result<Applier> {
        let connection = kafka::Connection::of(&config.kafka)?;
        let consumer: BaseConsumer = kafka::log_reader_config(&connection, &config.replica_id).create()?;
        let progress = Arc::new(Progress::default());
        {
            let mut applied = progress.applied();
            applied.position = state.position;
            applied.last_healthy = state.position;
            applied.watermarks.clone_from(&state.watermarks);
        }
        let mut attestor =
            Attestor::new(model.fingerprint(), &config.replica_id, control.clone(), tokio::runtime::Handle::current());
        if state.position > 0 {
            // Restored from a checkpoint (the store's or a peer's): the
            // fleet's attestation of its position will say if it is theirs.
            attestor.remember(state.position, model.digest(&state.weights));
        }
        let g = &config.guard;
        let guard = g.enabled.then(|| GuardLink {
            guard: Guard::new(g.loss_factor, g.warmup_examples, state.position),
            control,
            runtime: tokio::runtime::Handle::current(),
        });
        let trimmer = match config.checkpoint.trims_update_log() {
            true => Some(LogTrimmer::new(&connection, &config.replica_id, &config.kafka.updates_topic)?),
            false => None,
        };
        let every = Duration::from_secs(config.checkpoint.interval_secs);
        Ok(Applier {
            checkpoints: Checkpointer::new(store.clone(), model.clone(), metrics.clone(), trimmer, every, &state),
            publisher: Publisher::new(model.clone(), &state, config.trainer_overlaps()),
            staleness: StalenessMeter::starting_at(state.position, state.examples_learned),
            settings_agreed: state.position > 0,
            stalled: None,
            attestor,
            model,
            state,
            consumer,
            updates_topic: config.kafka.updates_topic.clone(),
            replica_id: config.replica_id.clone(),
            metrics,
            progress,
            store,
            connection,
            guard,
            report_log_end: config.train.max_unseen_records > 0,
            min_swap_interval: (config.apply.max_swaps_per_sec > 0.0)
                .then(|| Duration::from_secs_f64(1.0 / config.apply.max_swaps_per_sec)),
            ready: Arc::new(AtomicBool::new(false)),
            drain: DrainRequest::default(),
            start_end: None,
            last_swap: Instant::now(),
            pending_ts: Vec::new(),
            last_read_error: None,
        })
    }

    /// What predictions read.
    pub fn serving(&self) -> Serving {
        self.publisher.serving()
    }

    /// What the applier has applied, for the trainer and the admin handle.
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// Set once caught up with the log as of start-up.
    pub fn ready(&self) -> Arc<AtomicBool> {
        self.ready.clone()
    }

    /// How the replica asks this applier to drain and stop.
    pub fn drain_request(&self) -> DrainRequest {
        self.drain.clone()
    }

    /// Applies the log until a drain is asked for and reached, then writes
    /// a final checkpoint.
    pub fn run(mut self) -> anyhow::Result<()> {
        self.start_reading()?;
        while !self.drain.reached(self.state.position) {
            if self.stalled.is_some() {
                // Serving goes on with the last weights; nothing to apply.
                if self.drain.is_requested() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            let drained = self.drain_log()?;
            if drained.records > 0 {
                self.report_progress(drained.own_rejections, drained.trainers);
            }
            self.publish_when_due(drained.records == 0, drained.own_applied || drained.rolled_back);
            self.update_readiness()?;
            self.checkpoints.when_due(&self.state, &mut self.attestor);
        }
        self.finish();
        Ok(())
    }

    /// Reads `updates` from the state's position; refuses a state ahead of
    /// the log's end.
    fn start_reading(&mut self) -> anyhow::Result<()> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.updates_topic, 0, Offset::Offset(self.state.position))?;
        self.consumer.assign(&tpl)?;
        let listed_end = self.list_log_end();
        info!(position = self.state.position, log_end = ?listed_end, "applier started");
        if let Some(end) = listed_end.filter(|&end| end < self.state.position) {
            anyhow::bail!(ahead_of_log(self.state.position, &self.updates_topic, end));
        }
        self.start_end = listed_end;
        Ok(())
    }

    /// The update log's end, asked of the broker up to `LOG_END_ATTEMPTS`
    /// times. An unanswered ask is never taken for an empty log (which
    /// would refuse every checkpoint): after the last one the end is left
    /// unknown, and the first fetch response's is checked instead
    /// ([`Applier::update_readiness`]).
    fn list_log_end(&self) -> Option<i64> {
        for attempt in 1..=LOG_END_ATTEMPTS {
            if let Some(end) = kafka::log_end(&self.consumer, &self.updates_topic) {
                return Some(end);
            }
            warn!(attempt, of = LOG_END_ATTEMPTS, "the broker did not say where the update log ends; asking again");
        }
        None
    }

    /// Applies what the log has, up to one swap interval's worth, or until
    /// a record of this replica's trainer is applied (it waits for it).
    fn drain_log(&mut self) -> anyhow::Result<Drained> {
        let mut drained = Drained::default();
        let mut next = self.consumer.poll(Duration::from_millis(20));
        while let Some(message) = next {
            let message = match message {
                Ok(m) => m,
                // The broker away: librdkafka reconnects by itself, and
                // serving goes on with the last weights meanwhile.
                Err(e) if kafka::is_position_gone(&e) => {
                    let start = kafka::log_start(&self.consumer, &self.updates_topic);
                    if self.catch_up_from_the_store(start)? {
                        break;
                    }
                    self.stall(format!(
                        "the update log no longer holds this replica's position {} (it starts at {}): its records \
                         were deleted (retention, or trimmed after newer checkpoints). Give this replica a \
                         checkpoint at or after the log's start (a shared store, or a peer's), or start it afresh \
                         with an empty store if the log still begins at 0",
                        self.state.position,
                        start.map_or("an unknown offset".to_string(), |s| s.to_string()),
                    ));
                    break;
                }
                Err(e) => {
                    if self.last_read_error.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                        warn!(error = %e, "cannot read the update log; serving the last weights, retrying");
                        self.last_read_error = Some(Instant::now());
                    }
                    break;
                }
            };
            let offset = message.offset();
            if offset != self.state.position {
                self.stall(format!(
                    "the update log jumps from this replica's position {} to offset {offset}: the records in \
                     between are gone, and applying on would fork this replica's state from the fleet's",
                    self.state.position
                ));
                break;
            }
            drained.records += 1;
            let outcome = self.state.apply(&self.model, offset, message.payload().unwrap_or(&[]), &mut self.publisher);
            drained.rolled_back |= matches!(outcome, Outcome::RollBack(_));
            self.record_outcome(offset, outcome, &mut drained)?;
            if self.stalled.is_some() {
                break;
            }
            self.attest_when_due();
            self.staleness.advanced(self.state.position, self.state.examples_learned);
            // A rollback's weights are published before reading on.
            let publish_now = drained.rolled_back || drained.own_applied || self.swap_due();
            if publish_now && self.publisher.is_behind(&self.state) {
                break;
            }
            next = self.consumer.poll(Duration::ZERO);
        }
        Ok(drained)
    }

    /// The log no longer holds this replica's position (it lagged behind
    /// the fleet's trimming, or was stopped for longer): with a store the
    /// fleet shares, the newest checkpoint the log continues is the fleet's
    /// state at its position, so the replica takes it and reads on from
    /// there, rather than stall. Whether it did (false: none to take).
    fn catch_up_from_the_store(&mut self, log_start: Option<i64>) -> anyhow::Result<bool> {
        let Some(start) = log_start.filter(|_| self.store.is_shared()) else { return Ok(false) };
        let newest = match self.store.load_newest(&self.model, None) {
            Ok(Some((state, _))) if state.position >= start && state.position > self.state.position => state,
            Ok(_) => return Ok(false),
            Err(e) => {
                warn!(error = %e, "cannot read the checkpoint store to catch up from; retrying");
                return Ok(true);
            }
        };
        warn!(
            from = self.state.position,
            to = newest.position,
            log_start = start,
            "the update log no longer holds this replica's position: catching up from the fleet's newest checkpoint"
        );
        self.attestor.remember(newest.position, self.model.digest(&newest.weights));
        self.staleness = StalenessMeter::starting_at(newest.position, newest.examples_learned);
        self.state = newest;
        self.settings_agreed = true;
        self.state_replaced();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.updates_topic, 0, Offset::Offset(self.state.position))?;
        self.consumer.assign(&tpl)?;
        self.report_progress(Vec::new(), Vec::new());
        Ok(true)
    }

    /// After the state was replaced other than by applying the next record
    /// (a rollback, a checkpoint caught up from): everything is published
    /// anew, the guard starts over, and the trainer is told (`state_jumps`).
    fn state_replaced(&mut self) {
        self.publisher.mark_everything();
        if let Some(link) = &mut self.guard {
            link.guard.rolled_back(self.state.position);
        }
        self.progress.applied().state_jumps += 1;
    }

    /// Stops applying for `reason`: not ready, counted, logged. The state
    /// stays as it is (whole, at its position) and is served.
    fn stall(&mut self, reason: String) {
        error!(position = self.state.position, "{reason}");
        self.metrics.update_log_stalled.set(1);
        self.ready.store(false, Ordering::Release);
        self.metrics.ready.set(0);
        self.stalled = Some(reason);
        self.progress.applied().stalled = true;
        self.progress.notify();
    }

    /// Metrics, logs and the trainer's notes for one record's outcome; takes
    /// a rollback.
    fn record_outcome(&mut self, offset: i64, outcome: Outcome, drained: &mut Drained) -> anyhow::Result<()> {
        match outcome {
            Outcome::Applied(r) => {
                let before = self.state.examples_learned - u64::from(r.examples);
                let stale = self.staleness.measure(r.base, offset, before);
                self.metrics.staleness_records.observe(stale.records as f64);
                self.metrics.staleness_examples.observe(stale.examples as f64);
                self.metrics.records_applied.inc();
                self.metrics.examples_learned.inc_by(u64::from(r.examples));
                if r.oldest_ts > 0 {
                    self.pending_ts.push(r.oldest_ts);
                }
                debug!(ranges = ?r.ranges, producer = %r.producer, "applied");
                // Before ready, a record of this replica's id is of its
                // previous life (its trainer holds its partitions until the
                // replay is done): nobody waits for it to be served, and
                // publishing each one made a replay of its own records slow.
                let ready = self.ready.load(Ordering::Relaxed);
                drained.own_applied |= r.producer == self.replica_id && ready;
                if r.oldest_ts > 0 && ready {
                    drained.trainers.push((r.producer.clone(), r.oldest_ts));
                }
                self.watch_loss(r.examples, r.loss_sum);
            }
            Outcome::RollBack(r) => {
                self.metrics.records_applied.inc();
                self.take_rollback(offset, &r)?;
            }
            Outcome::RollbackRejected(r, reason) => {
                self.metrics.records_rejected.with_label_values(&[reason.as_str()]).inc();
                warn!(offset, to = r.to, seen = r.seen, reason = reason.as_str(), producer = %r.producer, "rollback not taken");
                let outcome = RollbackOutcome {
                    taken: false,
                    rejected: Some(reason.as_str()),
                    to: r.to,
                    events: r.events,
                    examples_undone: 0,
                };
                self.note_rollback(offset, outcome);
            }
            Outcome::Rejected(Some(r), reason) => {
                self.metrics.records_rejected.with_label_values(&[reason.as_str()]).inc();
                debug!(ranges = ?r.ranges, producer = %r.producer, reason = reason.as_str(), "rejected");
                if r.producer == self.replica_id {
                    drained.own_rejections.push(r.ranges);
                }
            }
            Outcome::Settings(r) => self.compare_settings(offset, &r)?,
            Outcome::Attestation(r) => {
                if let Some(why) = self.attestor.disagreement(offset, &r) {
                    self.stall(why);
                }
            }
            Outcome::Rejected(None, reason) => {
                self.metrics.records_rejected.with_label_values(&[reason.as_str()]).inc();
                warn!(offset, reason = reason.as_str(), "rejected unreadable record");
            }
        }
        Ok(())
    }

    /// One configuration per fleet. Every replica announces its settings
    /// when it starts. Settings that differ from this replica's, read before
    /// any sign that the log was learned under its own (a checkpoint, or a
    /// settings record equal to its own), are the fleet's: this replica is
    /// the odd one and stops, naming each setting that differs. Read after
    /// such a sign, they are a newcomer's, which stops by the same rule.
    fn compare_settings(&mut self, offset: i64, r: &SettingsRecord) -> anyhow::Result<()> {
        if r.fingerprint == self.model.fingerprint() {
            self.settings_agreed = true;
            return Ok(());
        }
        let differences = settings_diff(self.model.settings(), &r.settings, "in the fleet").join("; ");
        if !self.settings_agreed {
            anyhow::bail!(
                "this replica's model settings differ from the fleet's (as replica {} announced them at update-log \
                 offset {offset}): {differences}. Give every replica of a fleet the same model settings; to change \
                 them, start a new fleet (a new update log, and no checkpoints).",
                r.producer
            );
        }
        warn!(producer = %r.producer, offset, differences, "a replica started with other model settings; it will stop");
        Ok(())
    }

    /// At every multiple of `ATTESTATION_INTERVAL`: the weights digest,
    /// remembered, and attested once this replica is ready. A replica still
    /// replaying leaves the attesting to the fleet, and compares only the
    /// positions of the last `REPLAY_ATTESTED_INTERVALS` before the log end
    /// it started at (and, remembered at start, its checkpoint's): hashing
    /// the weights at every multiple was a quarter of a `wide_deep` replay.
    /// Weights that differ from the fleet's at an earlier position still
    /// differ at those, where the fleet's attestations say so.
    fn attest_when_due(&mut self) {
        let position = self.state.position;
        if position % ATTESTATION_INTERVAL != 0 {
            return;
        }
        let ready = self.ready.load(Ordering::Acquire);
        let checked_from = self.start_end.map(|end| end - REPLAY_ATTESTED_INTERVALS * ATTESTATION_INTERVAL);
        if !ready && checked_from.is_some_and(|from| position < from) {
            return;
        }
        let digest = self.model.digest(&self.state.weights);
        match ready {
            true => self.attestor.attest(position, digest),
            false => self.attestor.remember(position, digest),
        }
    }

    /// Tells the trainer (and the admin handle) what was applied.
    fn report_progress(&self, own_rejections: Vec<Vec<EventRange>>, trainers: Vec<(String, i64)>) {
        let mut applied = self.progress.applied();
        applied.position = self.state.position;
        applied.watermarks.clone_from(&self.state.watermarks);
        applied.rejected_own.extend(own_rejections);
        let now = Instant::now();
        for (producer, event_time) in trainers {
            applied.trainers.insert(producer, TrainerProgress { event_time, seen: now });
        }
        applied.trainers.retain(|_, p| now.duration_since(p.seen) < TRAINER_PROGRESS_KEPT);
        if self.report_log_end {
            applied.log_end = kafka::fetched_end(&self.consumer, &self.updates_topic).unwrap_or(0);
        }
        if let Some(link) = &self.guard {
            applied.last_healthy = link.guard.last_healthy();
        }
        drop(applied);
        self.progress.notify();
    }

    fn swap_due(&self) -> bool {
        self.min_swap_interval.is_some_and(|i| self.last_swap.elapsed() >= i)
    }

    /// Swaps the serving snapshot at most at the configured rate; at once
    /// when `idle`, or `at_once` (the local trainer waits for its record, or
    /// a rollback was taken: the drain stopped after it so that its weights
    /// are served before any record after it is applied).
    fn publish_when_due(&mut self, idle: bool, at_once: bool) {
        let swaps_on = self.min_swap_interval.is_some() || !self.ready.load(Ordering::Relaxed);
        if !(swaps_on && self.publisher.is_behind(&self.state) && (idle || at_once || self.swap_due())) {
            return;
        }
        let stats = self.publisher.publish(&self.state);
        // A trainer waiting for its record to be served wakes now.
        self.progress.notify();
        self.last_swap = Instant::now();
        self.metrics.swaps.inc();
        self.metrics.swap_duration.observe(stats.took.as_secs_f64());
        if stats.full_copy {
            self.metrics.swap_full_copies.inc();
        }
        self.metrics.model_version.set(self.state.position);
        if let Some(loss) = self.state.progressive_loss() {
            self.metrics.progressive_logloss.set(loss);
        }
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        for ts in self.pending_ts.drain(..) {
            self.metrics.freshness.observe((now_ms - ts).max(0) as f64 / 1000.0);
        }
    }

    /// Ready once the position reaches the log end as of start-up and that
    /// state is served. Without a listed end, the first fetch response's is
    /// taken, and a state ahead of it refused.
    fn update_readiness(&mut self) -> anyhow::Result<()> {
        if self.start_end.is_none() {
            if let Some(fetched) = kafka::fetched_end(&self.consumer, &self.updates_topic) {
                if fetched < self.state.position {
                    anyhow::bail!(ahead_of_log(self.state.position, &self.updates_topic, fetched));
                }
                self.start_end = Some(fetched);
            }
        }
        let caught_up = self.start_end.is_some_and(|end| self.state.position >= end) && self.stalled.is_none();
        if !self.ready.load(Ordering::Relaxed) && caught_up && !self.publisher.is_behind(&self.state) {
            info!(position = self.state.position, "caught up with the update log: ready");
            self.ready.store(true, Ordering::Release);
            self.metrics.ready.set(1);
        }
        Ok(())
    }

    /// After the drain: the last weights served, a final checkpoint.
    fn finish(mut self) {
        if self.publisher.is_behind(&self.state) {
            self.publisher.publish(&self.state);
        }
        self.checkpoints.finish(&self.state);
        info!(position = self.state.position, "applier stopped after a final checkpoint");
    }
}

impl Applier {
    /// Returns to the state at `r.to` (see `rollback`). Rebuilding reads the
    /// log and maybe the store; while either fails it is retried, since
    /// reading on without it would leave this replica unlike the others.
    fn take_rollback(&mut self, offset: i64, r: &RollbackRecord) -> anyhow::Result<()> {
        let started = Instant::now();
        let source = LogSource {
            connection: &self.connection,
            topic: &self.updates_topic,
            client_id: &format!("{}-replay", self.replica_id),
        };
        let mut backoff = Backoff::new();
        let then = loop {
            match rollback::state_at(&self.model, &*self.store, &source, r.to) {
                Ok(then) => break then,
                Err(e) if e.is::<rollback::Unreachable>() => {
                    // Retrying cannot help, and reading on without it would
                    // fork this replica from those that took it.
                    self.stall(format!(
                        "cannot take the rollback at update-log offset {offset} (to {to}, by {producer}): {e}. This \
                         replica stops applying and serves the weights from before the rollback. Give it a \
                         checkpoint at or before {to} (the fleet's shared store), or start it again from a \
                         checkpoint after offset {offset} (the store's or a peer's)",
                        to = r.to,
                        producer = r.producer,
                    ));
                    return Ok(());
                }
                Err(e) if !self.drain.is_requested() => {
                    warn!(error = format!("{e:#}"), to = r.to, "cannot rebuild the state to roll back to; retrying");
                    std::thread::sleep(backoff.next_delay());
                }
                Err(e) => return Err(e.context("stopping while rebuilding a rollback's state")),
            }
        };
        let replayed_records = then.replayed_records;
        self.metrics.rollback_replayed_records.observe(replayed_records as f64);
        let then = then.state;
        let examples_undone = self.state.examples_learned.saturating_sub(then.examples_learned);
        self.state.roll_back(offset, r, then);
        self.state_replaced();
        let events = r.events.as_str();
        self.metrics.rollbacks.with_label_values(&[events]).inc();
        warn!(
            at = offset, to = r.to, events, examples_undone, reason = %r.reason, producer = %r.producer,
            replayed_records, ms = started.elapsed().as_millis() as u64, "rolled back"
        );
        self.note_rollback(
            offset,
            RollbackOutcome { taken: true, rejected: None, to: r.to, events: r.events, examples_undone },
        );
        Ok(())
    }

    fn note_rollback(&self, offset: i64, outcome: RollbackOutcome) {
        let mut applied = self.progress.applied();
        applied.rollbacks.insert(offset, outcome);
        while applied.rollbacks.len() > 64 {
            applied.rollbacks.pop_first();
        }
    }

    /// Feeds the divergence guard; on a spike, once ready (a replica that
    /// replays history never asks), appends a rollback to the last good
    /// snapshot with the events since skipped: learning them again would
    /// diverge again.
    fn watch_loss(&mut self, examples: u32, loss_sum: f64) {
        let ready = self.ready.load(Ordering::Relaxed);
        let Some(GuardLink { guard, control, runtime }) = &mut self.guard else { return };
        let Some(spike) = guard.observe(self.state.position, examples, loss_sum, ready) else { return };
        self.metrics.divergences.inc();
        let Spike { fast, baseline, last_healthy } = spike;
        let (seen, fingerprint, producer) = (self.state.position, self.model.fingerprint(), self.replica_id.clone());
        let (control, store) = (control.clone(), self.store.clone());
        let left = self.progress.applied().rolled_back_from();
        let (connection, topic) = (self.connection.clone(), self.updates_topic.clone());
        // Choosing the snapshot lists the store, and checking that every
        // replica can rebuild it asks the broker: off the apply path.
        runtime.spawn(async move {
            let chosen = tokio::task::spawn_blocking(move || {
                let to = last_good(&*store, last_healthy, &left);
                let reader: BaseConsumer = kafka::log_reader_config(&connection, "tributary-guard").create()?;
                anyhow::Ok((to, reachable_by_the_fleet(&*store, &reader, &topic, to)))
            })
            .await
            .map_err(anyhow::Error::from)
            .and_then(|checked| checked);
            let to = match chosen {
                Ok((to, Ok(()))) => to,
                Ok((to, Err(e))) => {
                    error!(fast, baseline, last_healthy, to, error = %e,
                        "progressive loss spiked, and the last good state cannot be rebuilt by every replica: no \
                         rollback asked (it would stop the replicas that cannot take it)");
                    return;
                }
                Err(e) => return warn!(error = %e, "cannot check the divergence rollback's target"),
            };
            warn!(fast, baseline, last_healthy, to, position = seen, "progressive loss spiked: asking for a rollback");
            let record = RollbackRecord {
                fingerprint,
                to,
                seen,
                events: EventsSince::Skip,
                reason: format!("divergence: loss {fast:.4} over {baseline:.4} baseline"),
                producer,
            };
            match control.append(record).await {
                Ok(offset) => info!(offset, "rollback record appended"),
                Err(e) => warn!(error = format!("{e:#}"), "cannot append the divergence rollback"),
            }
        });
    }
}

/// The last good snapshot: the newest checkpoint at or before
/// `last_healthy` that is not a state the fleet rolled back from (`left`,
/// as (to, at): the positions after `to` up to `at`); that position itself
/// if the store has none (or is down): any position can be rebuilt from the
/// log.
pub fn last_good(store: &dyn Store, last_healthy: i64, left: &[(i64, i64)]) -> i64 {
    let abandoned = |p: i64| left.iter().any(|&(to, at)| to < p && p <= at);
    match store.list() {
        Ok(listed) => {
            (listed.iter().map(|c| c.position)).find(|&p| p <= last_healthy && !abandoned(p)).unwrap_or(last_healthy)
        }
        Err(e) => {
            warn!(error = %e, "cannot list checkpoints; the last good state is the last healthy position");
            last_healthy
        }
    }
}

/// Why a replica refuses a checkpoint beyond the end of its update log:
/// reading on would wait for offsets that new records will reuse.
fn ahead_of_log(position: i64, topic: &str, end: i64) -> String {
    format!(
        "the checkpoint is at position {position} of {topic:?} but that log ends at {end}: the topic was deleted \
         or recreated, or the checkpoint belongs to another cluster. Remove the checkpoints to start from the seed \
         weights, or point the replica at the right brokers."
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::tests::small_model;
    use crate::checkpoint::LocalStore;

    #[test]
    fn the_last_good_snapshot_is_never_a_state_the_fleet_rolled_back_from() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), 10).unwrap();
        let model = small_model();
        let mut state = ReplicaState::initial(&model);
        for position in [100, 200, 300] {
            state.position = position;
            store.save(&model, &state).unwrap();
        }
        assert_eq!(last_good(&store, 350, &[]), 300);
        // A rollback at 320 to 150 left the states after 150 up to 320: a
        // second divergence must not return into the first.
        assert_eq!(last_good(&store, 350, &[(150, 320)]), 100);
        assert_eq!(last_good(&store, 50, &[]), 50, "none at or before it: the position itself");
    }
}
