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

use crate::checkpoint::Store;
use crate::model::Model;
use crate::state::optim::NoTouch;
use crate::state::{Outcome, ReplicaState};
use crate::update_log::kafka;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
