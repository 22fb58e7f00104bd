//! The serving snapshot: an immutable copy of the weights behind arc-swap,
//! and the publisher that replaces it without ever blocking a reader.
//!
//! Publishing is left-right: snapshots trade places. After a swap, the one
//! just retired is no longer read by new requests; once the last in-flight
//! request drops it, the publisher owns it again and catches it up by
//! copying only the rows touched since it was current, not the whole model
//! (64 MB for the default `wide_deep`). A reader may hold a snapshot long
//! (hashing 64 MB for `GET /v1/models/{name}` takes tens of milliseconds,
//! and a client polling it held one through most swaps: each became a full
//! copy, 7.7 ms, and `wide_deep` learned 40 % slower), so up to
//! `RETIRED_LIMIT` retired snapshots wait to be reused, each with the rows
//! changed since it was current, and a publish takes whichever is free.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::model::{Buffers, Model};
use crate::state::optim::{Optimizer, Touch};
use crate::state::ReplicaState;

/// What predictions read: weights at one `updates` position, and the
/// counters reported next to them.
#[derive(Debug)]
pub struct Snapshot {
    pub model: Arc<Model>,
    /// The `updates` position of these weights: the served `model_version`.
    pub position: i64,
    pub weights: Buffers,
    pub watermarks: BTreeMap<i32, i64>,
    pub examples_learned: u64,
    /// Events taken by records but learned by no one: invalid, or whose
    /// gradient could not be computed.
    pub examples_skipped: u64,
    pub progressive_loss: Option<f64>,
    pub published: Instant,
    /// The optimizer's state at `position`, when the trainer overlaps its
    /// records in flight (`Config::trainer_overlaps`): it steps copies of
    /// rows from here exactly as the applier will. `None` otherwise.
    pub optimizer: Option<Optimizer>,
    /// Computed on first request: hashing 64 MB is not free.
    digest: OnceLock<String>,
}

impl Snapshot {
    pub fn weights_digest(&self) -> &str {
        self.digest.get_or_init(|| self.model.digest(&self.weights))
    }

    fn from_state(model: &Arc<Model>, state: &ReplicaState, with_optimizer: bool) -> Snapshot {
        Snapshot {
            model: model.clone(),
            position: state.position,
            weights: state.weights.clone(),
            watermarks: state.watermarks.clone(),
            examples_learned: state.examples_learned,
            examples_skipped: state.examples_skipped,
            progressive_loss: state.progressive_loss(),
            published: Instant::now(),
            optimizer: with_optimizer.then(|| state.optimizer.clone()),
            digest: OnceLock::new(),
        }
    }
}

/// The handle every reader holds.
pub type Serving = Arc<ArcSwap<Snapshot>>;

/// Rows of each parameter changed since some snapshot was current.
#[derive(Debug)]
struct Dirty {
    /// Per parameter: `None` for everything, else the changed rows.
    rows: Vec<Option<RowSet>>,
}

#[derive(Debug, Default)]
struct RowSet {
    bits: Vec<u64>,
    list: Vec<u32>,
}

impl RowSet {
    /// Empties the set, keeping its memory: clearing only the words of the
    /// rows it holds costs what was marked, not the table's size.
    fn clear(&mut self) {
        for &id in &self.list {
            self.bits[id as usize / 64] = 0;
        }
        self.list.clear();
    }

    fn insert(&mut self, id: u32) {
        let (word, bit) = (id as usize / 64, id % 64);
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        if self.bits[word] & (1 << bit) == 0 {
            self.bits[word] |= 1 << bit;
            self.list.push(id);
        }
    }
}

impl Dirty {
    fn clean(n: usize) -> Dirty {
        Dirty { rows: (0..n).map(|_| Some(RowSet::default())).collect() }
    }
    fn everything(n: usize) -> Dirty {
        Dirty { rows: (0..n).map(|_| None).collect() }
    }
    fn mark_rows(&mut self, param: usize, ids: &[u32]) {
        if let Some(set) = &mut self.rows[param] {
            ids.iter().for_each(|&id| set.insert(id));
        }
    }
    /// Adds what `other` holds.
    fn merge(&mut self, other: &Dirty) {
        for (param, theirs) in other.rows.iter().enumerate() {
            match theirs {
                None => self.rows[param] = None,
                Some(set) => self.mark_rows(param, &set.list),
            }
        }
    }
    /// Empties every parameter's set, keeping the memory of those it has.
    fn clear(&mut self) {
        for rows in &mut self.rows {
            match rows {
                Some(set) => set.clear(),
                None => *rows = Some(RowSet::default()),
            }
        }
    }
    /// Copies the changed rows of `from` into `to`; returns floats copied.
    fn copy(&self, model: &Model, from: &Buffers, to: &mut Buffers) -> usize {
        let mut copied = 0;
        for ((p, rows), (src, dst)) in model.params().iter().zip(&self.rows).zip(from.iter().zip(to.iter_mut())) {
            match rows {
                None => {
                    dst.copy_from_slice(src);
                    copied += src.len();
                }
                Some(set) => {
                    for &id in &set.list {
                        let r = id as usize * p.cols..(id as usize + 1) * p.cols;
                        dst[r.clone()].copy_from_slice(&src[r]);
                    }
                    copied += set.list.len() * p.cols;
                }
            }
        }
        copied
    }
}

/// How a publish went, for metrics.
#[derive(Debug, Clone, Copy)]
pub struct PublishStats {
    pub took: Duration,
    /// Floats copied into the snapshot.
    pub copied: usize,
    /// The retired snapshot was still read and a full copy was made instead.
    pub full_copy: bool,
}

/// Retired snapshots kept for reuse: with the served one, the most copies
/// of the weights a publisher keeps (readers may hold one more each).
const RETIRED_LIMIT: usize = 2;

/// The one writer of the serving snapshot (owned by the applier).
pub struct Publisher {
    model: Arc<Model>,
    serving: Serving,
    /// Retired snapshots, oldest first, each with what changed since it was
    /// current: to be caught up and reused once no reader holds them.
    retired: Vec<(Arc<Snapshot>, Dirty)>,
    /// Changed since the current snapshot was built. Steps mark only this
    /// set; a publish adds it to each retired snapshot's before it swaps
    /// (once per publish rather than once per record for each).
    since_front: Dirty,
    /// Whether snapshots carry the optimizer's state too.
    with_optimizer: bool,
}

impl Publisher {
    /// Serves `state`; with `with_optimizer`, every snapshot carries the
    /// optimizer's state beside the weights (caught up row by row alike).
    pub fn new(model: Arc<Model>, state: &ReplicaState, with_optimizer: bool) -> Publisher {
        let n = model.params().len();
        let serving = Arc::new(ArcSwap::from_pointee(Snapshot::from_state(&model, state, with_optimizer)));
        Publisher { model, serving, retired: Vec::new(), since_front: Dirty::clean(n), with_optimizer }
    }

    pub fn serving(&self) -> Serving {
        self.serving.clone()
    }

    /// Whether the state has moved past what is served.
    pub fn is_behind(&self, state: &ReplicaState) -> bool {
        self.serving.load().position != state.position
    }

    /// Everything changed (a restore from a checkpoint, a rollback).
    pub fn mark_everything(&mut self) {
        let n = self.model.params().len();
        self.since_front = Dirty::everything(n);
        for (_, dirty) in &mut self.retired {
            *dirty = Dirty::everything(n);
        }
    }

    /// Makes `state` the served snapshot.
    pub fn publish(&mut self, state: &ReplicaState) -> PublishStats {
        let start = Instant::now();
        for (_, dirty) in &mut self.retired {
            dirty.merge(&self.since_front);
        }
        let mut full_copy = false;
        let (mut next, copied, mut free) = match self.reclaim_any() {
            Some((mut snap, mut dirty)) => {
                let mut copied = dirty.copy(&self.model, &state.weights, &mut snap.weights);
                if let Some(optimizer) = &mut snap.optimizer {
                    for (from, to) in state.optimizer.slots.iter().zip(&mut optimizer.slots) {
                        copied += dirty.copy(&self.model, from, to);
                    }
                    optimizer.steps = state.optimizer.steps;
                }
                dirty.clear();
                (snap, copied, dirty)
            }
            None => {
                full_copy = !self.retired.is_empty();
                let snap = Snapshot::from_state(&self.model, state, self.with_optimizer);
                let copied = snap.weights.iter().map(Vec::len).sum();
                (snap, copied, Dirty::clean(self.model.params().len()))
            }
        };
        next.position = state.position;
        next.watermarks.clone_from(&state.watermarks);
        next.examples_learned = state.examples_learned;
        next.examples_skipped = state.examples_skipped;
        next.progressive_loss = state.progressive_loss();
        next.published = Instant::now();
        next.digest = OnceLock::new();
        let previous = self.serving.swap(Arc::new(next));
        if self.retired.len() >= RETIRED_LIMIT {
            // Still held: its readers free it; it is not kept for reuse.
            self.retired.remove(0);
        }
        std::mem::swap(&mut self.since_front, &mut free);
        self.retired.push((previous, free));
        PublishStats { took: start.elapsed(), copied, full_copy }
    }

    /// A retired snapshot no reader holds, the newest first (the fewest
    /// rows to catch up), with what changed since it was current. If all are
    /// held, the newest is waited for briefly: a request that loaded it just
    /// before the swap holds it for microseconds. `None` if it stays held.
    fn reclaim_any(&mut self) -> Option<(Snapshot, Dirty)> {
        let newest = self.retired.len().checked_sub(1)?;
        let waits = (0..=newest).rev().map(|i| (i, Duration::ZERO)).chain([(newest, Duration::from_millis(2))]);
        for (i, wait) in waits {
            let (snap, dirty) = self.retired.remove(i);
            match reclaim(snap, wait) {
                Ok(snap) => return Some((snap, dirty)),
                Err(snap) => self.retired.insert(i, (snap, dirty)),
            }
        }
        None
    }
}

impl Touch for Publisher {
    fn rows(&mut self, param: usize, ids: &[u32]) {
        self.since_front.mark_rows(param, ids);
    }
    fn all(&mut self, param: usize) {
        self.since_front.rows[param] = None;
    }
}

/// Takes back sole ownership of a retired snapshot, waiting up to `wait`
/// for its readers.
fn reclaim(mut snap: Arc<Snapshot>, wait: Duration) -> Result<Snapshot, Arc<Snapshot>> {
    let deadline = Instant::now() + wait;
    loop {
        match Arc::try_unwrap(snap) {
            Ok(s) => return Ok(s),
            Err(s) if Instant::now() >= deadline => return Err(s),
            Err(s) => {
                snap = s;
                std::thread::yield_now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ModelConfig, ModelKind};
    use crate::model::{GradTensor, GradValues};
    use crate::state::optim::NoTouch;
    use crate::update_log::record::{EventRange, GradientRecord, Record};

    /// A small `wide_deep` model, its initial state and a publisher.
    fn setup() -> (Arc<Model>, ReplicaState, Publisher) {
        // The default fields and shapes, which `apply_step`'s gradients use.
        let c = ModelConfig { kind: ModelKind::WideDeep, buckets: 128, ..Config::default().model };
        let model = Arc::new(Model::new(&c).expect("a built-in model"));
        let state = ReplicaState::initial(&model);
        let publisher = Publisher::new(model.clone(), &state, true);
        (model, state, publisher)
    }

    /// Applies record `step` (one embedding row, the dense weights) to `state`.
    fn apply_step(model: &Model, state: &mut ReplicaState, publisher: &mut Publisher, step: u32) {
        let emb = model.params().iter().position(|p| p.name == "emb.f1").unwrap();
        let dense = model.params().iter().position(|p| p.name == "linear.dense").unwrap();
        let bytes = Record::Gradient(GradientRecord {
            fingerprint: model.fingerprint(),
            ranges: vec![EventRange { partition: 0, from: i64::from(step), to: i64::from(step) + 1 }],
            base: 0,
            examples: 1,
            skipped: 0,
            loss_sum: 0.5,
            oldest_ts: 0,
            producer: "t".into(),
            gradient: vec![
                GradTensor {
                    param: emb as u32,
                    values: GradValues::Rows { ids: vec![step * 7 % 128], values: vec![0.1; 16] },
                },
                GradTensor { param: dense as u32, values: GradValues::Dense(vec![0.01; 8]) },
            ],
        })
        .encode();
        let outcome = state.apply(model, i64::from(step), &bytes, publisher);
        assert!(matches!(outcome, crate::state::Outcome::Applied(_)), "{outcome:?}");
    }

    #[test]
    fn left_right_snapshots_equal_full_copies() {
        let (model, mut state, mut publisher) = setup();
        let serving = publisher.serving();
        for step in 0..6u32 {
            let held = serving.load_full(); // a reader that outlives one swap
            apply_step(&model, &mut state, &mut publisher, step);
            let stats = publisher.publish(&state);
            drop(held);
            let snap = serving.load();
            assert_eq!(snap.weights, state.weights, "step {step}");
            assert_eq!(snap.optimizer.as_ref(), Some(&state.optimizer), "step {step}");
            assert_eq!(snap.weights_digest(), model.digest(&state.weights));
            if step >= 2 {
                assert!(!stats.full_copy && stats.copied < 100, "step {step}: {stats:?}");
            }
        }
        let _ = NoTouch;
    }

    #[test]
    fn a_reader_that_holds_a_snapshot_through_many_swaps_costs_no_full_copy() {
        let (model, mut state, mut publisher) = setup();
        let serving = publisher.serving();
        apply_step(&model, &mut state, &mut publisher, 0);
        publisher.publish(&state);
        // Hashing the weights for GET /v1/models/{name}, say, through six swaps.
        let long_reader = serving.load_full();
        for step in 1..7u32 {
            apply_step(&model, &mut state, &mut publisher, step);
            let stats = publisher.publish(&state);
            assert_eq!(serving.load().weights, state.weights, "step {step}");
            if step >= 3 {
                assert!(!stats.full_copy && stats.copied < 100, "step {step}: {stats:?}");
            }
        }
        assert_eq!(long_reader.position, 1, "the reader's snapshot never changed under it");
    }
}
