//! The narrow handle through which the HTTP layer asks the training side of
//! a replica for something: today, a rollback. `http` reaches the applier
//! only through it, never its `Progress`, control log or store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::applier::{last_good, Progress, RollbackOutcome};
use crate::checkpoint::SharedStore;
use crate::update_log::control::ControlLog;
use crate::update_log::record::{EventsSince, RollbackRecord};

/// How often a waiting rollback request looks for the applier's outcome.
const OUTCOME_POLL: Duration = Duration::from_millis(20);

/// Asks the fleet to roll back, on behalf of an operator.
pub struct ReplicaHandle {
    control: ControlLog,
    progress: Arc<Progress>,
    store: SharedStore,
    fingerprint: u64,
    replica_id: String,
}

/// Where a rollback should return to.
#[derive(Clone, Copy, Debug)]
pub enum RollbackTarget {
    /// A version: an update-log position.
    Version(i64),
    /// The newest snapshot at or before the last position the divergence
    /// guard found healthy.
    LastGood,
}

/// What became of an appended rollback record, as this replica saw it.
#[derive(Debug)]
pub enum RollbackAnswer {
    /// This replica read it: taken, or rejected with a reason.
    Read { offset: i64, to: i64, outcome: RollbackOutcome, model_version: i64 },
    /// Appended, but not read here within the wait.
    Pending { offset: i64, to: i64 },
}

#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    #[error("to_version {0} is not between 0 and the current version {1}")]
    OutOfRange(i64, i64),
    #[error("cannot append the rollback to the update log: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ReplicaHandle {
    pub fn new(
        control: ControlLog,
        progress: Arc<Progress>,
        store: SharedStore,
        fingerprint: u64,
        replica_id: &str,
    ) -> ReplicaHandle {
        ReplicaHandle { control, progress, store, fingerprint, replica_id: replica_id.to_string() }
    }

    /// Appends a rollback to `target` (decided at this replica's current
    /// position) and waits up to `wait` for this replica to read it.
    pub async fn roll_back(
        &self,
        target: RollbackTarget,
        events: EventsSince,
        wait: Duration,
    ) -> Result<RollbackAnswer, RollbackError> {
        let (seen, last_healthy) = {
            let applied = self.progress.applied.lock().expect("progress lock");
            (applied.position, applied.last_healthy)
        };
        let to = self.resolve(target, seen, last_healthy).await?;
        let record = RollbackRecord {
            fingerprint: self.fingerprint,
            to,
            seen,
            events,
            reason: "admin".into(),
            producer: self.replica_id.clone(),
        };
        tracing::warn!(to, seen, ?events, "rollback asked over the admin API");
        let offset = (self.control.append(record).await).map_err(|e| RollbackError::Unavailable(format!("{e:#}")))?;
        let deadline = Instant::now() + wait;
        loop {
            let (outcome, model_version) = {
                let applied = self.progress.applied.lock().expect("progress lock");
                (applied.rollbacks.get(&offset).cloned(), applied.position)
            };
            if let Some(outcome) = outcome {
                return Ok(RollbackAnswer::Read { offset, to, outcome, model_version });
            }
            if Instant::now() >= deadline {
                return Ok(RollbackAnswer::Pending { offset, to });
            }
            tokio::time::sleep(OUTCOME_POLL).await;
        }
    }

    /// The version a target names, given the current one (`seen`).
    async fn resolve(&self, target: RollbackTarget, seen: i64, last_healthy: i64) -> Result<i64, RollbackError> {
        match target {
            RollbackTarget::Version(q) if (0..=seen).contains(&q) => Ok(q),
            RollbackTarget::Version(q) => Err(RollbackError::OutOfRange(q, seen)),
            RollbackTarget::LastGood => {
                // Choosing the snapshot lists the store: off the runtime.
                let store = self.store.clone();
                tokio::task::spawn_blocking(move || last_good(&*store, last_healthy))
                    .await
                    .map_err(|e| RollbackError::Internal(e.to_string()))
            }
        }
    }
}
