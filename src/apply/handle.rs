//! The narrow handle through which the HTTP layer asks the training side of
//! a replica for something: today, a rollback. `http` reaches the applier
//! only through it, never its `Progress`, control log or store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::BaseConsumer;

use super::guard::last_good;
use super::progress::{Progress, RollbackOutcome};
use crate::checkpoint::{SharedStore, Store};
use crate::config::Config;
use crate::update_log::control::ControlLog;
use crate::update_log::kafka;
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
    /// Reads where the update log starts: what a rollback can still rebuild.
    log_reader: Arc<BaseConsumer>,
    updates_topic: String,
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
    #[error(
        "version {to} cannot be rebuilt by every replica: the update log starts at {log_start} and no checkpoint \
         that every replica can restore is at or before it and at or after that start; the oldest version that \
         can be reached is {}",
        oldest.map_or("none (no checkpoint since the log's start in a store the fleet shares)".to_string(), |o| o.to_string())
    )]
    Unreachable { to: i64, log_start: i64, oldest: Option<i64> },
    #[error("cannot append the rollback to the update log: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ReplicaHandle {
    pub fn new(
        config: &Config,
        control: ControlLog,
        progress: Arc<Progress>,
        store: SharedStore,
        fingerprint: u64,
    ) -> anyhow::Result<ReplicaHandle> {
        let client_id = format!("{}-admin", config.replica_id);
        let connection = kafka::Connection::of(&config.kafka)?;
        let log_reader = Arc::new(kafka::log_reader_config(&connection, &client_id).create()?);
        Ok(ReplicaHandle {
            control,
            progress,
            store,
            fingerprint,
            replica_id: config.replica_id.clone(),
            log_reader,
            updates_topic: config.kafka.updates_topic.clone(),
        })
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
            let applied = self.progress.applied();
            (applied.position, applied.last_healthy)
        };
        let to = self.resolve(target, seen, last_healthy).await?;
        self.check_reachable(to).await?;
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
                let applied = self.progress.applied();
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

    /// Refuses a target that not every replica could rebuild: taking it
    /// would stop those replicas at the same record.
    async fn check_reachable(&self, to: i64) -> Result<(), RollbackError> {
        let (reader, topic, store) = (self.log_reader.clone(), self.updates_topic.clone(), self.store.clone());
        tokio::task::spawn_blocking(move || reachable_by_the_fleet(&*store, &reader, &topic, to))
            .await
            .map_err(|e| RollbackError::Internal(e.to_string()))?
    }

    /// The version a target names, given the current one (`seen`).
    async fn resolve(&self, target: RollbackTarget, seen: i64, last_healthy: i64) -> Result<i64, RollbackError> {
        match target {
            RollbackTarget::Version(q) if (0..=seen).contains(&q) => Ok(q),
            RollbackTarget::Version(q) => Err(RollbackError::OutOfRange(q, seen)),
            RollbackTarget::LastGood => {
                // Choosing the snapshot lists the store: off the runtime.
                let store = self.store.clone();
                let left = self.progress.applied().rolled_back_from();
                tokio::task::spawn_blocking(move || last_good(&*store, last_healthy, &left))
                    .await
                    .map_err(|e| RollbackError::Internal(e.to_string()))
            }
        }
    }
}

/// Whether every replica of the fleet can rebuild the state at `to`, asking
/// the broker where the log starts and `store` what it holds. A rollback is
/// rebuilt from a checkpoint at or before its target plus the log after
/// that checkpoint, or from the seed plus the whole log: a target is
/// reachable by every replica while the log starts at 0, or from a
/// checkpoint the log continues in a store they share. A directory store's
/// checkpoints are one replica's, so they count for no other.
pub fn reachable_by_the_fleet(
    store: &dyn Store,
    reader: &BaseConsumer,
    topic: &str,
    to: i64,
) -> Result<(), RollbackError> {
    let log_start = kafka::log_start(reader, topic)
        .ok_or_else(|| RollbackError::Unavailable("cannot read where the log starts".into()))?;
    let shared: Vec<i64> = match store.is_shared() {
        true => {
            (store.list().map_err(|e| RollbackError::Unavailable(e.to_string()))?.iter()).map(|c| c.position).collect()
        }
        false => Vec::new(),
    };
    match oldest_reachable(log_start, &shared) {
        Some(oldest) if to >= oldest => Ok(()),
        oldest => Err(RollbackError::Unreachable { to, log_start, oldest }),
    }
}

/// The oldest version a rollback can return to, given where the update log
/// starts and the positions of the checkpoints every replica can restore:
/// the whole history from the seed while the log starts at 0, else the
/// oldest checkpoint the log continues.
pub fn oldest_reachable(log_start: i64, checkpoints: &[i64]) -> Option<i64> {
    if log_start == 0 {
        return Some(0);
    }
    checkpoints.iter().copied().filter(|&c| c >= log_start).min()
}

#[cfg(test)]
mod tests {
    use super::oldest_reachable;

    #[test]
    fn a_version_is_reachable_from_a_checkpoint_the_log_continues() {
        assert_eq!(oldest_reachable(0, &[]), Some(0));
        assert_eq!(oldest_reachable(100, &[50, 120, 300]), Some(120));
        assert_eq!(oldest_reachable(100, &[50]), None);
    }
}
