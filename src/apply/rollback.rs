//! Rollback: rebuilding the state at an earlier position, and the divergence
//! guard that asks for one.
//!
//! The state at position q is a pure function of the log before q, so any
//! replica can rebuild it: from the newest checkpoint at or before q (any
//! store, any replica's), or from the seed weights, then the log up to q.
//! Every replica therefore takes a rollback record identically, whatever
//! checkpoints it happens to have; a checkpoint only saves replay time.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tracing::{info, warn};

use super::applier::Applier;
use super::progress::RollbackOutcome;
use crate::checkpoint::Store;
use crate::lifecycle::Backoff;
use crate::model::Model;
use crate::state::optim::NoTouch;
use crate::state::{Outcome, ReplicaState};
use crate::update_log::kafka;
use crate::update_log::record::RollbackRecord;

/// Where the log is, for the replay reader.
pub struct LogSource<'a> {
    pub connection: &'a kafka::Connection,
    pub topic: &'a str,
    pub client_id: &'a str,
}

/// The state at position `q`: the newest usable checkpoint at or before it,
/// then the log up to `q`. A store that is down costs a longer replay (from
/// the seed), not a different state.
pub fn state_at(model: &Model, store: &dyn Store, log: &LogSource, q: i64) -> anyhow::Result<Rebuilt> {
    let start = match store.load_newest(model, Some(q)) {
        Ok(Some((state, info))) => {
            info!(to = q, checkpoint = info.position, "rebuilding from a checkpoint");
            state
        }
        Ok(None) => ReplicaState::initial(model),
        Err(e) => {
            warn!(error = %e, to = q, "checkpoint store unusable; rebuilding from the seed weights");
            ReplicaState::initial(model)
        }
    };
    let replayed_records = q - start.position;
    Ok(Rebuilt { state: replay(model, store, log, start, q)?, replayed_records })
}

/// Why a state cannot be rebuilt, ever, from this replica's store and the
/// log as they are: the replay would start at `from` (the newest checkpoint
/// at or before the target, or 0), and the log no longer holds it.
#[derive(Debug, thiserror::Error)]
#[error(
    "rebuilding the state at {target} replays the update log from {from} (the newest checkpoint at or before it in \
     this replica's store, or the seed), and the log no longer holds that position (it starts at {log_start})"
)]
pub struct Unreachable {
    pub target: i64,
    pub from: i64,
    /// Where the log starts now, as far as the broker says.
    pub log_start: String,
}

/// A state rebuilt at an earlier position, and what it cost.
pub struct Rebuilt {
    pub state: ReplicaState,
    /// Records replayed from the checkpoint it started from (not counting
    /// those replayed for rollbacks met on the way).
    pub replayed_records: i64,
}

/// Applies the log from `state.position` up to `until`, rollbacks included.
pub fn replay(
    model: &Model,
    store: &dyn Store,
    log: &LogSource,
    mut state: ReplicaState,
    until: i64,
) -> anyhow::Result<ReplicaState> {
    if state.position >= until {
        return Ok(state);
    }
    let started = (Instant::now(), state.position);
    let consumer: BaseConsumer = kafka::log_reader_config(log.connection, log.client_id).create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(log.topic, 0, Offset::Offset(state.position))?;
    consumer.assign(&tpl)?;
    let mut last_progress = Instant::now();
    while state.position < until {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            if last_progress.elapsed() > Duration::from_secs(60) {
                bail!("replay of {:?} stalled at {} (wanted {until}) for 60 s", log.topic, state.position);
            }
            continue;
        };
        let message = match message {
            Err(e) if kafka::is_position_gone(&e) => {
                let start = kafka::log_start(&consumer, log.topic);
                let log_start = start.map_or("an unknown offset".to_string(), |s| s.to_string());
                return Err(Unreachable { target: until, from: started.1, log_start }.into());
            }
            other => other.context("reading the update log to replay it")?,
        };
        let offset = message.offset();
        if offset < state.position {
            continue;
        }
        if offset > state.position {
            bail!("replay of {:?} skipped from {} to {offset}", log.topic, state.position);
        }
        last_progress = Instant::now();
        if let Outcome::RollBack(r) = state.apply(model, offset, message.payload().unwrap_or(&[]), &mut NoTouch) {
            let then = state_at(model, store, log, r.to)?;
            state.roll_back(offset, &r, then.state);
        }
    }
    info!(from = started.1, to = until, ms = started.0.elapsed().as_millis() as u64, "replayed the update log");
    Ok(state)
}

impl Applier {
    /// Returns to the state at `r.to` (see `rollback`). Rebuilding reads the
    /// log and maybe the store; while either fails it is retried, since
    /// reading on without it would leave this replica unlike the others.
    pub(super) fn take_rollback(&mut self, offset: i64, r: &RollbackRecord) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut backoff = Backoff::new();
        let then = loop {
            match state_at(&self.model, &*self.store, &self.log.replay_source(), r.to) {
                Ok(then) => break then,
                Err(e) if e.is::<Unreachable>() => {
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
        self.metrics.rollback.replayed_records.observe(replayed_records as f64);
        let then = then.state;
        let examples_undone = self.state.examples_learned.saturating_sub(then.examples_learned);
        self.state.roll_back(offset, r, then);
        self.state_replaced();
        let events = r.events.as_str();
        self.metrics.rollback.rollbacks.with_label_values(&[events]).inc();
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

    pub(super) fn note_rollback(&self, offset: i64, outcome: RollbackOutcome) {
        let mut applied = self.progress.applied();
        applied.rollbacks.insert(offset, outcome);
        while applied.rollbacks.len() > 64 {
            applied.rollbacks.pop_first();
        }
    }
}
