//! The join's time per partition, aligned across its two topics: a
//! prediction may expire only once the labels that came before its
//! deadline have been read, whichever topic the consumer fetched ahead.
//!
//! Each topic's partition has a time: the newest record time read from it
//! or, once it is read to its end, the clock's (a record written after that
//! is newer). Its end is the one its last fetch reported, or, before a fetch
//! brought a record (librdkafka caches the end from fetched message sets
//! only), the one the broker gave when the partition was assigned: without
//! it, a partition that got nothing new after a restart never reached its
//! end and its predictions never expired. A partition's time is the lower of
//! its two topics' (as Flink aligns watermarks and Kafka Streams waits for
//! an idle input): after a restart with a backlog, a fetch of predictions
//! ahead of their labels does not expire them.

use std::collections::HashMap;

/// Per `(topic is labels, partition)`: the next offset to read and the
/// newest record time read.
#[derive(Default)]
pub struct Clock {
    read: HashMap<(bool, i32), Read>,
    /// Each partition's end as the broker gave it at the assignment.
    assigned_ends: HashMap<(bool, i32), i64>,
}

#[derive(Clone, Copy)]
struct Read {
    next: i64,
    newest: i64,
}

impl Clock {
    /// Forgets every partition (after a revoke or an abort).
    pub fn clear(&mut self) {
        self.read.clear();
        self.assigned_ends.clear();
    }

    /// Where reading starts (the committed offset), before any record, and
    /// the partition's end then (`None`: the broker did not say).
    pub fn starts(&mut self, is_label: bool, partition: i32, next: i64, end: Option<i64>) {
        self.read.insert((is_label, partition), Read { next, newest: i64::MIN });
        if let Some(end) = end {
            self.assigned_ends.insert((is_label, partition), end);
        }
    }

    /// Whether a partition's end is known other than from a fetch.
    pub fn has_end(&self, is_label: bool, partition: i32) -> bool {
        self.assigned_ends.contains_key(&(is_label, partition))
    }

    /// A partition's end, as the broker gave it when asked.
    pub fn ends_at(&mut self, is_label: bool, partition: i32, end: i64) {
        self.assigned_ends.insert((is_label, partition), end);
    }

    /// A record read at `offset`, of `time`.
    pub fn read(&mut self, is_label: bool, partition: i32, offset: i64, time: i64) {
        let read = self.read.entry((is_label, partition)).or_insert(Read { next: 0, newest: i64::MIN });
        read.next = offset + 1;
        read.newest = read.newest.max(time);
    }

    /// The time of `partition` at wall-clock `now`; `end` gives a topic's
    /// partition's end as last fetched (`None`: not fetched yet).
    pub fn time(&self, partition: i32, now: i64, end: impl Fn(bool, i32) -> Option<i64>) -> i64 {
        let topic_time = |is_label: bool| {
            let read = self.read.get(&(is_label, partition)).copied();
            let assigned_end = self.assigned_ends.get(&(is_label, partition)).copied();
            match (read, end(is_label, partition).max(assigned_end)) {
                (Some(r), Some(end)) if r.next >= end => now,
                (Some(r), _) => r.newest,
                (None, _) => i64::MIN,
            }
        };
        topic_time(false).min(topic_time(true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_is_as_late_as_its_topic_not_read_to_the_end() {
        let mut clock = Clock::default();
        clock.starts(true, 0, 5, None);
        clock.read(false, 0, 0, 1000);
        clock.read(false, 0, 1, 9000);
        let end = |labels_end: i64| move |is_label: bool, _| Some(if is_label { labels_end } else { 2 });
        // Labels read to their end: the clock's time (predictions read to theirs too).
        assert_eq!(clock.time(0, 20_000, end(5)), 20_000);
        // Labels behind: the labels' newest time, none read yet.
        assert_eq!(clock.time(0, 20_000, end(9)), i64::MIN);
        clock.read(true, 0, 5, 3000);
        assert_eq!(clock.time(0, 20_000, end(9)), 3000);
        // Predictions behind: the lower of the two newest times.
        clock.read(false, 0, 1, 9000);
        assert_eq!(clock.time(0, 20_000, |l, _| Some(if l { 6 } else { 7 })), 9000);
        assert_eq!(clock.time(1, 20_000, end(5)), i64::MIN, "a partition not started has no time");
    }

    #[test]
    fn a_partition_nothing_was_fetched_from_is_at_its_end_as_assigned() {
        let mut clock = Clock::default();
        clock.starts(false, 0, 7, Some(7));
        clock.starts(true, 0, 3, Some(3));
        assert_eq!(clock.time(0, 20_000, |_, _| None), 20_000);
        clock.starts(true, 1, 3, Some(4));
        clock.starts(false, 1, 7, Some(7));
        assert_eq!(clock.time(1, 20_000, |_, _| None), i64::MIN, "a label to read first");
    }
}
