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
//! A shard of a sharded fleet (docs/design.md section 8a) computes its
//! gradients over its own rows and those of the other shards the batch
//! reads, gathered at its served position or later with their optimizer
//! slots, so that its overlay steps its records in flight on those rows
//! too (each shard's at its own watermarks).
//!
//! Why merge by event time: see `read_ahead`.

mod context;
mod dead_letter;
mod fetch;
mod gradient;
mod intake;
mod outbox;
pub mod overlay;
mod read_ahead;
mod stages;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::CommitMode;
use tracing::{error, info};

pub use context::{Rebalanced, TrainerContext};

use self::intake::Intake;
use self::outbox::{Encoded, Outbox};
use self::overlay::Overlay;
use self::read_ahead::{aligned_bound, merge_by_event_time, Batch};
use self::stages::{Stage, StageClock};
use crate::apply::progress::Progress;
use crate::config::{Config, TrainConfig};
use crate::lifecycle::StopRequest;
use crate::metrics::Metrics;
use crate::model::Model;
use crate::shard::Shards;
use crate::snapshot::Serving;
use crate::update_log::record::RecordMeta;

/// How long a trainer with every event read past the fleet's bound waits
/// before it learns a batch regardless (see `send_batches`).
const MAX_ALIGNMENT_WAIT: Duration = Duration::from_millis(50);

pub struct Trainer {
    model: Arc<Model>,
    serving: Serving,
    /// The events side: the group member, its partitions and read-ahead.
    intake: Intake,
    /// The records side: the producer and the records in flight.
    outbox: Outbox,
    /// The trainer's records not yet served, stepped onto the weights its
    /// gradients see (`Config::trainer_overlaps`); `None`: each gradient
    /// waits until the served weights include its previous record.
    overlay: Option<Overlay>,
    /// For a shard: the other shards, whose rows each batch reads, and the
    /// runtime their gather runs on; `None` for the whole model.
    shards: Option<(Shards, tokio::runtime::Handle)>,
    config: TrainConfig,
    replica_id: String,
    progress: Arc<Progress>,
    stop: StopRequest,
    /// Whether the served weights follow the log once ready (swaps on): a
    /// gradient then waits for the trainer's previous record to be served.
    follows_served: bool,
    /// The served version that includes the trainer's last applied record;
    /// the next gradient is computed at it or later.
    see_from: i64,
    /// The applier's count of state jumps (rollbacks, restores), as last seen.
    state_jumps_seen: u64,
    /// Since when every event read is past the fleet's bound.
    aligned_since: Option<Instant>,
    stages: StageClock,
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
        let state_jumps_seen = progress.applied().state_jumps;
        Ok(Trainer {
            intake: Intake::new(config, model.clone(), metrics.clone(), progress.clone(), stop.clone())?,
            outbox: Outbox::new(config, metrics.clone())?,
            model,
            serving,
            overlay: config.trainer_overlaps().then(Overlay::default),
            // Built inside the replica's runtime (`Replica::build`).
            shards: Shards::of(config, &metrics.shards).map(|shards| (shards, tokio::runtime::Handle::current())),
            config: config.train.clone(),
            replica_id: config.replica_id.clone(),
            state_jumps_seen,
            progress,
            stop,
            follows_served: config.apply.max_swaps_per_sec > 0.0,
            see_from: 0,
            aligned_since: None,
            stages: StageClock::new(metrics),
        })
    }

    pub fn run(mut self) -> anyhow::Result<()> {
        self.intake.subscribe()?;
        let commit_every = Duration::from_millis(self.config.commit_interval_ms);
        let mut last_commit = Instant::now();
        while !self.stop.is_requested() {
            if self.progress.applied().stalled {
                self.leave_while_stalled();
                return Ok(());
            }
            let taken = self.intake.take_fetched();
            self.follow_applier();
            self.note_served();
            let sent = self.send_batches();
            if taken == 0 && sent == 0 {
                // Woken by the applier's progress or by events arriving in
                // a partition's queue; short while a record is in flight.
                let wait = if self.outbox.in_flight() == 0 { 5 } else { 1 };
                self.progress.wait_changed(Duration::from_millis(wait));
            }
            if last_commit.elapsed() >= commit_every {
                let watermarks = self.progress.applied().watermarks.clone();
                self.intake.commit(&watermarks, CommitMode::Async);
                last_commit = Instant::now();
                // The commit's lag queries block this thread (up to a
                // second): a wait for a partition counts from when polling
                // resumes, not the time spent here.
                self.intake.restart_hold_clock(last_commit);
            }
        }
        self.shut_down();
        Ok(())
    }

    /// The applier stopped applying: this replica's weights are behind the
    /// log, or not the fleet's, so its gradients must not reach the log and
    /// its partitions belong with healthy replicas. Leaves the consumer
    /// group at once, sends nothing more and commits nothing, and waits
    /// for the stop.
    fn leave_while_stalled(&mut self) {
        error!("the applier stopped applying the update log: the trainer leaves the consumer group");
        self.outbox.clear();
        self.overlay.iter_mut().for_each(Overlay::clear);
        self.intake.leave_until(&self.stop);
    }

    /// Graceful stop: send what was read while a slot is free, flush the
    /// producer, then leave the group so the partitions move at once.
    fn shut_down(mut self) {
        // What does not fit in flight is left to whoever takes the partitions.
        self.follows_served = false;
        self.send_batches();
        self.outbox.flush(Duration::from_secs(10));
        let watermarks = self.progress.applied().watermarks.clone();
        self.intake.close(&watermarks);
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
        while self.intake.read_ahead() > 0 && self.has_slot() && self.sees_own_records() {
            // Served by now, even if the loop had not yet seen it.
            self.stages.served();
            self.intake.note_fetched_ends();
            if self.intake.merge_waits() {
                return sent;
            }
            self.stages.batch_starts();
            let started = Instant::now();
            // Past MAX_ALIGNMENT_WAIT the bound is dropped for a batch: a
            // trainer held back sends no record, so its progress stands
            // still, and trainers that all hold one another back would wait
            // for each other until they count as idle.
            let waited_out = self.aligned_since.is_some_and(|since| since.elapsed() >= MAX_ALIGNMENT_WAIT);
            let until = if waited_out { None } else { self.event_time_bound() };
            let batch = merge_by_event_time(&mut self.intake.partitions, self.outbox.batch_limit(), until);
            self.stages.observe(Stage::Merge, started);
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
        let in_flight = self.outbox.in_flight();
        in_flight == 0
            || (in_flight < self.config.max_in_flight && self.intake.read_ahead() >= self.outbox.batch_limit())
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
        if self.stages.awaits_served() && self.sees_own_records() {
            self.stages.served();
        }
    }

    /// Sends `batch` as one gradient record; false if the producer's queue
    /// refuses it, if the record would be too large (then the batch limit
    /// is halved, and its events are read again into smaller batches), or if
    /// a shard's rows could not be gathered.
    fn send(&mut self, mut batch: Batch) -> bool {
        let started = Instant::now();
        let Some((base, gradient)) = self.gradient(&mut batch) else { return false };
        self.stages.observe(Stage::Gradient, started);
        let started = Instant::now();
        let meta = RecordMeta {
            fingerprint: self.model.fingerprint(),
            ranges: batch.ranges.clone(),
            base,
            examples: batch.examples.len() as u32,
            skipped: batch.skipped,
            oldest_ts: batch.oldest_ts,
            producer: self.replica_id.clone(),
        };
        // What the overlay steps on once the record is sent.
        let stepped = self.overlay.is_some().then(|| gradient.tensors.clone());
        let (bytes, stepped) = match self.outbox.encode(meta, gradient) {
            Encoded::Fits(bytes) => (bytes, stepped),
            Encoded::SkipsAlone(bytes) => (bytes, None),
            Encoded::Split => return false,
        };
        if !self.outbox.queue(&bytes, batch.ranges.clone()) {
            return false;
        }
        self.stages.observe(Stage::Send, started);
        if let (Some(overlay), Some(tensors)) = (&mut self.overlay, stepped) {
            overlay.push(batch.ranges, tensors);
        }
        true
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
        self.intake.start_held(position, &watermarks);
        while let Some(sent) = self.outbox.pop_applied(|id| watermarks.get(&id).copied().unwrap_or(0)) {
            self.stages.applied(sent);
            self.see_from = position;
        }
        let lost = self.outbox.take_lost(&rejected);
        // Our view is consistent iff each partition's next range continues
        // its watermark, directly or through records still in flight.
        let moved = self.outbox.in_flight() == 0 && self.intake.moved_under(&watermarks);
        if lost || moved || jumped {
            info!(lost, moved, jumped, "seeking every partition back to its applied watermark");
            self.seek_back(&watermarks);
        }
    }

    /// Sends every partition back to its applied watermark, dropping what
    /// was read ahead and in flight.
    fn seek_back(&mut self, watermarks: &BTreeMap<i32, i64>) {
        self.outbox.clear();
        self.overlay.iter_mut().for_each(Overlay::clear);
        self.intake.seek_back(watermarks);
    }
}
