//! The divergence guard: it watches the progressive loss of applied
//! records and, on a spike, asks the fleet for a rollback to the last good
//! snapshot (appending a rollback record from a task of its own, off the
//! apply path). Taking the rollback is `rollback`'s.

use rdkafka::consumer::BaseConsumer;
use std::sync::atomic::Ordering;
use tracing::{error, info, warn};

use super::applier::Applier;
use super::handle::reachable_by_the_fleet;
use crate::checkpoint::Store;
use crate::update_log::control::ControlLog;
use crate::update_log::kafka;
use crate::update_log::record::{EventsSince, RollbackRecord};

/// The divergence guard, where it appends its rollback records, and the
/// runtime that appends them off the apply path.
pub(super) struct GuardLink {
    pub(super) guard: Guard,
    pub(super) control: ControlLog,
    pub(super) runtime: tokio::runtime::Handle,
}

/// Watches the progressive loss of applied gradient records. Each record's
/// mean loss feeds a fast moving average and a slow one (the baseline, fed
/// only by records within `factor` of it), each weighted by the record's
/// examples: a record of one event moves them little, one of a thousand
/// much. (Weighted per record, a run of tiny records after a broker outage,
/// a few events each at a high loss, once looked like a spike of 3x on a
/// clean stream, and the guard skipped 592 good events.) When the fast
/// average exceeds `factor` times the baseline, it reports a spike, once:
/// then it waits `warmup` examples after the next rollback before it may
/// report again.
#[derive(Debug)]
pub struct Guard {
    factor: f64,
    warmup: u64,
    fast: f64,
    baseline: f64,
    /// Examples seen since start or since the last rollback.
    seen: u64,
    /// Position after the last record within bounds.
    last_healthy: i64,
    fired: bool,
}

/// What the guard saw when it fired.
#[derive(Clone, Debug, PartialEq)]
pub struct Spike {
    pub fast: f64,
    pub baseline: f64,
    /// Position after the last record whose loss was within bounds.
    pub last_healthy: i64,
}

impl Guard {
    /// Examples at which a record moves the fast average halfway (a record
    /// of 100 moves it 0.3 of the way).
    const FAST_EXAMPLES: f64 = 233.0;
    /// The same for the baseline (a record of 100: 0.02 of the way).
    const SLOW_EXAMPLES: f64 = 4_900.0;

    /// How far a record of `examples` moves an average of scale `scale`.
    fn weight(examples: u32, scale: f64) -> f64 {
        let e = f64::from(examples);
        e / (e + scale)
    }

    pub fn new(factor: f64, warmup: u64, position: i64) -> Guard {
        Guard { factor, warmup, fast: 0.0, baseline: 0.0, seen: 0, last_healthy: position, fired: false }
    }

    pub fn last_healthy(&self) -> i64 {
        self.last_healthy
    }

    /// Takes an applied record's loss; `position` is the state's after it.
    /// A spike is reported only when `acting` (the replica is ready): one
    /// seen while replaying history is not answered there, so the guard
    /// stays armed and reports it once ready if it lasts.
    pub fn observe(&mut self, position: i64, examples: u32, loss_sum: f64, acting: bool) -> Option<Spike> {
        if examples == 0 || !loss_sum.is_finite() {
            return None;
        }
        let mean = loss_sum / f64::from(examples);
        self.seen += u64::from(examples);
        if self.seen == u64::from(examples) {
            (self.fast, self.baseline) = (mean, mean);
        }
        let fast_weight = Self::weight(examples, Self::FAST_EXAMPLES);
        self.fast += fast_weight * (mean - self.fast);
        let warm = self.seen >= self.warmup;
        if mean <= self.factor * self.baseline || !warm {
            // While warming up the baseline follows every record, faster.
            let rate = if warm { Self::weight(examples, Self::SLOW_EXAMPLES) } else { fast_weight };
            self.baseline += rate * (mean - self.baseline);
            self.last_healthy = position;
        }
        if acting && warm && !self.fired && self.fast > self.factor * self.baseline {
            self.fired = true;
            return Some(Spike { fast: self.fast, baseline: self.baseline, last_healthy: self.last_healthy });
        }
        None
    }

    /// After any rollback: the guard starts over. (The next record, the
    /// first it sees again, sets both averages: the baseline is relearned
    /// during the warm-up, not kept.)
    pub fn rolled_back(&mut self, position: i64) {
        self.seen = 0;
        self.fired = false;
        self.last_healthy = position;
    }
}

impl Applier {
    /// Feeds the divergence guard; on a spike, once ready (a replica that
    /// replays history never asks), appends a rollback to the last good
    /// snapshot with the events since skipped: learning them again would
    /// diverge again.
    pub(super) fn watch_loss(&mut self, examples: u32, loss_sum: f64) {
        let ready = self.ready.load(Ordering::Relaxed);
        let Some(GuardLink { guard, control, runtime }) = &mut self.guard else { return };
        let Some(spike) = guard.observe(self.state.position, examples, loss_sum, ready) else { return };
        self.metrics.rollback.divergences.inc();
        let Spike { fast, baseline, last_healthy } = spike;
        let (seen, fingerprint, producer) = (self.state.position, self.model.fingerprint(), self.replica_id.clone());
        let (control, store) = (control.clone(), self.store.clone());
        let left = self.progress.applied().rolled_back_from();
        let (connection, topic) = (self.log.connection().clone(), self.log.topic().to_string());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::tests::small_model;
    use crate::checkpoint::LocalStore;
    use crate::state::ReplicaState;

    #[test]
    fn a_spike_fires_once_and_names_the_last_healthy_position() {
        let mut g = Guard::new(3.0, 1000, 0);
        let mut position = 0;
        let mut feed = |g: &mut Guard, loss: f64| {
            position += 1;
            g.observe(position, 100, loss * 100.0, true)
        };
        // Warm-up: noisy but flat, nothing fires.
        for i in 0..50 {
            assert_eq!(feed(&mut g, 0.6 + 0.05 * (i % 3) as f64), None);
        }
        assert_eq!(g.last_healthy(), 50);
        // The loss quadruples: a spike within a few records, naming position 50.
        let spikes: Vec<Spike> = (0..20).filter_map(|_| feed(&mut g, 2.6)).collect();
        assert_eq!(spikes.len(), 1, "{spikes:?}");
        assert_eq!(spikes[0].last_healthy, 50);
        assert!((0.6..0.7).contains(&spikes[0].baseline), "{spikes:?}");
        // After the rollback, it warms up again before it may fire.
        g.rolled_back(80);
        for _ in 0..5 {
            assert_eq!(feed(&mut g, 2.6), None);
        }
    }

    #[test]
    fn a_spike_seen_while_replaying_is_reported_once_ready() {
        let mut g = Guard::new(3.0, 100, 0);
        for i in 0..50 {
            assert_eq!(g.observe(i + 1, 100, 60.0, false), None);
        }
        // The spike starts during replay: not reported there...
        for i in 50..60 {
            assert_eq!(g.observe(i + 1, 100, 260.0, false), None);
        }
        // ...and reported at the first record once ready, naming the last
        // healthy position before it.
        let spike = g.observe(61, 100, 260.0, true).expect("the guard stayed armed through the replay");
        assert_eq!(spike.last_healthy, 50);
    }

    #[test]
    fn tiny_records_at_a_high_loss_are_not_a_spike() {
        let mut g = Guard::new(3.0, 1000, 0);
        for i in 0..50 {
            assert_eq!(g.observe(i + 1, 500, 0.33 * 500.0, true), None);
        }
        // After an outage: a run of one-event records, each at a high loss
        // (one event's loss is noisy), then full records again.
        for i in 50..80 {
            assert_eq!(g.observe(i + 1, 1, 1.4, true), None, "record {i}");
        }
        for i in 80..90 {
            assert_eq!(g.observe(i + 1, 500, 0.35 * 500.0, true), None, "record {i}");
        }
    }

    #[test]
    fn a_slow_drift_is_not_a_spike() {
        let mut g = Guard::new(3.0, 100, 0);
        for i in 0..2000 {
            let loss = 0.6 + i as f64 * 0.0005; // to 1.6 over 2000 records
            assert_eq!(g.observe(i + 1, 10, loss * 10.0, true), None, "record {i}");
        }
    }

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
