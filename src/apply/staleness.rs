//! How stale the gradients the applier takes are. A gradient record names
//! the version (`base`, an update-log position) whose weights it was
//! computed against; it is applied at its own offset, after every record in
//! between changed those weights. Its staleness is that distance, counted
//! in records and in the examples those records taught.
//!
//! Owns only a short history of (position, examples learned); it reads the
//! state's counters and never changes the state. Metrics, not the apply
//! rule: a replica that starts late knows less history and reports what it
//! can (a base older than its history counts from its oldest entry).

use std::collections::VecDeque;

/// Entries kept: far more records than a trainer keeps in flight.
const HISTORY: usize = 4096;

/// The staleness of one applied record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Staleness {
    /// Records between the gradient's version and its own offset.
    pub records: u64,
    /// Examples those records taught (rejected records teach none).
    pub examples: u64,
}

/// Examples learned as of each recent position.
#[derive(Debug)]
pub struct StalenessMeter {
    /// (position, examples learned by the records before it), oldest first.
    history: VecDeque<(i64, u64)>,
}

impl StalenessMeter {
    /// Starts at the state's `position`, with `examples` learned by then.
    pub fn starting_at(position: i64, examples: u64) -> StalenessMeter {
        StalenessMeter { history: VecDeque::from([(position, examples)]) }
    }

    /// The staleness of a gradient computed at `base` and applied at
    /// `offset`, when `examples_before` examples were learned before it.
    pub fn measure(&self, base: i64, offset: i64, examples_before: u64) -> Staleness {
        let idx = self.history.partition_point(|&(p, _)| p <= base);
        let at_base = self.history.get(idx.saturating_sub(1)).map_or(examples_before, |&(_, e)| e);
        Staleness { records: (offset - base).max(0) as u64, examples: examples_before.saturating_sub(at_base) }
    }

    /// Notes that `examples` were learned by the records before `position`.
    /// A rollback moves the count back: the history starts over there.
    pub fn advanced(&mut self, position: i64, examples: u64) {
        if self.history.back().is_some_and(|&(p, e)| p >= position || e > examples) {
            self.history.clear();
        }
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back((position, examples));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staleness_counts_the_records_and_examples_since_the_gradients_version() {
        let mut meter = StalenessMeter::starting_at(10, 1000);
        // Records 10, 11, 12 applied, 64 examples each.
        for (position, examples) in [(11, 1064), (12, 1128), (13, 1192)] {
            meter.advanced(position, examples);
        }
        // Computed at 11 (the weights after record 10), applied at offset 13.
        assert_eq!(meter.measure(11, 13, 1192), Staleness { records: 2, examples: 128 });
        // Computed against the newest weights: no staleness.
        assert_eq!(meter.measure(13, 13, 1192), Staleness { records: 0, examples: 0 });
        // Older than the history: counted from its oldest entry.
        assert_eq!(meter.measure(3, 13, 1192), Staleness { records: 10, examples: 192 });
    }

    #[test]
    fn a_rollback_starts_the_history_over() {
        let mut meter = StalenessMeter::starting_at(0, 0);
        meter.advanced(1, 50);
        meter.advanced(2, 100);
        // Record 2 rolled back to the state at 1: 50 examples undone.
        meter.advanced(3, 50);
        assert_eq!(meter.measure(1, 3, 50), Staleness { records: 2, examples: 0 });
    }
}
