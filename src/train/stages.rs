//! The stages of a trainer's record cycle, timed in
//! `tributary_trainer_stage_seconds`: where the learning rate goes.

use std::sync::Arc;
use std::time::Instant;

use crate::metrics::Metrics;

#[derive(Debug, Clone, Copy)]
pub(super) enum Stage {
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

/// Times the stages that span loop turns: `served` (from a record seen
/// applied to seen served) and `starved` (from there to the next batch).
pub(super) struct StageClock {
    /// When the last record was seen applied.
    retired_at: Option<Instant>,
    /// When the last record was seen served.
    served_at: Option<Instant>,
    metrics: Arc<Metrics>,
}

impl StageClock {
    pub(super) fn new(metrics: Arc<Metrics>) -> StageClock {
        StageClock { retired_at: None, served_at: None, metrics }
    }

    /// Notes how long `stage` of a record's cycle took, from `since` to now.
    pub(super) fn observe(&self, stage: Stage, since: Instant) {
        self.metrics.trainer.stage.with_label_values(&[stage.as_str()]).observe(since.elapsed().as_secs_f64());
    }

    /// A record, sent at `sent`, is seen applied: its `applied` stage ends
    /// and its `served` stage starts.
    pub(super) fn applied(&mut self, sent: Instant) {
        self.observe(Stage::Applied, sent);
        self.retired_at = Some(Instant::now());
    }

    /// Whether a record seen applied is not yet seen served.
    pub(super) fn awaits_served(&self) -> bool {
        self.retired_at.is_some()
    }

    /// Ends the `served` stage of the record last seen applied, if open.
    pub(super) fn served(&mut self) {
        if let Some(retired) = self.retired_at.take() {
            self.observe(Stage::Served, retired);
            self.served_at = Some(Instant::now());
        }
    }

    /// A batch starts: the `starved` stage since the last serve ends.
    pub(super) fn batch_starts(&mut self) {
        if let Some(served) = self.served_at.take() {
            self.observe(Stage::Starved, served);
        }
    }
}
