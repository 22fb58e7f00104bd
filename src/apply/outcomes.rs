//! What the applier does with each record's outcome beyond the state the
//! apply rule changed: the metrics and logs, the notes for the local
//! trainer (its records rejected, the fleet's event-time progress), the
//! divergence guard fed, a rollback taken, a settings record compared with
//! this replica's, an attestation compared with its own digest.

use std::sync::atomic::Ordering;

use tracing::{debug, warn};

use super::applier::{Applier, Drained};
use super::progress::RollbackOutcome;
use crate::model::settings_diff;
use crate::state::Outcome;
use crate::update_log::record::{GradientRecord, SettingsRecord};

impl Applier {
    /// Metrics, logs and the trainer's notes for one record's outcome; takes
    /// a rollback.
    pub(super) fn record_outcome(
        &mut self,
        offset: i64,
        outcome: Outcome,
        drained: &mut Drained,
    ) -> anyhow::Result<()> {
        match outcome {
            Outcome::Applied(r) => self.note_applied(offset, &r, drained),
            Outcome::RollBack(r) => {
                self.metrics.applier.records_applied.inc();
                self.take_rollback(offset, &r)?;
            }
            Outcome::RollbackRejected(r, reason) => {
                self.metrics.applier.records_rejected.with_label_values(&[reason.as_str()]).inc();
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
                self.metrics.applier.records_rejected.with_label_values(&[reason.as_str()]).inc();
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
                self.metrics.applier.records_rejected.with_label_values(&[reason.as_str()]).inc();
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

    /// An applied gradient record: its staleness, counts and event time;
    /// the trainer's notes; the divergence guard fed with its loss.
    fn note_applied(&mut self, offset: i64, r: &GradientRecord, drained: &mut Drained) {
        let before = self.state.examples_learned - u64::from(r.examples);
        let stale = self.staleness.measure(r.base, offset, before);
        self.metrics.applier.staleness_records.observe(stale.records as f64);
        self.metrics.applier.staleness_examples.observe(stale.examples as f64);
        self.metrics.applier.records_applied.inc();
        self.metrics.applier.examples_learned.inc_by(u64::from(r.examples));
        if r.oldest_ts > 0 {
            self.swaps.note_event_time(r.oldest_ts);
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
}
