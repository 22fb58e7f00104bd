//! The join's open window, per partition: predictions waiting for their
//! label, labels waiting for their prediction, and ids remembered after
//! their join or expiry (to tell a second or late label from an unknown
//! one). Pure logic: records in, [`Out`]puts (joined predictions, dead
//! letters, changelog entries) out; no Kafka, no clock of its own.
//!
//! Time is each partition's, as the caller moves it ([`Window::advance`],
//! from `clock`); records do not move it. Every entry has one deadline, its
//! time plus the window:
//! - an open prediction (its time: when it was served) expires at its
//!   deadline, then is remembered as expired for one more window;
//! - a label before its prediction (its time: its record's) is held until
//!   its deadline, then dead-lettered as `unknown`;
//! - a joined or expired id is forgotten at its deadline.
//!
//! Every change is also an [`Out::Changelog`] entry, so that the window is
//! rebuilt from the changelog exactly as it was ([`Window::restore`]).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// What the window holds for an id.
#[derive(Clone, Debug, PartialEq)]
pub enum Entry {
    /// A served prediction, its record as logged, waiting for its label.
    Open(Arc<[u8]>),
    /// A label record that came before its prediction.
    Held(Arc<[u8]>),
    /// Joined with a label, or expired: a label now is a `duplicate`
    /// or `late` one.
    Closed(Closed),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closed {
    Joined,
    Expired,
}

/// Why a record is dead-lettered (a stable name, in the `reason_kind` header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// A label whose id no prediction had within the window.
    Unknown,
    /// A label for an id whose window had passed.
    Late,
    /// A second label for an id.
    Duplicate,
    /// A prediction logged under an id the window already holds.
    DuplicatePrediction,
}

impl Refused {
    pub fn kind(self) -> &'static str {
        match self {
            Refused::Unknown => "label_unknown",
            Refused::Late => "label_late",
            Refused::Duplicate => "label_duplicate",
            Refused::DuplicatePrediction => "prediction_duplicate",
        }
    }
}

/// How a prediction left the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Its label came.
    Labeled,
    /// Its window passed.
    Expired,
    /// The window was full (`feedback.max_open`): it expired before its time.
    ExpiredEarly,
}

/// What the window decided, for the caller to write in one transaction.
#[derive(Debug, PartialEq)]
pub enum Out {
    /// A prediction's end: with its label record, or with none (expired).
    Joined { partition: i32, id: Arc<str>, prediction: Arc<[u8]>, label: Option<Arc<[u8]>>, ending: Ending },
    /// A record no prediction will take, with why.
    DeadLetter { partition: i32, id: Arc<str>, record: Arc<[u8]>, refused: Refused },
    /// The window's change for `id`: its entry and the entry's time, or
    /// `None`, forgotten (a tombstone).
    Changelog { partition: i32, id: Arc<str>, entry: Option<(Entry, i64)> },
}

/// One partition's entries and their deadlines.
#[derive(Default)]
struct Partition {
    stream_time: i64,
    entries: HashMap<Arc<str>, (Entry, i64)>,
    /// `(deadline, id)` of every entry.
    deadlines: BTreeSet<(i64, Arc<str>)>,
}

pub struct Window {
    window_ms: i64,
    /// Entries of every partition together, at most.
    max_entries: usize,
    partitions: HashMap<i32, Partition>,
    entries: usize,
    /// Of which open predictions.
    open: usize,
}

impl Window {
    pub fn new(window_ms: u64, max_entries: usize) -> Window {
        Window { window_ms: window_ms as i64, max_entries, partitions: HashMap::new(), entries: 0, open: 0 }
    }

    /// Entries held, of every kind.
    pub fn len(&self) -> usize {
        self.entries
    }

    /// Open predictions.
    pub fn open(&self) -> usize {
        self.open
    }

    /// Forgets every partition (after an aborted transaction or a revoke:
    /// each is restored from the changelog again).
    pub fn clear(&mut self) {
        self.partitions.clear();
        (self.entries, self.open) = (0, 0);
    }

    /// `partition` held from now on, with no entries yet.
    pub fn begin(&mut self, partition: i32) {
        self.partitions.entry(partition).or_default();
    }

    /// One changelog entry read back: `id`'s entry as of `time`, or
    /// forgotten (`None`). Outputs nothing: the changelog has it.
    pub fn restore(&mut self, partition: i32, id: &str, entry: Option<(Entry, i64)>) {
        let id: Arc<str> = id.into();
        match entry {
            Some((entry, time)) => self.put(partition, id, entry, time),
            None => self.forget(partition, &id),
        }
    }

    /// A served prediction, logged at `time` (ms).
    pub fn prediction(&mut self, partition: i32, id: &str, record: Arc<[u8]>, time: i64, out: &mut Vec<Out>) {
        let id: Arc<str> = id.into();
        match self.entry(partition, &id) {
            None => self.put_logged(partition, id, Entry::Open(record), time, out),
            Some(Entry::Held(label)) => self.close(partition, id, record, Some(label), Ending::Labeled, time, out),
            Some(_) => out.push(Out::DeadLetter { partition, id, record, refused: Refused::DuplicatePrediction }),
        }
    }

    /// A label record for `id`, arrived at `time` (ms).
    pub fn label(&mut self, partition: i32, id: &str, record: Arc<[u8]>, time: i64, out: &mut Vec<Out>) {
        let id: Arc<str> = id.into();
        let refused = match self.entry(partition, &id) {
            None => return self.put_logged(partition, id, Entry::Held(record), time, out),
            Some(Entry::Open(prediction)) => {
                return self.close(partition, id, prediction, Some(record), Ending::Labeled, time, out)
            }
            Some(Entry::Held(_)) | Some(Entry::Closed(Closed::Joined)) => Refused::Duplicate,
            Some(Entry::Closed(Closed::Expired)) => Refused::Late,
        };
        out.push(Out::DeadLetter { partition, id, record, refused });
    }

    /// Moves `partition`'s time to at least `now`, and ends what that passes.
    pub fn advance(&mut self, partition: i32, now: i64, out: &mut Vec<Out>) {
        let Some(p) = self.partitions.get_mut(&partition) else { return };
        p.stream_time = p.stream_time.max(now);
        let now = p.stream_time;
        while let Some((deadline, id)) = self.partitions[&partition].deadlines.first().cloned() {
            if deadline > now {
                break;
            }
            self.end(partition, id, deadline, Ending::Expired, out);
        }
    }

    /// Partitions held.
    pub fn partitions(&self) -> Vec<i32> {
        self.partitions.keys().copied().collect()
    }

    /// Ends the entries nearest their deadlines, of any partition, until
    /// the window holds `max_entries` at most.
    pub fn bound(&mut self, out: &mut Vec<Out>) {
        while self.entries > self.max_entries {
            let nearest = (self.partitions.iter())
                .filter_map(|(&partition, p)| p.deadlines.first().map(|(d, id)| (*d, partition, id.clone())))
                .min();
            let Some((deadline, partition, id)) = nearest else { return };
            let now = self.partitions[&partition].stream_time.min(deadline);
            self.end(partition, id, now, Ending::ExpiredEarly, out);
        }
    }

    fn entry(&self, partition: i32, id: &str) -> Option<Entry> {
        self.partitions.get(&partition)?.entries.get(id).map(|(e, _)| e.clone())
    }

    /// An entry's deadline passed (or the window is full) at `now`: an
    /// open prediction expires, a held label is unknown, a closed id
    /// forgotten.
    fn end(&mut self, partition: i32, id: Arc<str>, now: i64, ending: Ending, out: &mut Vec<Out>) {
        match self.entry(partition, &id) {
            Some(Entry::Open(prediction)) => self.close(partition, id, prediction, None, ending, now, out),
            Some(Entry::Held(record)) => {
                self.forget(partition, &id);
                out.push(Out::Changelog { partition, id: id.clone(), entry: None });
                out.push(Out::DeadLetter { partition, id, record, refused: Refused::Unknown });
            }
            Some(Entry::Closed(_)) => {
                self.forget(partition, &id);
                out.push(Out::Changelog { partition, id, entry: None });
            }
            None => {}
        }
    }

    /// A prediction leaves the window at `now` (with its label, or
    /// expired) and its id is remembered, closed, for one window more.
    #[allow(clippy::too_many_arguments)]
    fn close(
        &mut self,
        partition: i32,
        id: Arc<str>,
        prediction: Arc<[u8]>,
        label: Option<Arc<[u8]>>,
        ending: Ending,
        now: i64,
        out: &mut Vec<Out>,
    ) {
        let closed = Entry::Closed(match label {
            Some(_) => Closed::Joined,
            None => Closed::Expired,
        });
        out.push(Out::Joined { partition, id: id.clone(), prediction, label, ending });
        self.put_logged(partition, id, closed, now, out);
    }

    /// Puts `id`'s entry and says so in the changelog.
    fn put_logged(&mut self, partition: i32, id: Arc<str>, entry: Entry, time: i64, out: &mut Vec<Out>) {
        out.push(Out::Changelog { partition, id: id.clone(), entry: Some((entry.clone(), time)) });
        self.put(partition, id, entry, time);
    }

    fn put(&mut self, partition: i32, id: Arc<str>, entry: Entry, time: i64) {
        self.forget(partition, &id);
        let deadline = time.saturating_add(self.window_ms);
        let p = self.partitions.entry(partition).or_default();
        p.deadlines.insert((deadline, id.clone()));
        self.open += usize::from(matches!(entry, Entry::Open(_)));
        p.entries.insert(id, (entry, deadline));
        self.entries += 1;
    }

    fn forget(&mut self, partition: i32, id: &Arc<str>) {
        let Some(p) = self.partitions.get_mut(&partition) else { return };
        if let Some((entry, deadline)) = p.entries.remove(id) {
            p.deadlines.remove(&(deadline, id.clone()));
            self.entries -= 1;
            self.open -= usize::from(matches!(entry, Entry::Open(_)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: u64 = 1000;

    fn bytes(text: &str) -> Arc<[u8]> {
        text.as_bytes().into()
    }

    /// The joined and dead-lettered outputs, as `(id, what)`, in order.
    fn ends(out: &[Out]) -> Vec<(String, String)> {
        (out.iter())
            .filter_map(|o| match o {
                Out::Joined { id, label, ending, .. } => Some((
                    id.to_string(),
                    match label {
                        Some(l) => format!("{ending:?} {}", String::from_utf8_lossy(l)),
                        None => format!("{ending:?}"),
                    },
                )),
                Out::DeadLetter { id, refused, .. } => Some((id.to_string(), refused.kind().to_string())),
                Out::Changelog { .. } => None,
            })
            .collect()
    }

    fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        expected.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn a_label_joins_its_prediction_once_and_a_second_label_is_a_duplicate() {
        let (mut w, mut out) = (Window::new(WINDOW, 100), Vec::new());
        w.prediction(0, "a", bytes("p"), 10, &mut out);
        w.label(0, "a", bytes("1"), 20, &mut out);
        w.label(0, "a", bytes("0"), 30, &mut out);
        assert_eq!(ends(&out), pairs(&[("a", "Labeled 1"), ("a", "label_duplicate")]));
        // Remembered for one window after the join, then forgotten.
        w.advance(0, 20 + WINDOW as i64, &mut out);
        assert_eq!(w.len(), 0);
        out.clear();
        w.label(0, "a", bytes("1"), 2000, &mut out);
        w.advance(0, 2000 + WINDOW as i64, &mut out);
        assert_eq!(ends(&out), pairs(&[("a", "label_unknown")]));
    }

    #[test]
    fn a_prediction_without_its_label_expires_at_its_deadline_and_a_label_after_is_late() {
        let (mut w, mut out) = (Window::new(WINDOW, 100), Vec::new());
        w.prediction(0, "a", bytes("p"), 10, &mut out);
        w.prediction(0, "b", bytes("q"), 500, &mut out);
        w.advance(0, 1009, &mut out);
        assert_eq!(ends(&out), pairs(&[]), "not yet");
        w.advance(0, 1010, &mut out);
        assert_eq!(ends(&out), pairs(&[("a", "Expired")]));
        w.label(0, "a", bytes("1"), 1020, &mut out);
        w.label(0, "b", bytes("1"), 1030, &mut out);
        assert_eq!(ends(&out), pairs(&[("a", "Expired"), ("a", "label_late"), ("b", "Labeled 1")]));
    }

    #[test]
    fn a_label_before_its_prediction_waits_for_it_within_the_window() {
        let (mut w, mut out) = (Window::new(WINDOW, 100), Vec::new());
        w.label(0, "a", bytes("1"), 10, &mut out);
        w.label(0, "b", bytes("1"), 10, &mut out);
        w.prediction(0, "a", bytes("p"), 900, &mut out);
        assert_eq!(ends(&out), pairs(&[("a", "Labeled 1")]));
        // b's label waits until 1010.
        w.advance(0, 1010, &mut out);
        w.prediction(0, "b", bytes("q"), 1011, &mut out);
        assert_eq!(ends(&out)[1..], pairs(&[("b", "label_unknown")])[..]);
    }

    #[test]
    fn a_prediction_under_an_id_already_held_is_dead_lettered_and_partitions_keep_their_own_time() {
        let (mut w, mut out) = (Window::new(WINDOW, 100), Vec::new());
        w.prediction(0, "a", bytes("p"), 10, &mut out);
        w.prediction(0, "a", bytes("p2"), 20, &mut out);
        w.prediction(1, "z", bytes("q"), 5000, &mut out);
        w.advance(1, 5000, &mut out);
        assert_eq!(ends(&out), pairs(&[("a", "prediction_duplicate")]));
        assert_eq!(w.open(), 2, "partition 1's time does not expire partition 0's");
    }

    #[test]
    fn a_full_window_ends_the_entry_nearest_its_deadline_early() {
        let (mut w, mut out) = (Window::new(WINDOW, 2), Vec::new());
        w.prediction(0, "a", bytes("p"), 10, &mut out);
        w.prediction(1, "b", bytes("q"), 5, &mut out);
        w.prediction(0, "c", bytes("r"), 20, &mut out);
        w.bound(&mut out);
        // b expired early; remembered closed, it is still the entry nearest
        // its deadline, and goes next.
        assert_eq!(ends(&out), pairs(&[("b", "ExpiredEarly")]));
        assert_eq!((w.len(), w.open()), (2, 2));
    }

    #[test]
    fn the_changelog_read_back_restores_the_same_window() {
        let (mut w, mut out) = (Window::new(WINDOW, 100), Vec::new());
        w.prediction(0, "a", bytes("p"), 10, &mut out);
        w.prediction(0, "b", bytes("q"), 20, &mut out);
        w.label(0, "a", bytes("1"), 30, &mut out);
        w.label(0, "x", bytes("1"), 40, &mut out);
        let mut restored = Window::new(WINDOW, 100);
        restored.begin(0);
        for o in &out {
            if let Out::Changelog { partition, id, entry } = o {
                restored.restore(*partition, id, entry.clone());
            }
        }
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for (w, out) in [(&mut w, &mut a), (&mut restored, &mut b)] {
            w.label(0, "a", bytes("1"), 50, out);
            w.prediction(0, "x", bytes("s"), 60, out);
            w.advance(0, 5000, out);
        }
        assert_eq!(ends(&a), ends(&b));
        assert_eq!(ends(&a), pairs(&[("a", "label_duplicate"), ("x", "Labeled 1"), ("b", "Expired")]));
    }
}
