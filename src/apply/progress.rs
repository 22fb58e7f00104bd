//! What the applier tells the local trainer and the admin handle: the
//! position and watermarks it applied, its own records rejected, rollbacks
//! taken, the fleet's trainers' event-time progress. The applier writes it
//! after each run of records; readers lock it briefly or wait for a change.
//!
//! Owns the shared record and its lock; may not touch the replica's state.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::lifecycle::StopRequest;
use crate::state::ReplicaState;
use crate::update_log::record::{EventRange, EventsSince};

/// What the applier has applied, for the trainer. Updated after each drained
/// run of records, not per record.
#[derive(Debug, Default)]
pub struct Applied {
    pub position: i64,
    pub watermarks: BTreeMap<i32, i64>,
    /// The ranges of this replica's records that were rejected.
    pub rejected_own: Vec<Vec<EventRange>>,
    /// The update log's end as the last fetch response said (0 before one,
    /// and always 0 unless `train.max_unseen_records` is set): the trainer's
    /// bound on records it has not seen.
    pub log_end: i64,
    /// Position after the last record the divergence guard found healthy.
    pub last_healthy: i64,
    /// What became of recent rollback records, by offset (the newest 64).
    pub rollbacks: BTreeMap<i64, RollbackOutcome>,
    /// Times the state was replaced other than by applying the next record
    /// (a rollback taken, a newer checkpoint restored): a trainer that sees
    /// this move drops its records in flight (computed on weights the
    /// replica left) and reads again from the watermarks, without waiting.
    pub state_jumps: u64,
    /// The applier stopped applying (see `Applier::stall`): the trainer
    /// leaves the consumer group, so that healthy replicas learn its
    /// partitions.
    pub stalled: bool,
    /// Each trainer's event-time progress, by replica id, as the records
    /// read since this replica was ready show it: the fleet's event-time
    /// alignment.
    pub trainers: HashMap<String, TrainerProgress>,
}

/// A trainer's event-time progress: the oldest event time of its newest
/// record applied here, and when this replica read that record.
#[derive(Clone, Copy, Debug)]
pub struct TrainerProgress {
    pub event_time: i64,
    pub seen: Instant,
}

/// How long a trainer's progress is kept after its last record: longer than
/// any trainer that learns goes without a record.
pub const TRAINER_PROGRESS_KEPT: Duration = Duration::from_secs(60);

impl Applied {
    /// The stretches of history the fleet rolled back from, as (to, at):
    /// the states after `to` up to the rollback at `at`, of the rollbacks
    /// taken that it remembers. A rollback must not return into one.
    pub fn rolled_back_from(&self) -> Vec<(i64, i64)> {
        (self.rollbacks.iter()).filter(|(_, r)| r.taken).map(|(&at, r)| (r.to, at)).collect()
    }
}

/// A rollback record as this replica took it (or not).
#[derive(Clone, Debug, PartialEq)]
pub struct RollbackOutcome {
    pub taken: bool,
    /// Why it was not taken (`superseded`, `bad_target`, `other_model`).
    pub rejected: Option<&'static str>,
    pub to: i64,
    pub events: EventsSince,
    /// Examples learned between `to` and the record that are no longer in
    /// the weights (to be learned again if `events` is relearn).
    pub examples_undone: u64,
}

/// `Applied` behind a lock, with a condition variable to wait on.
#[derive(Debug, Default)]
pub struct Progress {
    applied: Mutex<Applied>,
    changed: Condvar,
}

impl Progress {
    /// Progress at a state the applier starts from.
    pub fn at(state: &ReplicaState) -> Progress {
        let progress = Progress::default();
        {
            let mut applied = progress.applied();
            applied.position = state.position;
            applied.last_healthy = state.position;
            applied.watermarks.clone_from(&state.watermarks);
        }
        progress
    }

    /// What the applier last reported, locked: hold it briefly (the applier
    /// waits for it). A holder that panicked left plain data behind, so a
    /// poisoned lock is taken as it is rather than spreading the panic.
    pub fn applied(&self) -> MutexGuard<'_, Applied> {
        self.applied.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes whoever waits for progress (the trainer).
    pub fn notify(&self) {
        self.changed.notify_all();
    }

    /// Waits until the applied position reaches `position`, or `deadline`,
    /// or `stop`. Returns whether it was reached.
    pub fn wait_for(&self, position: i64, deadline: Instant, stop: &StopRequest) -> bool {
        let mut applied = self.applied();
        while applied.position < position {
            let now = Instant::now();
            if now >= deadline || stop.is_requested() {
                return false;
            }
            let wait = (deadline - now).min(Duration::from_millis(50));
            applied = self.changed.wait_timeout(applied, wait).unwrap_or_else(PoisonError::into_inner).0;
        }
        true
    }

    /// Waits until the applier reports progress, or `timeout`.
    pub fn wait_changed(&self, timeout: Duration) {
        let applied = self.applied();
        let _ = self.changed.wait_timeout(applied, timeout).unwrap_or_else(PoisonError::into_inner);
    }
}
