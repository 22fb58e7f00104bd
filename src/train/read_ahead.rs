//! Events read ahead, per partition, and the merge that makes a batch of
//! them in event-time order, each partition's events a range: pure code,
//! no Kafka, no weights. The trainer fills the partitions and sends the
//! batches; what a range may cover is the apply rule's (`MAX_RANGE_GAP`).
//!
//! Why merge by event time: Kafka hands a consumer whole producer batches
//! (thousands of events of one partition), so the order in which events
//! arrive is partition by partition. Learned in that order, a backlog of 8
//! partitions showed the model each stretch of time eight times, and a
//! drift of the stream eight times over.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::apply::progress::TrainerProgress;
use crate::event::Example;
use crate::update_log::record::{EventRange, MAX_RANGE_GAP, MAX_RECORD_EVENTS};

/// Where a valid event of a batch came from, for the dead-letter topic
/// should its gradient alone be refused.
#[derive(Debug)]
pub(super) struct Source {
    pub(super) partition: i32,
    pub(super) offset: i64,
    pub(super) payload: Vec<u8>,
}

/// The events of one record.
#[derive(Debug, Default)]
pub(super) struct Batch {
    pub(super) examples: Vec<Example>,
    /// Where each of `examples` came from, in the same order.
    pub(super) sources: Vec<Source>,
    /// Invalid events: counted, learned from by no one.
    pub(super) skipped: u32,
    pub(super) oldest_ts: i64,
    /// One range per partition it took events of, by partition.
    pub(super) ranges: Vec<EventRange>,
}

/// An event read ahead: its offset, its event time, and what it parsed to
/// with its payload (`None`: invalid, already dead-lettered; it counts as
/// skipped in the record that takes it).
#[derive(Debug)]
pub(super) struct ReadAhead {
    pub(super) offset: i64,
    /// What a batch merges partitions by: the event's `ts`, or the Kafka
    /// record's timestamp for an event without one (and an invalid one),
    /// so that every stream has an event time; 0 when neither is there.
    /// Ties go round the partitions.
    pub(super) ts: i64,
    pub(super) example: Option<(Example, Vec<u8>)>,
}

/// The event time of an event: its own `ts` if it has one, else the Kafka
/// record's timestamp (the producer's clock when it was produced, or the
/// broker's with `LogAppendTime`).
pub(super) fn event_time(example: Option<&Example>, record_ts: Option<i64>) -> i64 {
    example.and_then(|e| e.ts).or(record_ts).unwrap_or(0)
}

/// How long after its last record another trainer's progress still bounds
/// this one's (`train.max_event_time_lead_ms`): a learning trainer sends
/// a record every few milliseconds; one idle (caught up), held back by the
/// alignment itself (it is then ahead), or dead stops counting after this.
pub(super) const TRAINER_IDLE_AFTER: Duration = Duration::from_secs(1);

/// What the trainer knows of one partition it owns.
#[derive(Debug)]
pub(super) struct Partition {
    /// `from` of the partition's next range: after the last event a record
    /// took.
    pub(super) next_from: i64,
    /// Offset after the last event read.
    pub(super) end: i64,
    /// Read, not yet in a record, oldest first.
    pub(super) read_ahead: VecDeque<ReadAhead>,
    /// Assigned before the applier had read the log to this position: no
    /// event is taken until it has, then the partition restarts at the
    /// watermark it has by then. (Learning from a stale watermark would only
    /// append records that every replica rejects.)
    pub(super) hold_until: Option<i64>,
    /// The partition was seen ending below its applied watermark (reported
    /// once per assignment).
    pub(super) below_watermark: bool,
    /// The partition's high watermark as librdkafka last fetched it (-1
    /// before a fetch): events before it exist, read or not.
    pub(super) fetched_end: i64,
    /// The consumer's position as librdkafka keeps it (-1 before one):
    /// past the transaction markers it read after the last event, which
    /// `end` cannot see.
    pub(super) position: i64,
    /// The event time of the last event read: where the partition's next
    /// event is in time, at the earliest.
    pub(super) last_ts: i64,
    /// An `end` at which the merge stopped waiting for this partition
    /// (`MAX_HOLD`): it does not hold the merge again at the same end.
    pub(super) released_at: Option<i64>,
}

impl Partition {
    pub(super) fn at(watermark: i64) -> Partition {
        Partition {
            next_from: watermark,
            end: watermark,
            read_ahead: VecDeque::new(),
            hold_until: None,
            below_watermark: false,
            fetched_end: -1,
            position: -1,
            last_ts: 0,
            released_at: None,
        }
    }

    /// Whether the merge must wait for this partition: nothing of it is read
    /// ahead, yet it has events to fetch (below its high watermark), and
    /// those may be older than the other partitions' heads. A partition at
    /// its end (live, caught up; at a transaction's commit marker, which
    /// only the consumer's position passes) does not hold the others back.
    pub(super) fn holds(&self) -> bool {
        self.read_ahead.is_empty()
            && self.hold_until.is_none()
            && self.end.max(self.position) < self.fetched_end
            && self.released_at != Some(self.end)
    }

    /// The offsets without an event that a range from `next_from` would
    /// cover if it took the event at `offset` after `taken` others.
    pub(super) fn gap_before(&self, offset: i64, taken: i64) -> i64 {
        offset - self.next_from - taken
    }

    /// What to do with the event at `offset`. At or after `end`: take it
    /// (one beyond `end` follows a gap, transaction markers, compaction or
    /// retention, which the next record's range covers). Before `end`: one a
    /// record took, or one in the read-ahead, came again (fetched before a
    /// seek back, or redelivered when librdkafka restarts a fetch at an
    /// earlier position) and is not ours to learn again; but one that is in
    /// neither was passed over as if it were a gap, and the next record's
    /// range would cover it unlearned: the partition must be read again
    /// from `next_from`.
    pub(super) fn admit(&self, offset: i64) -> Admit {
        if offset >= self.end {
            return Admit::Take;
        }
        let read = offset < self.next_from || self.read_ahead.binary_search_by_key(&offset, |r| r.offset).is_ok();
        match read {
            true => Admit::AlreadyRead,
            false => Admit::Missed,
        }
    }
}

/// What a partition does with an event fetched for it.
#[derive(Debug, PartialEq)]
pub(super) enum Admit {
    Take,
    AlreadyRead,
    /// Fetched out of order, after events beyond it were read: read the
    /// partition again from where its next record starts.
    Missed,
}

/// Takes up to `max` events from the partitions' read-ahead, merging them
/// by event time (the oldest head first; ties go to the partition this
/// batch took fewest from, so events of one time go round the partitions),
/// and makes each partition's events a range. A partition
/// that runs out of read-ahead while it has events still to fetch
/// ([`Partition::holds`]) stops the batch at its last event time: what
/// comes after that in the others waits for its next events. No event after
/// `until` (the fleet's event-time alignment) is taken. A range covers
/// at most its events and `MAX_RANGE_GAP` offsets of gaps, as the apply rule
/// checks: a partition whose next event lies beyond that stops for this
/// batch, and one whose head alone lies beyond it (retention deleted events
/// nobody learned) gets a range of the allowance and no event, so that a
/// large gap takes several records.
pub(super) fn merge_by_event_time(partitions: &mut HashMap<i32, Partition>, max: usize, until: Option<i64>) -> Batch {
    let mut batch = Batch::default();
    let mut taken: HashMap<i32, i64> = HashMap::new();
    for _ in 0..max.min(MAX_RECORD_EVENTS as usize) {
        let held = partitions.values().filter(|p| p.holds()).map(|p| p.last_ts);
        let horizon = held.chain(until).min();
        let next = (partitions.iter())
            .filter_map(|(&id, p)| {
                let count = taken.get(&id).copied().unwrap_or(0);
                let head = p.read_ahead.front().filter(|head| p.gap_before(head.offset, count) <= MAX_RANGE_GAP)?;
                Some((head.ts, count, id))
            })
            .min()
            .filter(|&(ts, _, _)| horizon.is_none_or(|horizon| ts <= horizon));
        let Some((ts, _, id)) = next else { break };
        let event = partitions.get_mut(&id).and_then(|p| p.read_ahead.pop_front()).expect("a head");
        *taken.entry(id).or_default() += 1;
        match event.example {
            Some((example, payload)) => {
                if ts > 0 {
                    batch.oldest_ts = if batch.oldest_ts == 0 { ts } else { batch.oldest_ts.min(ts) };
                }
                batch.examples.push(example);
                batch.sources.push(Source { partition: id, offset: event.offset, payload });
            }
            None => batch.skipped += 1,
        }
    }
    for (&id, p) in partitions.iter() {
        if p.read_ahead.front().is_some_and(|head| p.gap_before(head.offset, 0) > MAX_RANGE_GAP) {
            taken.entry(id).or_insert(0);
        }
    }
    for (&partition, &count) in &taken {
        // The range ends where the partition's next event is, or at the
        // read end when none is left (so a gap after it is covered), within
        // the gap allowance.
        let p = partitions.get_mut(&partition).expect("taken from");
        let reach = p.read_ahead.front().map_or(p.end, |next| next.offset);
        let to = reach.min(p.next_from + count + MAX_RANGE_GAP);
        batch.ranges.push(EventRange { partition, from: p.next_from, to });
        p.next_from = to;
    }
    batch.ranges.sort_by_key(|r| r.partition);
    batch
}

/// The newest event time a trainer `me` may take at `now`: the slowest of
/// the other trainers heard from within `TRAINER_IDLE_AFTER`, plus `lead`
/// milliseconds; none without such a trainer.
pub(super) fn aligned_bound(
    trainers: &HashMap<String, TrainerProgress>,
    me: &str,
    lead: u64,
    now: Instant,
) -> Option<i64> {
    let live = trainers.iter().filter(|(id, p)| *id != me && now.duration_since(p.seen) < TRAINER_IDLE_AFTER);
    live.map(|(_, p)| p.event_time).min().map(|slowest| slowest.saturating_add(lead as i64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Features;
    use crate::model::Gradient;
    use crate::update_log::record::{GradientRecord, RecordMeta};

    /// A partition at `from` that read `events` as (offset, event time;
    /// `None`: invalid), up to `end`.
    fn read(from: i64, end: i64, events: &[(i64, Option<i64>)]) -> Partition {
        let mut p = Partition::at(from);
        p.end = end;
        for &(offset, ts) in events {
            let example = ts.map(|ts| {
                (Example { features: Features { dense: vec![], ids: vec![] }, label: 0.0, ts: Some(ts) }, Vec::new())
            });
            p.read_ahead.push_back(ReadAhead { offset, ts: ts.unwrap_or(0), example });
        }
        p
    }

    #[test]
    fn an_event_time_is_the_events_own_else_the_kafka_records() {
        let example = |ts| Example { features: Features { dense: vec![], ids: vec![] }, label: 0.0, ts };
        assert_eq!(event_time(Some(&example(Some(7))), Some(1_000)), 7);
        assert_eq!(event_time(Some(&example(None)), Some(1_000)), 1_000);
        assert_eq!(event_time(None, Some(1_000)), 1_000, "an invalid event keeps its record's time");
        assert_eq!(event_time(Some(&example(None)), None), 0);
    }

    #[test]
    fn a_partition_with_events_still_to_fetch_holds_the_merge_at_its_last_event_time() {
        let mut behind = read(0, 2, &[]);
        behind.last_ts = 150;
        behind.fetched_end = 40;
        let mut partitions =
            HashMap::from([(0, read(10, 13, &[(10, Some(100)), (11, Some(200)), (12, Some(300))])), (1, behind)]);
        let batch = merge_by_event_time(&mut partitions, 10, None);
        let times: Vec<i64> = batch.examples.iter().filter_map(|e| e.ts).collect();
        assert_eq!(times, [100], "200 may come after partition 1's next event");
        // Its next events come: the merge goes on in order.
        let p = partitions.get_mut(&1).unwrap();
        p.read_ahead = read(2, 3, &[(2, Some(160))]).read_ahead;
        p.end = 3;
        p.last_ts = 160;
        let batch = merge_by_event_time(&mut partitions, 10, None);
        let times: Vec<i64> = batch.examples.iter().filter_map(|e| e.ts).collect();
        assert_eq!(times, [160], "partition 1 is empty again and still behind its fetched end");
        // At its end (caught up, live) it holds nothing back.
        partitions.get_mut(&1).unwrap().fetched_end = 3;
        let batch = merge_by_event_time(&mut partitions, 10, None);
        assert_eq!(batch.examples.iter().filter_map(|e| e.ts).collect::<Vec<_>>(), [200, 300]);
    }

    #[test]
    fn no_event_past_the_fleets_bound_is_taken() {
        let mut partitions = HashMap::from([(0, read(0, 3, &[(0, Some(100)), (1, Some(200)), (2, None)]))]);
        let batch = merge_by_event_time(&mut partitions, 10, Some(150));
        assert_eq!(batch.examples.iter().filter_map(|e| e.ts).collect::<Vec<_>>(), [100]);
        assert!(merge_by_event_time(&mut partitions, 10, Some(150)).ranges.is_empty(), "200 waits for the fleet");
        assert_eq!(merge_by_event_time(&mut partitions, 10, Some(250)).ranges.len(), 1);
    }

    #[test]
    fn the_bound_is_the_slowest_live_other_trainer_plus_the_lead() {
        let now = Instant::now();
        let progress = |event_time, ago_ms| TrainerProgress { event_time, seen: now - Duration::from_millis(ago_ms) };
        let mut trainers = HashMap::from([
            ("me".to_string(), progress(10, 0)),
            ("peer".to_string(), progress(500, 5)),
            ("slow".to_string(), progress(300, 20)),
        ]);
        assert_eq!(aligned_bound(&trainers, "me", 100, now), Some(400), "its own progress does not bound it");
        trainers.insert("slow".into(), progress(300, 1_500));
        assert_eq!(aligned_bound(&trainers, "me", 100, now), Some(600), "idle for more than a second: not counted");
        trainers.remove("peer");
        assert_eq!(aligned_bound(&trainers, "me", 100, now), None, "alone: no bound");
    }

    #[test]
    fn a_released_partition_holds_again_only_once_it_moved() {
        let mut p = read(0, 5, &[]);
        p.fetched_end = 9;
        assert!(p.holds());
        p.released_at = Some(5);
        assert!(!p.holds(), "released at this end");
        p.end = 6;
        assert!(p.holds(), "a new end, a new wait");
        p.hold_until = Some(3);
        assert!(!p.holds(), "a partition not yet started holds nothing back");
    }

    #[test]
    fn a_batch_merges_partitions_by_event_time_and_each_becomes_one_range() {
        let mut partitions = HashMap::from([
            // Offset 11 is a gap (a transaction marker): the range covers it.
            (0, read(10, 14, &[(10, Some(100)), (12, Some(300)), (13, Some(500))])),
            (3, read(0, 3, &[(0, Some(200)), (1, None), (2, Some(400))])),
        ]);
        let batch = merge_by_event_time(&mut partitions, 4, None);
        let times: Vec<i64> = batch.examples.iter().filter_map(|e| e.ts).collect();
        assert_eq!(times, [100, 200, 300], "oldest first across partitions");
        assert_eq!(batch.skipped, 1, "the invalid event (time 0) came first of partition 3's rest");
        let sources: Vec<(i32, i64)> = batch.sources.iter().map(|s| (s.partition, s.offset)).collect();
        assert_eq!(sources, [(0, 10), (3, 0), (0, 12)], "each example's source, in the same order");
        assert_eq!(
            batch.ranges,
            [EventRange { partition: 0, from: 10, to: 13 }, EventRange { partition: 3, from: 0, to: 2 }]
        );
        let rest = merge_by_event_time(&mut partitions, 10, None);
        assert_eq!(rest.examples.iter().filter_map(|e| e.ts).collect::<Vec<_>>(), [400, 500]);
        assert_eq!(
            rest.ranges,
            [EventRange { partition: 0, from: 13, to: 14 }, EventRange { partition: 3, from: 2, to: 3 }],
            "each range continues the last"
        );
        assert!(merge_by_event_time(&mut partitions, 10, None).ranges.is_empty());
    }

    #[test]
    fn a_range_covers_its_events_and_at_most_the_gap_allowance() {
        let far = MAX_RANGE_GAP * 5 / 2;
        // Partition 0: events at 0 and 1, then one beyond the allowance.
        // Partition 1: its first event beyond it (retention deleted the rest).
        let mut partitions = HashMap::from([
            (0, read(0, far + 3, &[(0, Some(1)), (1, Some(2)), (far + 2, Some(3))])),
            (1, read(0, far + 1, &[(far, Some(4))])),
        ]);
        let mut records = Vec::new();
        while partitions.values().any(|p| !p.read_ahead.is_empty()) {
            let batch = merge_by_event_time(&mut partitions, 64, None);
            let record = GradientRecord::new(
                RecordMeta {
                    fingerprint: 0,
                    ranges: batch.ranges.clone(),
                    base: 0,
                    examples: batch.examples.len() as u32,
                    skipped: batch.skipped,
                    oldest_ts: 0,
                    producer: "t".into(),
                },
                Gradient::default(),
            );
            assert!(record.sizes_agree(), "{:?}", batch.ranges);
            records.push(batch);
            assert!(records.len() < 10, "the gaps are crossed in a few records");
        }
        let learned: usize = records.iter().map(|b| b.examples.len()).sum();
        assert_eq!(learned, 4, "every event learned once");
        for (id, end) in [(0, far + 3), (1, far + 1)] {
            let mut at = 0;
            for range in records.iter().flat_map(|b| &b.ranges).filter(|r| r.partition == id) {
                assert_eq!(range.from, at, "partition {id}'s ranges follow one another");
                at = range.to;
            }
            assert_eq!(at, end, "partition {id} covered to its end");
        }
    }

    #[test]
    fn events_without_a_time_go_round_the_partitions() {
        let untimed = |from: i64| read(from, from + 3, &[(from, Some(0)), (from + 1, Some(0)), (from + 2, Some(0))]);
        let mut partitions = HashMap::from([(1, untimed(0)), (2, untimed(50))]);
        let batch = merge_by_event_time(&mut partitions, 4, None);
        assert_eq!(
            batch.ranges,
            [EventRange { partition: 1, from: 0, to: 2 }, EventRange { partition: 2, from: 50, to: 52 }]
        );
    }

    #[test]
    fn a_partition_takes_its_next_offset_and_crosses_gaps_but_never_goes_back() {
        let mut p = read(100, 100, &[]);
        assert_eq!(p.admit(99), Admit::AlreadyRead, "fetched before the seek, or redelivered");
        assert_eq!(p.admit(100), Admit::Take);
        p = read(100, 101, &[(100, Some(1))]);
        // Offsets 101..=149 are transaction markers or compacted away.
        assert_eq!(p.admit(150), Admit::Take);
        p = read(100, 151, &[(100, Some(1)), (150, Some(2))]);
        assert_eq!(p.admit(150), Admit::AlreadyRead, "a redelivery after a fetch restart is not learned twice");
        assert_eq!(p.admit(100), Admit::AlreadyRead);
        // An event that came after the ones beyond it (a queue drained out
        // of order) is no gap: taking 150 had passed over it.
        assert_eq!(p.admit(120), Admit::Missed);
    }
}
