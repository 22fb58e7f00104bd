//! The trainer's events side: its membership of the consumer group over
//! `events`, the partitions it owns, their queues and the read-ahead they
//! fill, seeks back to the applied watermarks, offset commits and the lag
//! gauges, and the dead-letter topic for events it cannot learn.
//!
//! Owns the consumer; knows nothing of gradients, records or what is in
//! flight: the trainer decides when to read, merge, seek and commit.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, error, info, warn};

use super::context::{Rebalanced, TrainerContext};
use super::dead_letter::{DeadLetters, Refusal};
use super::fetch::{self, Fetched, Fetcher};
use super::read_ahead::{event_time, Admit, Partition, ReadAhead, Source};
use crate::apply::progress::Progress;
use crate::config::Config;
use crate::event::EventCodec;
use crate::lifecycle::StopRequest;
use crate::metrics::Metrics;
use crate::model::Model;
use crate::update_log::kafka;

/// Events read ahead, over all partitions: enough for every partition of a
/// backlog to be present when a batch is merged (a producer batch is up to
/// a megabyte, about 3 000 events of the load report's stream), and a few
/// megabytes of parsed events. Each partition is read from its own queue
/// while it has less than its share (`partition_read_ahead`).
const READ_AHEAD: usize = 32_768;

/// A partition's share of the read-ahead stays within these: a batch's
/// worth at least, and no more than the merge needs of one partition.
const PARTITION_READ_AHEAD: std::ops::RangeInclusive<usize> = 1024..=4096;

/// How long the merge waits for a partition with events still to fetch
/// before it merges without it (its events then come later than their
/// event time). A fetch takes milliseconds; this covers a slow leader, and a
/// partition whose end is a transaction marker (no event to fetch up to
/// the high watermark), which holds once per position only.
const MAX_HOLD: Duration = Duration::from_millis(100);

/// How long a commit may spend asking the broker for its partitions' ends
/// (for the lag), on the poll thread; one more ask may run 500 ms over.
const LAG_QUERY_BUDGET: Duration = Duration::from_millis(1000);

pub(super) struct Intake {
    consumer: Arc<BaseConsumer<TrainerContext>>,
    /// The partitions' queues, read from the same consumer.
    fetcher: Fetcher,
    /// JSON or Avro (`kafka.event_format`).
    events: EventCodec,
    /// Where events it cannot learn go, with why.
    dead_letters: DeadLetters,
    pub(super) partitions: HashMap<i32, Partition>,
    topic: String,
    /// `topic` for librdkafka's C API.
    topic_c: CString,
    /// Since when the merge waits for a partition (see [`Partition::holds`]).
    held_since: Option<Instant>,
    /// The partition whose lag a commit asked about last.
    lag_cursor: i32,
    model: Arc<Model>,
    metrics: Arc<Metrics>,
}

impl Intake {
    /// Builds the consumer, joining no group yet.
    pub(super) fn new(
        config: &Config,
        model: Arc<Model>,
        metrics: Arc<Metrics>,
        progress: Arc<Progress>,
        stop: StopRequest,
    ) -> anyhow::Result<Intake> {
        let k = &config.kafka;
        let connection = kafka::Connection::of(k)?;
        let context = TrainerContext::new(k.updates_topic.clone(), progress.clone(), stop);
        let consumer: Arc<BaseConsumer<TrainerContext>> =
            Arc::new(fetch::consumer_config(&connection, config).create_with_context(context)?);
        Ok(Intake {
            fetcher: Fetcher::new(consumer.clone(), &k.events_topic, progress),
            consumer,
            events: EventCodec::new(k, model.featurizer()).map_err(anyhow::Error::msg)?,
            dead_letters: DeadLetters::new(&connection, config, metrics.clone())?,
            partitions: HashMap::new(),
            topic: k.events_topic.clone(),
            topic_c: CString::new(k.events_topic.as_str())?,
            held_since: None,
            lag_cursor: -1,
            model,
            metrics,
        })
    }

    pub(super) fn subscribe(&self) -> anyhow::Result<()> {
        self.consumer.subscribe(&[&self.topic])?;
        info!(topic = %self.topic, "trainer joined the consumer group");
        Ok(())
    }

    /// Leaves the consumer group at once (the partitions move within a
    /// rebalance, not a session timeout), drops what was read, and polls on
    /// until `stop`, so that librdkafka serves the leave (and a join still
    /// in flight when it was asked) instead of holding the partitions until
    /// the member is evicted; whatever it hands over is dropped.
    pub(super) fn leave_until(&mut self, stop: &StopRequest) {
        self.consumer.unsubscribe();
        self.fetcher.forget_all();
        self.partitions.clear();
        while !stop.is_requested() {
            let _ = self.fetcher.poll_consumer(Duration::from_millis(200));
            let _ = self.consumer.context().take_events();
        }
    }

    /// Flushes the dead letters, commits `watermarks` and leaves the group,
    /// closing the consumer.
    pub(super) fn close(mut self, watermarks: &BTreeMap<i32, i64>) {
        self.dead_letters.flush(Duration::from_secs(10));
        self.commit(watermarks, CommitMode::Sync);
        self.consumer.unsubscribe();
        // The last holder of the consumer: it closes here.
        drop(self.fetcher);
        drop(self.consumer);
        info!("trainer left the consumer group");
    }

    /// Takes what was fetched into the read-ahead: first whatever is in the
    /// consumer's own queue (events fetched before their partition's queue
    /// was split come before that queue's), then from each partition's
    /// queue until its read-ahead holds its share or the queue is empty.
    /// Returns the events taken.
    pub(super) fn take_fetched(&mut self) -> usize {
        let mut taken = 0;
        // A partition assigned during a poll is split after it: what was
        // fetched for it in between is in the consumer's queue, so that is
        // drained again before any partition's own queue is read.
        loop {
            while let Some(fetched) = self.fetcher.poll_consumer(Duration::ZERO) {
                self.take_rebalances();
                self.take_event(fetched);
                taken += 1;
            }
            if !self.take_rebalances() {
                break;
            }
        }
        let share = self.partition_read_ahead();
        let short: Vec<i32> =
            (self.partitions.iter()).filter(|(_, p)| p.read_ahead.len() < share).map(|(&id, _)| id).collect();
        for id in short {
            while self.partitions.get(&id).is_some_and(|p| p.read_ahead.len() < share) {
                let Some(fetched) = self.fetcher.poll_partition(id) else { break };
                self.take_event(fetched);
                taken += 1;
            }
        }
        taken
    }

    /// Events to read ahead of each partition: an equal share of
    /// `READ_AHEAD`, within `PARTITION_READ_AHEAD`.
    fn partition_read_ahead(&self) -> usize {
        let share = READ_AHEAD / self.partitions.len().max(1);
        share.clamp(*PARTITION_READ_AHEAD.start(), *PARTITION_READ_AHEAD.end())
    }

    /// Events read ahead, over all partitions.
    pub(super) fn read_ahead(&self) -> usize {
        self.partitions.values().map(|p| p.read_ahead.len()).sum()
    }

    /// Notes each partition's high watermark as librdkafka last fetched it,
    /// and the consumer's position (from its cache: no request to the
    /// broker).
    pub(super) fn note_fetched_ends(&mut self) {
        let client = self.consumer.client().native_ptr();
        let positions = self.consumer.position().ok();
        for (&id, p) in self.partitions.iter_mut() {
            let position = positions.as_ref().and_then(|t| t.find_partition(&self.topic, id)).map(|e| e.offset());
            if let Some(rdkafka::Offset::Offset(o)) = position {
                p.position = o;
            }
            let (mut low, mut high) = (-1i64, -1i64);
            // SAFETY: the client lives as long as `self.consumer`; the topic
            // is a NUL-terminated string that outlives the call; librdkafka
            // only writes the two offsets.
            let err = unsafe {
                rdkafka::bindings::rd_kafka_get_watermark_offsets(
                    client,
                    self.topic_c.as_ptr(),
                    id,
                    &mut low,
                    &mut high,
                )
            };
            if err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0 {
                p.fetched_end = high;
            }
        }
    }

    /// Whether the merge should wait for a partition with events still to
    /// fetch, up to `MAX_HOLD`; past it, those partitions stop holding at
    /// their position, and the merge goes on without them.
    pub(super) fn merge_waits(&mut self) -> bool {
        if !self.partitions.values().any(Partition::holds) {
            self.held_since = None;
            return false;
        }
        let since = *self.held_since.get_or_insert_with(Instant::now);
        if since.elapsed() < MAX_HOLD {
            return true;
        }
        for (id, p) in self.partitions.iter_mut().filter(|(_, p)| p.holds()) {
            debug!(
                partition = id,
                end = p.end,
                fetched_end = p.fetched_end,
                "merging without a partition still to fetch"
            );
            p.released_at = Some(p.end);
        }
        self.metrics.trainer.merge_holds_released.inc();
        self.held_since = None;
        false
    }

    /// A wait for a partition counts from `now` (time spent blocked
    /// elsewhere on this thread is not the partition's).
    pub(super) fn restart_hold_clock(&mut self, now: Instant) {
        if self.held_since.is_some() {
            self.held_since = Some(now);
        }
    }

    /// Takes the rebalances since the last call; whether a partition was
    /// assigned (and given its own queue).
    fn take_rebalances(&mut self) -> bool {
        let mut assigned = false;
        for event in self.consumer.context().take_events() {
            match event {
                Rebalanced::Assigned(list, hold) => {
                    for (id, watermark) in list {
                        assigned = true;
                        info!(partition = id, watermark, "partition assigned");
                        let mut p = Partition::at(watermark);
                        p.hold_until = hold;
                        self.partitions.insert(id, p);
                        self.fetcher.split(id);
                    }
                }
                Rebalanced::Revoked(list) => {
                    for id in list {
                        info!(partition = id, "partition revoked");
                        self.partitions.remove(&id);
                        self.fetcher.forget(id);
                        let _ = self.metrics.trainer.consumer_lag.remove_label_values(&[&id.to_string()]);
                    }
                }
            }
        }
        assigned
    }

    /// Parses a fetched event into its partition's read-ahead (an invalid
    /// one goes to the dead-letter topic and is kept as skipped).
    fn take_event(&mut self, fetched: Fetched) {
        let Fetched { partition: id, offset, record_ts, payload } = fetched;
        let Some(p) = self.partitions.get_mut(&id) else { return };
        if p.hold_until.is_some() {
            return;
        }
        match p.admit(offset) {
            Admit::Take => {}
            Admit::AlreadyRead => return,
            Admit::Missed => return self.read_again(id),
        }
        if offset > p.end {
            // Legitimate with transactions or compaction; worth seeing otherwise.
            debug!(partition = id, expected = p.end, offset, "gap in the events partition");
        }
        p.end = offset + 1;
        self.metrics.trainer.events_consumed.inc();
        let example = match self.events.example(self.model.featurizer(), &payload) {
            Ok(example) => Some((example, payload)),
            Err(e) => {
                self.metrics.trainer.events_invalid.inc();
                debug!(partition = id, offset, error = %e, "invalid event: to the dead-letter topic");
                self.dead_letters.send(id, offset, &payload, e.kind(), &e.to_string());
                None
            }
        };
        if let Some(p) = self.partitions.get_mut(&id) {
            let ts = event_time(example.as_ref().map(|(e, _)| e), record_ts);
            p.last_ts = ts;
            p.read_ahead.push_back(ReadAhead { offset, ts, example });
        }
    }

    /// Reads partition `id` again from where its next record starts,
    /// dropping what was read ahead: an event came after events beyond it
    /// (see [`Partition::admit`]). Said, since it should not happen.
    fn read_again(&mut self, id: i32) {
        let Some(from) = self.partitions.get(&id).map(|p| p.next_from) else { return };
        warn!(
            partition = id,
            from,
            "an event was fetched after events beyond it: reading the partition again from its next record's start"
        );
        self.metrics.trainer.partitions_read_again.inc();
        if self.seek(id, from) {
            self.partitions.insert(id, Partition::at(from));
        }
    }

    /// Dead-letters an event whose gradient alone is refused, and counts it.
    pub(super) fn refuse_event(&self, source: &Source, refusal: &Refusal) {
        let Source { partition, offset, payload } = source;
        warn!(partition, offset, reason = %refusal, "an event's gradient alone is refused: to the dead-letter topic");
        self.metrics.trainer.events_refused.with_label_values(&[refusal.kind()]).inc();
        self.dead_letters.send(*partition, *offset, payload, refusal.kind(), &refusal.to_string());
    }

    /// Starts the partitions held until the applier reached `position`, each
    /// at its applied watermark.
    pub(super) fn start_held(&mut self, position: i64, watermarks: &BTreeMap<i32, i64>) {
        let held: Vec<i32> = (self.partitions.iter())
            .filter(|(_, p)| p.hold_until.is_some_and(|until| position >= until))
            .map(|(&id, _)| id)
            .collect();
        for id in held {
            let watermark = watermarks.get(&id).copied().unwrap_or(0);
            info!(partition = id, watermark, "the applier caught up: starting the held partition");
            if self.seek(id, watermark) {
                // A held partition reads nothing ahead.
                self.partitions.insert(id, Partition::at(watermark));
            }
        }
    }

    /// Whether some started partition's next event does not continue its
    /// applied watermark (another trainer moved it: a rebalance overlap).
    /// Only meaningful with no record in flight.
    pub(super) fn moved_under(&self, watermarks: &BTreeMap<i32, i64>) -> bool {
        (self.partitions.iter())
            .any(|(id, p)| p.hold_until.is_none() && p.next_from != watermarks.get(id).copied().unwrap_or(0))
    }

    /// Sends every started partition back to its applied watermark,
    /// dropping what was read ahead.
    pub(super) fn seek_back(&mut self, watermarks: &BTreeMap<i32, i64>) {
        let ids: Vec<i32> = self.partitions.iter().filter(|(_, p)| p.hold_until.is_none()).map(|(&id, _)| id).collect();
        for id in ids {
            let wm = watermarks.get(&id).copied().unwrap_or(0);
            if self.seek(id, wm) {
                self.partitions.insert(id, Partition::at(wm));
            }
        }
    }

    /// Makes `offset` the next event fetched from partition `id`. Events
    /// fetched before are discarded by librdkafka once this returns.
    fn seek(&self, id: i32, offset: i64) -> bool {
        let mut tpl = TopicPartitionList::new();
        let result = (tpl.add_partition_offset(&self.topic, id, Offset::Offset(offset)))
            .and_then(|()| self.consumer.seek_partitions(tpl, Duration::from_secs(5)))
            .and_then(|tpl| tpl.elements().first().and_then(|e| e.error().err()).map_or(Ok(()), Err));
        if let Err(e) = &result {
            warn!(partition = id, offset, error = %e, "seek failed; will retry");
        }
        result.is_ok()
    }

    /// Commits the applied watermarks of owned partitions as the group's
    /// offsets, refreshes the lag gauges, and says so when a partition ends
    /// below its watermark. The lag is a round trip per partition on the
    /// poll thread, so a commit asks about partitions only until
    /// [`LAG_QUERY_BUDGET`] is spent, starting where the last one stopped:
    /// with many partitions and a slow broker the gauges refresh less often,
    /// and the poll thread still polls well within `max.poll.interval.ms`.
    /// (On a thread and client of its own the check cost three replicas
    /// learning a backlog a fifth of their rate in the quality scenario, so
    /// it stays here.)
    pub(super) fn commit(&mut self, watermarks: &BTreeMap<i32, i64>, mode: CommitMode) {
        let mut tpl = TopicPartitionList::new();
        let mut ids: Vec<i32> = self.partitions.keys().copied().collect();
        ids.sort_unstable();
        for &id in &ids {
            if let Some(&wm) = watermarks.get(&id) {
                let _ = tpl.add_partition_offset(&self.topic, id, Offset::Offset(wm));
            }
        }
        let start = ids.iter().position(|&id| id > self.lag_cursor).unwrap_or(0);
        let budget = Instant::now() + LAG_QUERY_BUDGET;
        for &id in ids[start..].iter().chain(&ids[..start]) {
            if Instant::now() >= budget {
                break;
            }
            self.lag_cursor = id;
            let wm = watermarks.get(&id).copied();
            if let Ok((_, high)) = self.consumer.fetch_watermarks(&self.topic, id, Duration::from_millis(500)) {
                let lag = high - wm.unwrap_or(0);
                self.metrics.trainer.consumer_lag.with_label_values(&[&id.to_string()]).set(lag.max(0));
                if let Some(wm) = wm.filter(|&wm| high < wm) {
                    self.report_below_watermark(id, high, wm);
                }
            }
        }
        if tpl.count() > 0 {
            if let Err(e) = self.consumer.commit(&tpl, mode) {
                debug!(error = %e, "offset commit failed; the next one catches up");
            }
        }
    }

    /// An events partition that ends below the watermark the fleet learned
    /// it to: the topic was deleted and recreated (or truncated), and its
    /// new events at offsets below the watermark will never be learned,
    /// since the watermark says they were. Only the operator can tell which
    /// history is right; the replica says so, once per assignment.
    fn report_below_watermark(&mut self, id: i32, end: i64, watermark: i64) {
        let Some(p) = self.partitions.get_mut(&id).filter(|p| !p.below_watermark) else { return };
        p.below_watermark = true;
        self.metrics.trainer.events_below_watermark.inc();
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
