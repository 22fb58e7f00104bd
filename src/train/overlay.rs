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
use crate::model::gathered::Gathered;
use crate::model::{Buffers, GradTensor, GradValues, Layout, Model, Weights};
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
        let included = self.included_at(watermarks);
        self.sent.drain(..included);
    }

    /// The weights of `snapshot` with the records not yet retired stepped
    /// on, as the applier will step them, for a gradient of `batch`: only
    /// the rows it reads are stepped (a record of rare values touches
    /// thousands the next batch never reads). For a shard, with the rows of
    /// the other shards `gathered` with their optimizer slots, each shard's
    /// at its own watermarks (a record a shard's rows already include is not
    /// stepped on them again). `None` when there is nothing to step on (the
    /// snapshot's weights are the ones), or the snapshot carries no
    /// optimizer state, or the gathered rows came without their slots.
    pub fn over<'a>(
        &self,
        model: &Model,
        snapshot: &'a Snapshot,
        gathered: Option<&'a Gathered<'a, Vec<f32>>>,
        batch: &[Example],
    ) -> Option<Overlaid<'a>> {
        let optimizer = snapshot.optimizer.as_ref()?;
        if self.sent.is_empty() || gathered.is_some_and(|g| g.slots() != optimizer.slots.len()) {
            return None;
        }
        let base = Base { weights: &snapshot.weights, optimizer, layout: model.layout(), gathered };
        let mut overlaid = Overlaid::new(model, base, rows_read(model, batch));
        if let Some(g) = gathered {
            overlaid.included = g.watermarks().iter().map(|(&shard, w)| (shard, self.included_at(w))).collect();
        }
        for (k, sent) in self.sent.iter().enumerate() {
            overlaid.step(model, k, &sent.gradient);
        }
        Some(overlaid)
    }

    /// How many of the records in flight, from the oldest, weights at
    /// `watermarks` include.
    fn included_at(&self, watermarks: &BTreeMap<i32, i64>) -> usize {
        let served = |r: &EventRange| watermarks.get(&r.partition).is_some_and(|&wm| wm >= r.to);
        self.sent.iter().take_while(|s| s.ranges.iter().all(served)).count()
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

/// What an overlay copies parameters and rows from: the served snapshot's
/// weights and optimizer state, and for a shard the other shards' rows
/// with their slots, gathered.
#[derive(Clone, Copy)]
struct Base<'a> {
    weights: &'a Buffers,
    optimizer: &'a Optimizer,
    /// The rows of the snapshot's sparse tables.
    layout: Layout,
    gathered: Option<&'a Gathered<'a, Vec<f32>>>,
}

/// A row's weights and its cells of each optimizer slot (empty for a slot
/// the optimizer does not have).
type RowCells<'a> = (&'a [f32], [&'a [f32]; 2]);

impl<'a> Base<'a> {
    /// Row `id` of parameter `p`, from the snapshot or from the shard that
    /// holds it, and that shard (`None`: the snapshot's own).
    fn row(&self, p: usize, id: u32, cols: usize) -> (RowCells<'a>, Option<u32>) {
        let slots = self.optimizer.slots.len();
        if let Some(place) = self.layout.place(id) {
            let r = place * cols..(place + 1) * cols;
            let slot = |k: usize| self.optimizer.slots.get(k).map_or(&[][..], |s| &s[p][r.clone()]);
            return ((&self.weights[p][r.clone()], [slot(0), slot(1)]), None);
        }
        let g = self.gathered.expect("a row this shard does not hold was gathered");
        let slot =
            |k: usize| if k < slots { g.slot_row(k, p, id, cols).expect("gathered with its slots") } else { &[] };
        ((g.row(p, id, cols), [slot(0), slot(1)]), g.source(p, id))
    }

    fn param(&self, p: usize) -> &'a [f32] {
        &self.weights[p]
    }
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

    /// The arena range of row `id` of parameter `p`, copied from `cells`
    /// the first time it is asked for.
    fn copy_in(&mut self, p: usize, id: u32, (weights, slots): RowCells<'_>) -> Range<usize> {
        let start = *self.start.entry((p, id)).or_insert_with(|| {
            let start = self.weights.len();
            self.weights.extend_from_slice(weights);
            for (arena, slot) in self.slots.iter_mut().zip(slots) {
                arena.extend_from_slice(slot);
            }
            start
        });
        start..start + weights.len()
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
pub struct Overlaid<'a> {
    base: Base<'a>,
    /// Per shard rows were gathered from: how many of the records in flight
    /// its rows already include.
    included: BTreeMap<u32, usize>,
    /// Dense parameters stepped, whole.
    params: HashMap<usize, Cells>,
    /// Rows of sparse tables stepped.
    rows: Rows,
    /// The rows worth stepping: those the gradient reads.
    read: HashSet<(usize, u32)>,
    /// Per parameter, whether it is a sparse table (whose rows may be
    /// another shard's) rather than dense (whole here).
    sparse: Vec<bool>,
}

impl<'a> Overlaid<'a> {
    fn new(model: &Model, base: Base<'a>, read: HashSet<(usize, u32)>) -> Overlaid<'a> {
        let rows = Rows::with_capacity(read.len());
        let sparse = model.params().iter().map(|p| p.sparse).collect();
        Overlaid { base, included: BTreeMap::new(), params: HashMap::new(), rows, read, sparse }
    }

    /// Steps `gradient`, the `k`-th record in flight, on as the optimizer's
    /// next steps after the snapshot's, copying each parameter or row from
    /// the base the first time it is touched; a gathered row whose shard's
    /// weights include the record already is left as it is.
    fn step(&mut self, model: &Model, k: usize, gradient: &[GradTensor]) {
        let (base, opt) = (self.base, self.base.optimizer);
        let at = opt.at(opt.steps + 1 + k as u64);
        for g in gradient {
            let p = g.param as usize;
            let Some(spec) = model.params().get(p) else { continue };
            let cols = spec.cols;
            match &g.values {
                GradValues::Dense(values) => {
                    let cells = self.params.entry(p).or_insert_with(|| Cells::copy(base.weights, opt, p));
                    let [s0, s1] = &mut cells.slots;
                    at.step_slice(values, &mut cells.weights, [s0.as_mut_slice(), s1.as_mut_slice()]);
                }
                GradValues::Rows { ids, values } => {
                    for (r, &id) in ids.iter().enumerate().filter(|(_, &id)| self.read.contains(&(p, id))) {
                        let (cells, source) = base.row(p, id, cols);
                        if source.is_some_and(|shard| k < self.included.get(&shard).copied().unwrap_or(0)) {
                            continue;
                        }
                        let range = self.rows.copy_in(p, id, cells);
                        self.rows.step(&at, range, &values[r * cols..(r + 1) * cols]);
                    }
                }
            }
        }
    }
}

impl Weights for Overlaid<'_> {
    fn param(&self, param: usize) -> &[f32] {
        self.params.get(&param).map_or(self.base.param(param), |c| &c.weights)
    }

    fn row(&self, param: usize, id: u32, cols: usize) -> &[f32] {
        match self.rows.get(param, id, cols) {
            Some(row) => row,
            None if self.sparse[param] => self.base.row(param, id, cols).0 .0,
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
    use crate::model::Layout;
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
                let (ranges, bytes, tensors) = match overlay.over(&model, &snapshot, None, &batch) {
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
            let at = overlay.over(&model, &snapshot, None, &every).unwrap();
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

    /// A shard's trainer: its snapshot's rows and shard 1's rows gathered
    /// with their slots, shard 1 a record ahead of it (its rows already
    /// include one of the records in flight), records in flight stepped on
    /// both: the gradient of a sequential learner of the whole model, bit
    /// for bit.
    #[test]
    fn records_in_flight_stepped_on_a_shard_and_its_gathered_rows_give_the_sequential_gradient() {
        use crate::model::gathered::{self, Answer, Gathered};
        for (kind, optimizer) in
            [(ModelKind::Logistic, OptimizerKind::Ftrl), (ModelKind::WideDeep, OptimizerKind::Adam)]
        {
            let config = ModelConfig { kind, buckets: 64, optimizer: Some(optimizer), ..Config::default().model };
            let whole = Model::new(&config).unwrap();
            let layouts = [Layout::new(2, 0).unwrap(), Layout::new(2, 1).unwrap()];
            let models = layouts.map(|l| Arc::new(whole.clone().with_layout(l)));
            let mut states = models.each_ref().map(|m| ReplicaState::initial(m));
            let mut publishers = [0, 1].map(|i| Publisher::new(models[i].clone(), &states[i], true));
            let mut sequential = ReplicaState::initial(&whole);
            let mut overlay = Overlay::default();
            for b in 0..6u32 {
                // Events seen again: each batch reads rows the records in flight stepped.
                let batch: Vec<Example> = (b * 8..b * 8 + 8).map(|i| example(&whole, i % 12)).collect();
                let (snap0, snap1) = (publishers[0].serving().load_full(), publishers[1].serving().load_full());
                overlay.retire(&snap0.watermarks);
                let features: Vec<&Features> = batch.iter().map(|e| &e.features).collect();
                let mut view = Gathered::new(&snap0.weights, layouts[0]);
                for (shard, rows) in &gathered::wanted(&models[0], layouts[0], &features) {
                    let of = |buffers: &Buffers| gathered::answer(&models[1], layouts[1], buffers, rows).unwrap();
                    let slots = snap1.optimizer.as_ref().unwrap().slots.iter().map(of).collect();
                    let answer = Answer {
                        position: snap1.position,
                        watermarks: snap1.watermarks.clone(),
                        values: of(&snap1.weights),
                        slots,
                    };
                    assert!(view.take(&models[0], *shard, rows, &answer));
                }
                let (ranges, bytes, tensors) = match overlay.over(&models[0], &snap0, Some(&view), &batch) {
                    Some(at) => record(&whole, &at, &batch, i64::from(b) * 8),
                    None => record(&whole, &view, &batch, i64::from(b) * 8),
                };
                let expected = whole.gradient(&sequential.weights, &batch).unwrap();
                assert_eq!(tensors, expected.tensors, "{kind:?} {optimizer:?}, batch {b}");
                overlay.push(ranges, tensors);
                for (i, state) in states.iter_mut().enumerate() {
                    let outcome = state.apply(&models[i], i64::from(b), &bytes, &mut publishers[i]);
                    assert!(matches!(outcome, crate::state::Outcome::Applied(_)), "{outcome:?}");
                }
                sequential.apply(&whole, i64::from(b), &bytes, &mut NoTouch);
                // Shard 0 serves the first two records; shard 1 three.
                if b < 2 {
                    publishers[0].publish(&states[0]);
                }
                if b < 3 {
                    publishers[1].publish(&states[1]);
                }
            }
        }
    }
}
