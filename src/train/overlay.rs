//! The trainer's own records in flight, stepped onto copies of the rows
//! they touch: the weights its next gradient sees while they make their
//! round trip through the log.
//!
//! The optimizer is deterministic, so the trainer can step a copy of a row
//! exactly as the applier will step the row itself: starting from the
//! served snapshot (weights and optimizer state at one position), its own
//! records the snapshot does not yet include are stepped in the order it
//! sent them. A lone trainer's next gradient then sees every record before
//! it, as a sequential learner's would, with any number in flight; with
//! others, it misses only their records since the snapshot.
//!
//! Owns the records in flight and the scratch rows; reads snapshots, never
//! changes them; knows nothing of Kafka.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};

use crate::event::Example;
use crate::model::{Buffers, GradTensor, GradValues, Model, Weights};
use crate::snapshot::Snapshot;
use crate::state::optim::{Optimizer, Step};
use crate::update_log::record::EventRange;

/// A record of the trainer's that the served weights may not include yet.
#[derive(Debug)]
struct Sent {
    ranges: Vec<EventRange>,
    gradient: Vec<GradTensor>,
}

/// The trainer's records not yet served, oldest first.
#[derive(Debug, Default)]
pub struct Overlay {
    sent: VecDeque<Sent>,
}

impl Overlay {
    /// Notes a record sent with a gradient (one without steps nothing).
    pub fn push(&mut self, ranges: Vec<EventRange>, gradient: Vec<GradTensor>) {
        if !gradient.is_empty() {
            self.sent.push_back(Sent { ranges, gradient });
        }
    }

    /// Forgets every record (lost, or the trainer seeks back).
    pub fn clear(&mut self) {
        self.sent.clear();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.sent.len()
    }

    /// Forgets the records that weights at `watermarks` include (each of
    /// their ranges below its partition's watermark).
    pub fn retire(&mut self, watermarks: &BTreeMap<i32, i64>) {
        let served = |r: &EventRange| watermarks.get(&r.partition).is_some_and(|&wm| wm >= r.to);
        while self.sent.front().is_some_and(|s| s.ranges.iter().all(served)) {
            self.sent.pop_front();
        }
    }

    /// The weights of `snapshot` with the records not yet retired stepped
    /// on, as the applier will step them, for a gradient of `batch`: only
    /// the rows it reads are stepped (a record of rare values touches
    /// thousands the next batch never reads). `None` when there is nothing
    /// to step on (the snapshot's weights are the ones), or the snapshot
    /// carries no optimizer state.
    pub fn over<'a>(&self, model: &Model, snapshot: &'a Snapshot, batch: &[Example]) -> Option<Overlaid<'a>> {
        if self.sent.is_empty() {
            return None;
        }
        let optimizer = snapshot.optimizer.as_ref()?;
        let mut overlaid = Overlaid::new(&snapshot.weights, optimizer, rows_read(model, batch));
        for (steps, sent) in (optimizer.steps + 1..).zip(&self.sent) {
            overlaid.step(model, steps, &sent.gradient);
        }
        Some(overlaid)
    }
}

/// The (parameter, row) pairs a gradient of `batch` reads.
fn rows_read(model: &Model, batch: &[Example]) -> HashSet<(usize, u32)> {
    let sparse: Vec<(usize, usize)> =
        (0..model.params().len()).filter_map(|param| Some((param, model.sparse_field(param)?))).collect();
    // Room for every id read (distinct or not): a set grown as it fills
    // rehashes several times a batch (3-4 % of a gradient over records in
    // flight, `next_gradient_1024`).
    let ids_read = sparse.iter().map(|&(_, field)| batch.iter().map(|e| e.features.ids[field].len()).sum::<usize>());
    let mut rows = HashSet::with_capacity(ids_read.sum());
    for &(param, field) in &sparse {
        rows.extend(batch.iter().flat_map(|e| e.features.ids[field].iter().map(move |&id| (param, id))));
    }
    rows
}

/// A parameter's values with its optimizer slots (up to two).
#[derive(Debug)]
struct Cells {
    weights: Vec<f32>,
    slots: [Vec<f32>; 2],
}

impl Cells {
    /// Copies parameter `p` whole from `weights` and `optimizer`.
    fn copy(weights: &Buffers, optimizer: &Optimizer, p: usize) -> Cells {
        let slot = |k: usize| optimizer.slots.get(k).map_or(Vec::new(), |s| s[p].clone());
        Cells { weights: weights[p].clone(), slots: [slot(0), slot(1)] }
    }
}

/// Copies of sparse rows, each row's values side by side in one arena per
/// buffer (weights, each slot): one allocation for all, not three per row.
#[derive(Debug)]
struct Rows {
    /// Where each copied row starts in the arenas.
    start: HashMap<(usize, u32), usize>,
    weights: Vec<f32>,
    /// Empty for the slots the optimizer does not have.
    slots: [Vec<f32>; 2],
}

impl Rows {
    fn with_capacity(rows: usize) -> Rows {
        Rows { start: HashMap::with_capacity(rows), weights: Vec::new(), slots: [Vec::new(), Vec::new()] }
    }

    /// The arena range of row `id` of parameter `p`, copied from `weights`
    /// and `optimizer` the first time it is asked for.
    fn copy_in(&mut self, weights: &Buffers, optimizer: &Optimizer, p: usize, id: u32, cols: usize) -> Range<usize> {
        let start = *self.start.entry((p, id)).or_insert_with(|| {
            let row = id as usize * cols..(id as usize + 1) * cols;
            let start = self.weights.len();
            self.weights.extend_from_slice(&weights[p][row.clone()]);
            for (arena, slot) in self.slots.iter_mut().zip(&optimizer.slots) {
                arena.extend_from_slice(&slot[p][row.clone()]);
            }
            start
        });
        start..start + cols
    }

    /// Steps the copied row at `range` by `grads`.
    fn step(&mut self, at: &Step, range: Range<usize>, grads: &[f32]) {
        let [s0, s1] = &mut self.slots;
        let [s0, s1] = [s0, s1].map(|arena| cells(arena, range.clone()));
        at.step_slice(grads, &mut self.weights[range], [s0, s1]);
    }

    fn get(&self, p: usize, id: u32, cols: usize) -> Option<&[f32]> {
        self.start.get(&(p, id)).map(|&start| &self.weights[start..start + cols])
    }
}

/// The cells `range` of an arena; empty for a slot the optimizer does not have.
fn cells(arena: &mut [f32], range: Range<usize>) -> &mut [f32] {
    match arena.is_empty() {
        true => arena,
        false => &mut arena[range],
    }
}

/// Served weights with some parameters and rows of the trainer's own.
#[derive(Debug)]
pub struct Overlaid<'a> {
    base: &'a Buffers,
    optimizer: &'a Optimizer,
    /// Dense parameters stepped, whole.
    params: HashMap<usize, Cells>,
    /// Rows of sparse tables stepped.
    rows: Rows,
    /// The rows worth stepping: those the gradient reads.
    read: HashSet<(usize, u32)>,
}

impl<'a> Overlaid<'a> {
    fn new(base: &'a Buffers, optimizer: &'a Optimizer, read: HashSet<(usize, u32)>) -> Overlaid<'a> {
        let rows = Rows::with_capacity(read.len());
        Overlaid { base, optimizer, params: HashMap::new(), rows, read }
    }

    /// Steps `gradient` on as the optimizer's `steps`-th step, copying each
    /// parameter or row from the base the first time it is touched.
    fn step(&mut self, model: &Model, steps: u64, gradient: &[GradTensor]) {
        let (base, opt) = (self.base, self.optimizer);
        let at = opt.at(steps);
        for g in gradient {
            let p = g.param as usize;
            let Some(spec) = model.params().get(p) else { continue };
            let cols = spec.cols;
            match &g.values {
                GradValues::Dense(values) => {
                    let cells = self.params.entry(p).or_insert_with(|| Cells::copy(base, opt, p));
                    let [s0, s1] = &mut cells.slots;
                    at.step_slice(values, &mut cells.weights, [s0.as_mut_slice(), s1.as_mut_slice()]);
                }
                GradValues::Rows { ids, values } => {
                    for (r, &id) in ids.iter().enumerate().filter(|(_, &id)| self.read.contains(&(p, id))) {
                        let range = self.rows.copy_in(base, opt, p, id, cols);
                        self.rows.step(&at, range, &values[r * cols..(r + 1) * cols]);
                    }
                }
            }
        }
    }
}

impl Weights for Overlaid<'_> {
    fn param(&self, param: usize) -> &[f32] {
        self.params.get(&param).map_or(&self.base[param], |c| &c.weights)
    }

    fn row(&self, param: usize, id: u32, cols: usize) -> &[f32] {
        match self.rows.get(param, id, cols) {
            Some(row) => row,
            None => &self.param(param)[id as usize * cols..(id as usize + 1) * cols],
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::{Config, ModelConfig, ModelKind, OptimizerKind};
    use crate::event::{Example, Features};
    use crate::snapshot::Publisher;
    use crate::state::optim::NoTouch;
    use crate::state::ReplicaState;
    use crate::update_log::record::{GradientRecord, Record, RecordMeta};

    fn example(model: &Model, i: u32) -> Example {
        let fields = model.featurizer().fields().len();
        let ids = (0..fields).map(|f| vec![(i * 7 + f as u32 * 3) % 64]).collect();
        let dense = (0..model.config().dense_dim).map(|d| ((i + d as u32) % 5) as f32 / 5.0).collect();
        Example { features: Features { dense, ids }, label: i.is_multiple_of(3) as u8 as f32, ts: None }
    }

    /// A record of `batch`'s gradient at `w`, continuing partition 0 at `from`.
    fn record(
        model: &Model,
        w: &(impl Weights + ?Sized),
        batch: &[Example],
        from: i64,
    ) -> (Vec<EventRange>, Vec<u8>, Vec<GradTensor>) {
        let gradient = model.gradient_on(w, batch).unwrap();
        let ranges = vec![EventRange { partition: 0, from, to: from + batch.len() as i64 }];
        let meta = RecordMeta {
            fingerprint: model.fingerprint(),
            ranges: ranges.clone(),
            base: 0,
            examples: batch.len() as u32,
            skipped: 0,
            oldest_ts: 0,
            producer: "t".into(),
        };
        let tensors = gradient.tensors.clone();
        (ranges, Record::Gradient(GradientRecord::new(meta, gradient)).encode(), tensors)
    }

    #[test]
    fn records_in_flight_stepped_on_a_snapshot_give_the_weights_the_applier_reaches_bit_for_bit() {
        for (kind, optimizer) in [
            (ModelKind::Logistic, OptimizerKind::Ftrl),
            (ModelKind::WideDeep, OptimizerKind::Adagrad),
            (ModelKind::WideDeep, OptimizerKind::Adam),
        ] {
            let config = ModelConfig { kind, buckets: 64, optimizer: Some(optimizer), ..Config::default().model };
            let model = Arc::new(Model::new(&config).unwrap());
            let mut state = ReplicaState::initial(&model);
            // Two records applied and served; then three sent, in flight.
            let mut publisher = Publisher::new(model.clone(), &state, true);
            let mut overlay = Overlay::default();
            for b in 0..5u32 {
                let batch: Vec<Example> = (b * 8..b * 8 + 8).map(|i| example(&model, i)).collect();
                let snapshot = publisher.serving().load_full();
                overlay.retire(&snapshot.watermarks);
                // Nothing in flight: the snapshot's own weights.
                let (ranges, bytes, tensors) = match overlay.over(&model, &snapshot, &batch) {
                    Some(at) => record(&model, &at, &batch, i64::from(b) * 8),
                    None => record(&model, snapshot.weights.as_slice(), &batch, i64::from(b) * 8),
                };
                // What the sequential learner computes: the gradient at the state itself.
                let expected = model.gradient(&state.weights, &batch).unwrap();
                assert_eq!(
                    tensors, expected.tensors,
                    "{kind:?} {optimizer:?}, batch {b}: the gradient a sequential learner computes"
                );
                overlay.push(ranges, tensors);
                let outcome = state.apply(&model, i64::from(b), &bytes, &mut publisher);
                assert!(matches!(outcome, crate::state::Outcome::Applied(_)), "{outcome:?}");
                if b < 2 {
                    publisher.publish(&state);
                }
            }
            let snapshot = publisher.serving().load_full();
            overlay.retire(&snapshot.watermarks);
            assert_eq!(overlay.len(), 3, "the records after the served ones");
            // Every row any record touched is read by one of its events.
            let every: Vec<Example> = (0..40).map(|i| example(&model, i)).collect();
            let at = overlay.over(&model, &snapshot, &every).unwrap();
            for (p, spec) in model.params().iter().enumerate() {
                for id in 0..spec.rows as u32 {
                    assert_eq!(
                        at.row(p, id, spec.cols),
                        state.weights.row(p, id, spec.cols),
                        "{kind:?} {optimizer:?}: {} row {id}",
                        spec.name
                    );
                }
            }
            publisher.publish(&state);
            let snapshot = publisher.serving().load_full();
            overlay.retire(&snapshot.watermarks);
            assert_eq!(overlay.len(), 0, "all served");
            let _ = NoTouch;
        }
    }
}
