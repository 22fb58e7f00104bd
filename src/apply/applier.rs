//! The applier loop: one OS thread that reads `updates` from the state's
//! position, applies every record by the rule, publishes serving snapshots
//! (coalesced), writes checkpoints, and tells the local trainer what became
//! of its records.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::message::Message;
use tracing::{error, info, warn};

use super::attest::{Attestor, ATTESTATION_INTERVAL};
use super::checkpointing::{Checkpointer, LogTrimmer};
use super::guard::{Guard, GuardLink};
use super::log_reader::LogReader;
use super::progress::{Progress, TrainerProgress, TRAINER_PROGRESS_KEPT};
use super::staleness::StalenessMeter;
use super::swaps::Swaps;
use crate::checkpoint::SharedStore;
use crate::config::Config;
use crate::lifecycle::DrainRequest;
use crate::metrics::Metrics;
use crate::model::Model;
use crate::snapshot::Serving;
use crate::state::{Outcome, ReplicaState};
use crate::update_log::control::ControlLog;
use crate::update_log::kafka;
use crate::update_log::record::EventRange;

/// Attestation positions a replaying replica checks, counted back from the
/// log end it started at (see [`Applier::attest_when_due`]).
const REPLAY_ATTESTED_INTERVALS: i64 = 4;

/// What one drain of the log read.
#[derive(Default)]
pub(super) struct Drained {
    pub(super) records: usize,
    /// A record of this replica's trainer was applied: it waits to see it
    /// served before its next gradient, so publish at once.
    pub(super) own_applied: bool,
    /// A rollback was taken: its weights are published before reading on.
    pub(super) rolled_back: bool,
    /// The ranges of this replica's records that were rejected.
    pub(super) own_rejections: Vec<Vec<EventRange>>,
    /// The newest event-time progress of each trainer whose records were
    /// applied (once ready: a replay reads the past).
    pub(super) trainers: Vec<(String, i64)>,
}

pub struct Applier {
    pub(super) model: Arc<Model>,
    pub(super) state: ReplicaState,
    /// Publishes the state to serving.
    pub(super) swaps: Swaps,
    /// Reads `updates`.
    pub(super) log: LogReader,
    pub(super) replica_id: String,
    pub(super) metrics: Arc<Metrics>,
    pub(super) progress: Arc<Progress>,
    pub(super) store: SharedStore,
    pub(super) guard: Option<GuardLink>,
    /// Set once the state has caught up with the log end seen at start-up.
    pub(super) ready: Arc<AtomicBool>,
    pub(super) drain: DrainRequest,
    pub(super) staleness: StalenessMeter,
    /// Whether the state is known to be learned under this replica's
    /// settings: restored from a checkpoint (which carries the same
    /// fingerprint), or a settings record equal to its own was read.
    pub(super) settings_agreed: bool,
    /// Why this replica stopped applying: the log no longer continues its
    /// position (records deleted below it, or a gap), or its weights are not
    /// the fleet's (an attestation disagrees). It serves on, not ready, and
    /// says why.
    pub(super) stalled: Option<String>,
    /// Its own weights digests, the fleet's attestations compared with them.
    pub(super) attestor: Attestor,
    /// Writes checkpoints when due, off the apply path.
    pub(super) checkpoints: Checkpointer,
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
        let log = LogReader::new(config)?;
        let trimmer = match config.trims_update_log() {
            true => Some(LogTrimmer::new(log.connection(), &config.replica_id, log.topic())?),
            false => None,
        };
        let every = Duration::from_secs(config.checkpoint.interval_secs);
        let g = &config.guard;
        let guard = g.enabled.then(|| GuardLink {
            guard: Guard::new(g.loss_factor, g.warmup_examples, state.position),
            control: control.clone(),
            runtime: tokio::runtime::Handle::current(),
        });
        Ok(Applier {
            checkpoints: Checkpointer::new(store.clone(), model.clone(), metrics.clone(), trimmer, every, &state),
            swaps: Swaps::new(config, model.clone(), &state, metrics.clone()),
            staleness: StalenessMeter::starting_at(state.position, state.examples_learned),
            settings_agreed: state.position > 0,
            stalled: None,
            attestor: attestor_of(config, &model, &state, control),
            progress: Arc::new(Progress::at(&state)),
            model,
            state,
            log,
            replica_id: config.replica_id.clone(),
            metrics,
            store,
            guard,
            ready: Arc::new(AtomicBool::new(false)),
            drain: DrainRequest::default(),
        })
    }

    /// What predictions read.
    pub fn serving(&self) -> Serving {
        self.swaps.serving()
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
        self.log.start_at(self.state.position)?;
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

    /// Applies what the log has, up to one swap interval's worth, or until
    /// a record of this replica's trainer is applied (it waits for it).
    fn drain_log(&mut self) -> anyhow::Result<Drained> {
        let mut drained = Drained::default();
        let mut next = self.log.poll(Duration::from_millis(20));
        while let Some(message) = next {
            let message = match message {
                Ok(m) => m,
                // The broker away: librdkafka reconnects by itself, and
                // serving goes on with the last weights meanwhile.
                Err(e) if kafka::is_position_gone(&e) => {
                    let start = self.log.log_start();
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
                    self.log.say_read_error(&e);
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
            let outcome =
                self.state.apply(&self.model, offset, message.payload().unwrap_or(&[]), self.swaps.publisher());
            drained.rolled_back |= matches!(outcome, Outcome::RollBack(_));
            self.record_outcome(offset, outcome, &mut drained)?;
            if self.stalled.is_some() {
                break;
            }
            self.attest_when_due();
            self.staleness.advanced(self.state.position, self.state.examples_learned);
            // A rollback's weights are published before reading on.
            let publish_now = drained.rolled_back || drained.own_applied || self.swaps.due();
            if publish_now && self.swaps.is_behind(&self.state) {
                break;
            }
            next = self.log.poll(Duration::ZERO);
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
        self.log.read_from(self.state.position)?;
        self.report_progress(Vec::new(), Vec::new());
        Ok(true)
    }

    /// After the state was replaced other than by applying the next record
    /// (a rollback, a checkpoint caught up from): everything is published
    /// anew, the guard starts over, and the trainer is told (`state_jumps`).
    pub(super) fn state_replaced(&mut self) {
        self.swaps.mark_everything();
        if let Some(link) = &mut self.guard {
            link.guard.rolled_back(self.state.position);
        }
        self.progress.applied().state_jumps += 1;
    }

    /// Stops applying for `reason`: not ready, counted, logged. The state
    /// stays as it is (whole, at its position) and is served.
    pub(super) fn stall(&mut self, reason: String) {
        error!(position = self.state.position, "{reason}");
        self.metrics.applier.update_log_stalled.set(1);
        self.ready.store(false, Ordering::Release);
        self.metrics.applier.ready.set(0);
        self.stalled = Some(reason);
        self.progress.applied().stalled = true;
        self.progress.notify();
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
        let checked_from = self.log.start_end().map(|end| end - REPLAY_ATTESTED_INTERVALS * ATTESTATION_INTERVAL);
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
        applied.log_end = self.log.end_for_the_trainer();
        if let Some(link) = &self.guard {
            applied.last_healthy = link.guard.last_healthy();
        }
        drop(applied);
        self.progress.notify();
    }

    /// Swaps the serving snapshot at most at the configured rate; at once
    /// when `idle`, or `at_once` (the local trainer waits for its record, or
    /// a rollback was taken: the drain stopped after it so that its weights
    /// are served before any record after it is applied).
    fn publish_when_due(&mut self, idle: bool, at_once: bool) {
        let ready = self.ready.load(Ordering::Relaxed);
        if self.swaps.publish_when_due(&self.state, ready, idle, at_once) {
            // A trainer waiting for its record to be served wakes now.
            self.progress.notify();
        }
    }

    /// Ready once the position reaches the log end as of start-up and that
    /// state is served. Without a listed end, the first fetch response's is
    /// taken, and a state ahead of it refused.
    fn update_readiness(&mut self) -> anyhow::Result<()> {
        self.log.learn_start_end(self.state.position)?;
        let caught_up = self.log.start_end().is_some_and(|end| self.state.position >= end) && self.stalled.is_none();
        if !self.ready.load(Ordering::Relaxed) && caught_up && !self.swaps.is_behind(&self.state) {
            info!(position = self.state.position, "caught up with the update log: ready");
            self.ready.store(true, Ordering::Release);
            self.metrics.applier.ready.set(1);
        }
        Ok(())
    }

    /// After the drain: the last weights served, a final checkpoint.
    fn finish(mut self) {
        self.swaps.publish_last(&self.state);
        self.checkpoints.finish(&self.state);
        info!(position = self.state.position, "applier stopped after a final checkpoint");
    }
}

/// The attestor of a replica's digests; a state restored from a checkpoint
/// (the store's or a peer's) is remembered, so the fleet's attestation of
/// its position says whether it is theirs.
fn attestor_of(config: &Config, model: &Model, state: &ReplicaState, control: ControlLog) -> Attestor {
    let mut attestor = Attestor::new(
        model.fingerprint(),
        model.layout(),
        &config.replica_id,
        control,
        tokio::runtime::Handle::current(),
    );
    if state.position > 0 {
        attestor.remember(state.position, model.digest(&state.weights));
    }
    attestor
}
