//! The applier loop: one OS thread that reads `updates` from the state's
//! position, applies every record by the rule, publishes serving snapshots
//! (coalesced), writes checkpoints, and tells the local trainer what became
//! of its records.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, info, warn};

use super::rule::{Outcome, State};
use crate::checkpoint::LocalStore;
use crate::log::kafka;
use crate::metrics::Metrics;
use crate::model::Model;
use crate::serving::Publisher;

/// What the applier has applied, for the trainer. Updated after each drained
/// run of records, not per record.
#[derive(Debug, Default)]
pub struct Applied {
    pub position: i64,
    pub watermarks: BTreeMap<i32, i64>,
    /// This replica's records that were rejected: (partition, from, to).
    pub rejected_own: Vec<(i32, i64, i64)>,
}

/// `Applied` behind a lock, with a condition variable to wait on.
#[derive(Debug, Default)]
pub struct Progress {
    pub applied: Mutex<Applied>,
    pub changed: Condvar,
}

impl Progress {
    /// Waits until the applied position reaches `position`, or `deadline`,
    /// or `stop`. Returns whether it was reached.
    pub fn wait_for(&self, position: i64, deadline: Instant, stop: &AtomicBool) -> bool {
        let mut applied = self.applied.lock().expect("progress lock");
        while applied.position < position {
            let now = Instant::now();
            if now >= deadline || stop.load(Ordering::Relaxed) {
                return false;
            }
            let wait = (deadline - now).min(Duration::from_millis(50));
            applied = self.changed.wait_timeout(applied, wait).expect("progress lock").0;
        }
        true
    }
}

pub struct Applier {
    pub model: Arc<Model>,
    pub state: State,
    pub publisher: Publisher,
    pub consumer: BaseConsumer,
    pub updates_topic: String,
    pub replica_id: String,
    pub metrics: Arc<Metrics>,
    pub progress: Arc<Progress>,
    pub store: LocalStore,
    pub checkpoint_every: Duration,
    /// Least time between swaps. `None`: swaps are off once ready, so the
    /// served weights stay those of start-up (a benchmark baseline only).
    pub min_swap_interval: Option<Duration>,
    /// Set once the state has caught up with the log end seen at start-up.
    pub ready: Arc<AtomicBool>,
    /// Set by the replica to stop; the applier then drains to `drain_to`.
    pub stop: Arc<AtomicBool>,
    /// Once stopping: the log end to reach before the final checkpoint.
    pub drain_to: Arc<Mutex<Option<i64>>>,
}

impl Applier {
    pub fn run(mut self) -> anyhow::Result<()> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.updates_topic, 0, Offset::Offset(self.state.position))?;
        self.consumer.assign(&tpl)?;
        let listed_end = kafka::log_end(&self.consumer, &self.updates_topic).unwrap_or(0);
        info!(position = self.state.position, log_end = listed_end, "applier started");
        if listed_end == 0 && self.state.position > 0 {
            // An empty log is certain even on Tansu; a short one is checked
            // on the first fetch response below.
            anyhow::bail!(ahead_of_log(self.state.position, &self.updates_topic, 0));
        }
        // Ready once the position reaches the log end as of start-up: the
        // larger of the listed end and the first fetch response's (see
        // `kafka::fetched_end`), fixed when that response comes.
        let mut start_end: Option<i64> = None;
        let mut last_swap = Instant::now();
        let interval = self.min_swap_interval;
        let swap_due = move |last_swap: Instant| interval.is_some_and(|i| last_swap.elapsed() >= i);
        let mut last_checkpoint = (Instant::now(), self.state.position);
        let mut pending_ts: Vec<i64> = Vec::new();
        let mut saver: Option<std::thread::JoinHandle<()>> = None;
        loop {
            let stopping = self.stop.load(Ordering::Relaxed);
            let drain_to = *self.drain_to.lock().expect("drain lock");
            if stopping && drain_to.is_none_or(|end| self.state.position >= end) {
                break;
            }
            // Drain what is there, up to one swap interval's worth.
            let mut read = 0;
            let mut own_rejections = Vec::new();
            let mut next = self.consumer.poll(Duration::from_millis(20));
            while let Some(message) = next {
                let message = message?;
                read += 1;
                let outcome = self.state.apply(&self.model, message.offset(), message.payload().unwrap_or(&[]), &mut self.publisher);
                match outcome {
                    Outcome::Applied(r) => {
                        self.metrics.records_applied.inc();
                        self.metrics.examples_learned.inc_by(u64::from(r.examples));
                        if r.oldest_ts > 0 {
                            pending_ts.push(r.oldest_ts);
                        }
                        debug!(partition = r.partition, from = r.from, to = r.to, producer = %r.producer, "applied");
                    }
                    Outcome::Rejected(r, reason) => {
                        self.metrics.records_rejected.with_label_values(&[reason.as_str()]).inc();
                        match r {
                            Some(r) => {
                                debug!(partition = r.partition, from = r.from, to = r.to, producer = %r.producer, reason = reason.as_str(), "rejected");
                                if r.producer == self.replica_id {
                                    own_rejections.push((r.partition, r.from, r.to));
                                }
                            }
                            None => warn!(offset = message.offset(), reason = reason.as_str(), "rejected unreadable record"),
                        }
                    }
                }
                if swap_due(last_swap) && self.publisher.is_behind(&self.state) {
                    break;
                }
                next = self.consumer.poll(Duration::ZERO);
            }
            if read > 0 {
                let mut applied = self.progress.applied.lock().expect("progress lock");
                applied.position = self.state.position;
                applied.watermarks.clone_from(&self.state.watermarks);
                applied.rejected_own.extend(own_rejections);
                drop(applied);
                self.progress.changed.notify_all();
            }
            // Swap at most at the configured rate, and at once when idle.
            let idle = read == 0;
            let swaps_on = self.min_swap_interval.is_some() || !self.ready.load(Ordering::Relaxed);
            if swaps_on && self.publisher.is_behind(&self.state) && (idle || swap_due(last_swap)) {
                let stats = self.publisher.publish(&self.state);
                last_swap = Instant::now();
                self.metrics.swaps.inc();
                self.metrics.swap_duration.observe(stats.took.as_secs_f64());
                if stats.full_copy {
                    self.metrics.swap_full_copies.inc();
                }
                self.metrics.model_version.set(self.state.position);
                if let Some(loss) = self.state.progressive_loss() {
                    self.metrics.progressive_logloss.set(loss);
                }
                let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
                for ts in pending_ts.drain(..) {
                    self.metrics.freshness.observe((now_ms - ts).max(0) as f64 / 1000.0);
                }
            }
            if start_end.is_none() {
                if let Some(fetched) = kafka::fetched_end(&self.consumer, &self.updates_topic) {
                    if fetched < self.state.position {
                        anyhow::bail!(ahead_of_log(self.state.position, &self.updates_topic, fetched));
                    }
                    start_end = Some(fetched.max(listed_end));
                }
            }
            let caught_up = start_end.is_some_and(|end| self.state.position >= end);
            if !self.ready.load(Ordering::Relaxed) && caught_up && !self.publisher.is_behind(&self.state) {
                info!(position = self.state.position, "caught up with the update log: ready");
                self.ready.store(true, Ordering::Release);
                self.metrics.ready.set(1);
            }
            self.metrics.checkpoint_age.set(last_checkpoint.0.elapsed().as_secs_f64());
            let due = last_checkpoint.0.elapsed() >= self.checkpoint_every && self.state.position != last_checkpoint.1;
            if due && saver.as_ref().is_none_or(|h| h.is_finished()) {
                // Serializing happens on another thread, off the apply path;
                // the clone is the price of not pausing the log.
                let (store, model, state, metrics) =
                    (self.store.clone(), self.model.clone(), self.state.clone(), self.metrics.clone());
                saver = Some(std::thread::spawn(move || save(&store, &model, &state, &metrics)));
                last_checkpoint = (Instant::now(), self.state.position);
            }
        }
        if let Some(h) = saver {
            let _ = h.join();
        }
        if self.publisher.is_behind(&self.state) {
            self.publisher.publish(&self.state);
        }
        save(&self.store, &self.model, &self.state, &self.metrics);
        info!(position = self.state.position, "applier stopped after a final checkpoint");
        Ok(())
    }
}

/// Why a replica refuses a checkpoint beyond the end of its update log:
/// reading on would wait for offsets that new records will reuse.
fn ahead_of_log(position: i64, topic: &str, end: i64) -> String {
    format!(
        "the checkpoint is at position {position} of {topic:?} but that log ends at {end}: the topic was deleted \
         or recreated, or the checkpoint belongs to another cluster. Remove the checkpoints to start from the seed \
         weights, or point the replica at the right brokers."
    )
}

fn save(store: &LocalStore, model: &Model, state: &State, metrics: &Metrics) {
    let start = Instant::now();
    match store.save(model, state) {
        Ok(info) => {
            metrics.checkpoints.with_label_values(&["ok"]).inc();
            info!(position = info.position, bytes = info.bytes, ms = start.elapsed().as_millis() as u64, "checkpoint written");
        }
        Err(e) => {
            metrics.checkpoints.with_label_values(&["error"]).inc();
            warn!(error = %e, "checkpoint failed; the log still holds everything, will retry");
        }
    }
}
