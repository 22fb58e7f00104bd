//! The lag of the trainer's partitions and the check that none ends below
//! its applied watermark, off the trainer's poll thread: asking the broker
//! for each partition's end takes a round trip per partition (up to 500 ms
//! each on a slow broker), and the poll thread must poll within
//! `max.poll.interval.ms` or be evicted from the group. A thread of its own
//! with a client of its own (no group) asks, every interval, about the
//! partitions the trainer last said it owns.
//!
//! Owns the lag gauges' values and the below-watermark reports; may not
//! touch the trainer's partitions or the consumer group.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use tracing::error;

use crate::lifecycle::StopRequest;
use crate::metrics::Metrics;
use crate::update_log::kafka;

/// The partitions the trainer owns, each with its applied watermark.
type Owned = Arc<Mutex<BTreeMap<i32, i64>>>;

pub struct LagWatch {
    owned: Owned,
    thread: Option<std::thread::JoinHandle<()>>,
    stop: StopRequest,
}

impl LagWatch {
    /// Starts watching `topic` every `interval` until dropped.
    pub fn start(
        connection: &kafka::Connection,
        client_id: &str,
        topic: &str,
        metrics: Arc<Metrics>,
        interval: Duration,
    ) -> anyhow::Result<LagWatch> {
        let client: BaseConsumer = kafka::log_reader_config(connection, &format!("{client_id}-lag")).create()?;
        let (owned, stop) = (Owned::default(), StopRequest::default());
        let watch =
            Watcher { client, topic: topic.to_string(), metrics, owned: owned.clone(), reported: BTreeSet::new() };
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new().name("trainer-lag".into()).spawn(move || watch.run(&stop, interval))?
        };
        Ok(LagWatch { owned, thread: Some(thread), stop })
    }

    /// The partitions the trainer owns now, with their applied watermarks.
    pub fn owns(&self, owned: BTreeMap<i32, i64>) {
        *self.owned.lock().expect("lag lock") = owned;
    }
}

impl Drop for LagWatch {
    fn drop(&mut self) {
        self.stop.request();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Waits `interval`, or less if a stop is asked; whether it was.
fn pause(stop: &StopRequest, interval: Duration) -> bool {
    let until = std::time::Instant::now() + interval;
    loop {
        if stop.is_requested() {
            return true;
        }
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}

struct Watcher {
    client: BaseConsumer,
    topic: String,
    metrics: Arc<Metrics>,
    owned: Owned,
    /// Partitions reported below their watermark while owned (once each).
    reported: BTreeSet<i32>,
}

impl Watcher {
    fn run(mut self, stop: &StopRequest, interval: Duration) {
        while !pause(stop, interval) {
            let owned = self.owned.lock().expect("lag lock").clone();
            self.reported.retain(|id| owned.contains_key(id));
            for (&id, &watermark) in &owned {
                let Ok((_, end)) = self.client.fetch_watermarks(&self.topic, id, Duration::from_millis(500)) else {
                    continue;
                };
                self.metrics.consumer_lag.with_label_values(&[&id.to_string()]).set((end - watermark).max(0));
                if end < watermark && self.reported.insert(id) {
                    self.report_below_watermark(id, end, watermark);
                }
            }
        }
    }

    /// An events partition that ends below the watermark the fleet learned
    /// it to: the topic was deleted and recreated (or truncated), and its
    /// new events at offsets below the watermark will never be learned,
    /// since the watermark says they were. Only the operator can tell which
    /// history is right; the replica says so, once while it owns it.
    fn report_below_watermark(&self, id: i32, end: i64, watermark: i64) {
        self.metrics.events_below_watermark.inc();
        error!(
            topic = %self.topic,
            partition = id,
            end,
            watermark,
            "the events partition ends below its applied watermark: the topic was deleted and recreated, or \
             truncated; its events at offsets below the watermark will not be learned. Restore the topic, or \
             start the fleet afresh (a new update log and no checkpoints) to learn the new one"
        );
    }
}
