//! Publishing the applier's state to serving: coalesced to at most
//! `apply.max_swaps_per_sec`, at once when the log is idle or someone waits
//! for a record to be served, and the freshness of what each swap serves.
//! Owns the publisher; never changes the state.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::model::Model;
use crate::snapshot::{Publisher, Serving};
use crate::state::ReplicaState;

pub(super) struct Swaps {
    publisher: Publisher,
    /// Least time between swaps. `None`: swaps are off once ready, so the
    /// served weights stay those of start-up (a benchmark baseline only).
    min_interval: Option<Duration>,
    last_swap: Instant,
    /// Event times of the records applied since the last swap, for freshness.
    pending_ts: Vec<i64>,
    metrics: Arc<Metrics>,
}

impl Swaps {
    pub(super) fn new(config: &Config, model: Arc<Model>, state: &ReplicaState, metrics: Arc<Metrics>) -> Swaps {
        let per_sec = config.apply.max_swaps_per_sec;
        Swaps {
            publisher: Publisher::new(model, state, config.trainer_overlaps()),
            min_interval: (per_sec > 0.0).then(|| Duration::from_secs_f64(1.0 / per_sec)),
            last_swap: Instant::now(),
            pending_ts: Vec::new(),
            metrics,
        }
    }

    /// What predictions read.
    pub(super) fn serving(&self) -> Serving {
        self.publisher.serving()
    }

    /// The publisher the apply rule marks the rows it changes in.
    pub(super) fn publisher(&mut self) -> &mut Publisher {
        &mut self.publisher
    }

    /// Whether the served weights are older than `state`.
    pub(super) fn is_behind(&self, state: &ReplicaState) -> bool {
        self.publisher.is_behind(state)
    }

    /// Whether the swap interval has passed since the last swap.
    pub(super) fn due(&self) -> bool {
        self.min_interval.is_some_and(|i| self.last_swap.elapsed() >= i)
    }

    /// The state was replaced whole: the next swap publishes everything.
    pub(super) fn mark_everything(&mut self) {
        self.publisher.mark_everything();
    }

    /// An applied record's oldest event time, observed as freshness when
    /// it is served.
    pub(super) fn note_event_time(&mut self, ts: i64) {
        self.pending_ts.push(ts);
    }

    /// Publishes `state` if swaps are on (always before `ready`), it is
    /// newer than what is served, and the log is `idle`, a swap is wanted
    /// `at_once`, or one is due. Whether it published.
    pub(super) fn publish_when_due(&mut self, state: &ReplicaState, ready: bool, idle: bool, at_once: bool) -> bool {
        let swaps_on = self.min_interval.is_some() || !ready;
        if !(swaps_on && self.publisher.is_behind(state) && (idle || at_once || self.due())) {
            return false;
        }
        let stats = self.publisher.publish(state);
        self.last_swap = Instant::now();
        self.metrics.applier.swaps.inc();
        self.metrics.applier.swap_duration.observe(stats.took.as_secs_f64());
        if stats.full_copy {
            self.metrics.applier.swap_full_copies.inc();
        }
        self.metrics.applier.model_version.set(state.position);
        if let Some(loss) = state.progressive_loss() {
            self.metrics.applier.progressive_logloss.set(loss);
        }
        let now_ms = crate::telemetry::unix_ms();
        for ts in self.pending_ts.drain(..) {
            self.metrics.applier.freshness.observe((now_ms - ts).max(0) as f64 / 1000.0);
        }
        true
    }

    /// The last state served, whatever the interval (at a stop).
    pub(super) fn publish_last(&mut self, state: &ReplicaState) {
        if self.publisher.is_behind(state) {
            self.publisher.publish(state);
        }
    }
}
