//! The replica's state and the apply rule (docs/design.md section 3), in one
//! place: everything a replica learned, identical on every replica at the
//! same position, and the one function that changes it. Knows neither Kafka
//! clients nor HTTP: the applier feeds it record bytes, checkpoints store it,
//! the snapshot publisher copies from it.
//!
//! A gradient record is applied iff it belongs to this model, every one of
//! its ranges starts at its partition's watermark (all or nothing), its
//! tensors have the model's shapes, and every value is finite with a global
//! L2 norm within the bound times its examples (the gradient is of the
//! summed loss). Then the optimizer steps and each range's watermark moves
//! to its `to`. Otherwise the state does not change. Every record read
//! advances `position`, applied or not.
//!
//! A rollback record is taken iff it belongs to this model, `0 <= to <=
//! seen <= its offset`, and no rollback was taken at or after `seen`. Then
//! the state becomes the state at `to` (which the applier rebuilds from a
//! checkpoint and the log: [`ReplicaState::roll_back`]), keeping the current
//! watermarks if the record says the events since are skipped.

pub mod optim;
mod reshard;

use std::collections::BTreeMap;

use self::optim::{Optimizer, Touch};
use crate::config::StalenessScaling;
use crate::model::{Buffers, GradTensor, GradValues, Layout, Model, ParamSpec};
use crate::update_log::record::{
    AttestationRecord, EventRange, EventsSince, GradientRecord, Record, RollbackRecord, SettingsRecord,
};

/// Everything a replica learned: identical on every replica at the same position.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaState {
    /// Next `updates` offset to read; the served `model_version`.
    pub position: i64,
    /// Events partition -> next event offset to learn.
    pub watermarks: BTreeMap<i32, i64>,
    pub examples_learned: u64,
    pub examples_skipped: u64,
    pub records_applied: u64,
    pub records_rejected: u64,
    /// Offset of the last rollback record taken.
    pub last_rollback: Option<i64>,
    /// Progressive loss summed over every learned example (before its update).
    pub loss_sum: f64,
    pub weights: Buffers,
    pub optimizer: Optimizer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    /// The bytes are not a record this build can read.
    Malformed,
    /// Written for a model of another structure.
    OtherModel,
    /// A range's `from` is not its partition's watermark: a duplicate, a
    /// zombie's record, or one that follows a rejected record.
    NotContiguous,
    /// A tensor names an unknown parameter or has the wrong shape.
    Shape,
    NonFinite,
    NormBound,
    /// The record's events and ranges disagree: more events than its
    /// ranges cover or a batch may hold, or ranges beyond their events and
    /// the gap allowance (`GradientRecord::sizes_agree`).
    Size,
    /// A rollback decided on a state that another rollback has replaced.
    Superseded,
    /// A rollback to a position it cannot return to (ahead of what it saw).
    BadTarget,
}

impl Reject {
    pub const ALL: [Reject; 9] = [
        Reject::Malformed,
        Reject::OtherModel,
        Reject::NotContiguous,
        Reject::Shape,
        Reject::NonFinite,
        Reject::NormBound,
        Reject::Size,
        Reject::Superseded,
        Reject::BadTarget,
    ];

    /// The label value in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::Malformed => "malformed",
            Reject::OtherModel => "other_model",
            Reject::NotContiguous => "not_contiguous",
            Reject::Shape => "shape",
            Reject::NonFinite => "non_finite",
            Reject::NormBound => "norm_bound",
            Reject::Size => "size",
            Reject::Superseded => "superseded",
            Reject::BadTarget => "bad_target",
        }
    }
}

/// What the applier did with one record.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Applied(GradientRecord),
    /// The record, where it decoded, and why it was rejected.
    Rejected(Option<GradientRecord>, Reject),
    /// A rollback to take: the caller rebuilds the state at `to` and calls
    /// [`ReplicaState::roll_back`] before it reads the next record.
    RollBack(RollbackRecord),
    /// A rollback not taken, and why.
    RollbackRejected(RollbackRecord, Reject),
    /// A replica's model settings, announced when it started: the state
    /// does not change; the applier compares them with its own.
    Settings(SettingsRecord),
    /// A replica's weights digest at a position: the state does not
    /// change; the applier compares it with its own, where it knows it.
    Attestation(AttestationRecord),
}

impl ReplicaState {
    pub fn initial(model: &Model) -> ReplicaState {
        ReplicaState::initial_of(model, model.layout())
    }

    /// The initial state of the shard `layout`: the unsharded replica's
    /// initial state, of the rows the shard holds.
    pub fn initial_of(model: &Model, layout: Layout) -> ReplicaState {
        let c = model.config();
        let weights = model.init_weights_of(layout);
        ReplicaState {
            position: 0,
            watermarks: BTreeMap::new(),
            examples_learned: 0,
            examples_skipped: 0,
            records_applied: 0,
            records_rejected: 0,
            last_rollback: None,
            loss_sum: 0.0,
            optimizer: Optimizer::starting_at(c, model.params(), &weights, layout),
            weights,
        }
    }

    /// Mean progressive loss so far; `None` before the first example.
    pub fn progressive_loss(&self) -> Option<f64> {
        (self.examples_learned > 0).then(|| self.loss_sum / self.examples_learned as f64)
    }

    /// Reads the record at `offset` of `updates`: the apply rule.
    pub fn apply(&mut self, model: &Model, offset: i64, bytes: &[u8], touch: &mut impl Touch) -> Outcome {
        self.position = offset + 1;
        let outcome = match Record::decode(bytes) {
            Err(_) => Outcome::Rejected(None, Reject::Malformed),
            Ok(Record::Settings(r)) => Outcome::Settings(r),
            Ok(Record::Attestation(r)) => Outcome::Attestation(r),
            Ok(Record::Rollback(r)) => match self.check_rollback(model, offset, &r) {
                Ok(()) => Outcome::RollBack(r),
                Err(reason) => Outcome::RollbackRejected(r, reason),
            },
            Ok(Record::Gradient(mut r)) => match check(model, &self.watermarks, &r) {
                Err(reason) => Outcome::Rejected(Some(r), reason),
                Ok(()) => {
                    if !r.gradient.is_empty() {
                        scale_for_staleness(model.config().staleness_scaling, offset - r.base, &mut r.gradient);
                        self.optimizer.step(model.params(), &mut self.weights, &r.gradient, touch);
                    }
                    for range in &r.ranges {
                        self.watermarks.insert(range.partition, range.to);
                    }
                    self.examples_learned += u64::from(r.examples);
                    self.examples_skipped += u64::from(r.skipped);
                    self.loss_sum += r.loss_sum;
                    Outcome::Applied(r)
                }
            },
        };
        match outcome {
            Outcome::Applied(_) | Outcome::RollBack(_) => self.records_applied += 1,
            Outcome::Rejected(..) | Outcome::RollbackRejected(..) => self.records_rejected += 1,
            Outcome::Settings(_) | Outcome::Attestation(_) => {}
        }
        outcome
    }

    fn check_rollback(&self, model: &Model, offset: i64, r: &RollbackRecord) -> Result<(), Reject> {
        if r.fingerprint != model.fingerprint() {
            return Err(Reject::OtherModel);
        }
        if !(0 <= r.to && r.to <= r.seen && r.seen <= offset) {
            return Err(Reject::BadTarget);
        }
        if self.last_rollback.is_some_and(|at| at >= r.seen) {
            return Err(Reject::Superseded);
        }
        Ok(())
    }

    /// Takes the rollback record `r` read at `offset`, given `then`, the
    /// state at `r.to`. Learning (weights, optimizer, example counters)
    /// returns to `then`; the watermarks too, unless the events since are
    /// skipped; the log's own counters and position go on.
    pub fn roll_back(&mut self, offset: i64, r: &RollbackRecord, then: ReplicaState) {
        debug_assert_eq!(then.position, r.to);
        let watermarks = match r.events {
            EventsSince::Relearn => then.watermarks,
            EventsSince::Skip => std::mem::take(&mut self.watermarks),
        };
        *self = ReplicaState {
            position: self.position,
            watermarks,
            records_applied: self.records_applied,
            records_rejected: self.records_rejected,
            last_rollback: Some(offset),
            ..then
        };
    }
}

fn check(model: &Model, watermarks: &BTreeMap<i32, i64>, r: &GradientRecord) -> Result<(), Reject> {
    if r.fingerprint != model.fingerprint() {
        return Err(Reject::OtherModel);
    }
    if !continues(watermarks, &r.ranges) {
        return Err(Reject::NotContiguous);
    }
    if !r.sizes_agree() {
        return Err(Reject::Size);
    }
    check_gradient(model, r.examples, r.loss_sum, &r.gradient)
}

/// Scales a gradient that missed `unseen` records, as `scaling` says.
fn scale_for_staleness(scaling: StalenessScaling, unseen: i64, gradient: &mut [GradTensor]) {
    let scale = match scaling {
        StalenessScaling::None => return,
        // sqrt is correctly rounded (IEEE 754): the same on every replica.
        StalenessScaling::InverseSqrt => 1.0 / (1.0 + unseen.max(0) as f32).sqrt(),
    };
    if scale == 1.0 {
        return;
    }
    for t in gradient {
        match &mut t.values {
            GradValues::Dense(v) | GradValues::Rows { values: v, .. } => v.iter_mut().for_each(|x| *x *= scale),
        }
    }
}

/// Whether `ranges` are in partition order, each of its own partition, and
/// each starts at its partition's watermark (0 for a partition never seen).
pub fn continues(watermarks: &BTreeMap<i32, i64>, ranges: &[EventRange]) -> bool {
    let ordered = ranges.windows(2).all(|w| w[0].partition < w[1].partition);
    let contiguous = |r: &EventRange| {
        r.partition >= 0 && r.to >= r.from && r.from == watermarks.get(&r.partition).copied().unwrap_or(0)
    };
    !ranges.is_empty() && ordered && ranges.iter().all(contiguous)
}

/// What a gradient of `examples` events must be, wherever it is checked: a
/// finite loss, and tensors of the model's shapes, finite, with a global L2
/// norm within `max_grad_norm` per example. The trainer checks it before
/// sending (a retry would compute the same gradient), and the apply rule
/// again on every replica.
pub fn check_gradient(model: &Model, examples: u32, loss_sum: f64, tensors: &[GradTensor]) -> Result<(), Reject> {
    if !loss_sum.is_finite() {
        return Err(Reject::NonFinite);
    }
    check_tensors(model.params(), model.config().max_grad_norm, examples, tensors)
}

fn check_tensors(params: &[ParamSpec], max_norm: f32, examples: u32, tensors: &[GradTensor]) -> Result<(), Reject> {
    let mut sum_sq = 0f64;
    for t in tensors {
        let p = params.get(t.param as usize).ok_or(Reject::Shape)?;
        let values = match &t.values {
            GradValues::Dense(v) if v.len() == p.len() => v,
            GradValues::Rows { ids, values }
                if values.len() == ids.len() * p.cols && ids.iter().all(|&id| (id as usize) < p.rows) =>
            {
                values
            }
            _ => return Err(Reject::Shape),
        };
        sum_sq += sum_of_squares(values);
    }
    // An f32 squares to a finite f64, so the sum is finite exactly when
    // every value is.
    if !sum_sq.is_finite() {
        return Err(Reject::NonFinite);
    }
    if sum_sq.sqrt() > f64::from(max_norm) * f64::from(examples.max(1)) {
        return Err(Reject::NormBound);
    }
    Ok(())
}

/// The sum of the squares of `values` in f64, in eight interleaved partial
/// sums (one serial sum waited on each addition's latency: a tenth of a
/// replay). The order is fixed, so every replica gets the same bits and
/// takes the same apply decision.
fn sum_of_squares(values: &[f32]) -> f64 {
    const LANES: usize = 8;
    let mut lanes = [0f64; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f64::from(v) * f64::from(v);
        }
    }
    let tail: f64 = rest.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    lanes.iter().sum::<f64>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ModelConfig, ModelKind};
    use crate::state::optim::NoTouch;
    use crate::update_log::record::{EventsSince, GradientRecord, Record, RollbackRecord};

    fn setup() -> (Model, ReplicaState) {
        let c = ModelConfig { dense_dim: 2, buckets: 16, ..ModelConfig::small(ModelKind::Logistic) };
        let model = Model::new(&c).expect("a built-in model");
        let state = ReplicaState::initial(&model);
        (model, state)
    }

    fn record(model: &Model, partition: i32, from: i64, to: i64, g: f32) -> Vec<u8> {
        Record::Gradient(GradientRecord {
            fingerprint: model.fingerprint(),
            ranges: vec![EventRange { partition, from, to }],
            base: 0,
            examples: (to - from) as u32,
            skipped: 0,
            loss_sum: 0.7 * (to - from) as f64,
            oldest_ts: 0,
            producer: "t".into(),
            gradient: vec![GradTensor { param: 1, values: GradValues::Dense(vec![g, g]) }],
        })
        .encode()
    }

    /// `n` examples of `model`'s shape, drawn from `seed`.
    fn examples(model: &Model, n: usize, seed: u64) -> Vec<crate::event::Example> {
        let c = model.config();
        let mut x = seed;
        let mut next = move || {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            x >> 33
        };
        (0..n)
            .map(|_| crate::event::Example {
                features: crate::event::Features {
                    dense: (0..c.dense_dim).map(|_| (next() % 200) as f32 / 100.0 - 1.0).collect(),
                    ids: (0..c.sparse_fields.len()).map(|_| vec![(next() % u64::from(c.buckets)) as u32]).collect(),
                },
                label: (next() % 2) as f32,
                ts: None,
            })
            .collect()
    }

    /// The oracle of docs/design.md section 8a, without the network: shards
    /// that apply the same records hold between them exactly what one
    /// unsharded replica holds, bit for bit (weights and optimizer slots),
    /// each with only its own rows of the sparse tables; and each, with the
    /// rows it gathers, predicts and learns as the unsharded replica does.
    #[test]
    fn shards_applying_the_same_records_hold_between_them_the_unsharded_state() {
        for kind in [ModelKind::Logistic, ModelKind::WideDeep] {
            let c = ModelConfig { dense_dim: 2, buckets: 37, ..ModelConfig::small(kind) };
            let model = Model::new(&c).expect("a built-in model");
            let mut whole = ReplicaState::initial(&model);
            let layouts: Vec<Layout> = (0..3).map(|i| Layout::new(3, i).unwrap()).collect();
            let mut shards: Vec<ReplicaState> = layouts.iter().map(|&l| ReplicaState::initial_of(&model, l)).collect();
            for k in 0..30i64 {
                let batch = examples(&model, 16, k as u64);
                let g = model.gradient_at(None, &whole.weights, &batch).unwrap();
                let bytes = Record::Gradient(GradientRecord {
                    fingerprint: model.fingerprint(),
                    ranges: vec![EventRange { partition: 0, from: k * 16, to: (k + 1) * 16 }],
                    base: k,
                    examples: 16,
                    skipped: 0,
                    loss_sum: g.loss_sum,
                    oldest_ts: 0,
                    producer: "t".into(),
                    gradient: g.tensors,
                })
                .encode();
                assert!(matches!(whole.apply(&model, k, &bytes, &mut NoTouch), Outcome::Applied(_)));
                for shard in &mut shards {
                    assert!(matches!(shard.apply(&model, k, &bytes, &mut NoTouch), Outcome::Applied(_)));
                }
            }
            predictions_and_gradients_through_each_shard_equal_the_whole(&model, &whole, &shards, &layouts);
            for (shard, layout) in shards.iter().zip(&layouts) {
                assert_eq!((&shard.watermarks, shard.examples_learned), (&whole.watermarks, whole.examples_learned));
                for (p, spec) in model.params().iter().enumerate() {
                    let buffers = |s: &ReplicaState| -> Vec<Vec<f32>> {
                        std::iter::once(&s.weights).chain(&s.optimizer.slots).map(|b| b[p].clone()).collect()
                    };
                    for (ours, theirs) in buffers(shard).into_iter().zip(buffers(&whole)) {
                        if !spec.sparse {
                            assert_eq!(ours, theirs, "{kind:?} {}: dense, whole on every shard", spec.name);
                            continue;
                        }
                        assert_eq!(ours.len(), layout.rows_of(spec.rows) * spec.cols, "only its own rows");
                        for row in 0..spec.rows as u32 {
                            let Some(place) = layout.place(row) else { continue };
                            let (at, cols) = (row as usize * spec.cols, spec.cols);
                            assert_eq!(
                                ours[place * cols..][..cols],
                                theirs[at..][..cols],
                                "{kind:?} {} row {row}",
                                spec.name
                            );
                        }
                    }
                }
            }
        }
    }

    /// Each shard, with the rows a batch reads gathered from the shards
    /// that hold them, predicts and takes gradients as the whole does, bit
    /// for bit.
    fn predictions_and_gradients_through_each_shard_equal_the_whole(
        model: &Model,
        whole: &ReplicaState,
        shards: &[ReplicaState],
        layouts: &[Layout],
    ) {
        use crate::model::gathered::{answer, wanted, Gathered};
        let batch = examples(model, 24, 99);
        let features: Vec<&crate::event::Features> = batch.iter().map(|e| &e.features).collect();
        for (shard, &layout) in shards.iter().zip(layouts) {
            let wanted = wanted(model, layout, &features);
            let mut view = Gathered::new(&shard.weights, layout);
            for (&from, rows) in &wanted {
                let values = answer(model, layouts[from as usize], &shards[from as usize].weights, rows).unwrap();
                let answered = crate::model::gathered::Answer { values, ..Default::default() };
                assert!(view.take(model, from, rows, &answered));
                assert_eq!(answer(model, layout, &shard.weights, rows), None, "a shard answers only for its rows");
            }
            assert!(view.has_all(&wanted));
            let ours: Vec<u32> = features.iter().map(|f| model.predict_on(&view, f).to_bits()).collect();
            let theirs: Vec<u32> = features.iter().map(|f| model.predict(&whole.weights, f).to_bits()).collect();
            assert_eq!(ours, theirs, "{layout:?}: predictions");
            let (g, h) =
                (model.gradient_on(&view, &batch).unwrap(), model.gradient_at(None, &whole.weights, &batch).unwrap());
            assert_eq!((g.tensors, g.loss_sum.to_bits()), (h.tensors, h.loss_sum.to_bits()), "{layout:?}: gradient");
        }
    }

    #[test]
    fn applies_contiguous_records_and_rejects_the_rest() {
        let (model, mut s) = setup();
        let outcome = |s: &mut ReplicaState, offset, bytes: Vec<u8>| match s.apply(&model, offset, &bytes, &mut NoTouch)
        {
            Outcome::Applied(_) | Outcome::RollBack(_) | Outcome::Settings(_) | Outcome::Attestation(_) => None,
            Outcome::Rejected(_, why) | Outcome::RollbackRejected(_, why) => Some(why),
        };
        assert_eq!(outcome(&mut s, 0, record(&model, 0, 0, 10, 0.1)), None);
        // A duplicate of the same range (zombie, retry) changes nothing.
        let before = s.weights.clone();
        assert_eq!(outcome(&mut s, 1, record(&model, 0, 0, 10, 0.1)), Some(Reject::NotContiguous));
        assert_eq!(s.weights, before);
        assert_eq!(outcome(&mut s, 2, record(&model, 0, 10, 15, f32::INFINITY)), Some(Reject::NonFinite));
        assert_eq!(outcome(&mut s, 3, record(&model, 0, 10, 15, 1e6)), Some(Reject::NormBound));
        // Within the bound per example, over it for one: 5 examples may carry 5x.
        assert_eq!(outcome(&mut s, 5, record(&model, 0, 10, 11, 900.0)), Some(Reject::NormBound));
        assert_eq!(outcome(&mut s, 6, record(&model, 0, 10, 10, 0.0)), None, "an empty range continues too");
        assert_eq!(outcome(&mut s, 4, b"garbage".to_vec()), Some(Reject::Malformed));
        assert_eq!(outcome(&mut s, 7, record(&model, 0, 10, 15, 0.1)), None);
        assert_eq!(s.position, 8, "every record read advances the position");
        assert_eq!(s.watermarks[&0], 15);
        assert_eq!(s.examples_learned, 15);
        assert_eq!((s.records_applied, s.records_rejected), (3, 5));
        assert_ne!(s.weights, before);
    }

    #[test]
    fn a_record_of_several_partitions_is_applied_whole_or_not_at_all() {
        let (model, mut s) = setup();
        let ranges = |list: &[(i32, i64, i64)]| {
            list.iter().map(|&(partition, from, to)| EventRange { partition, from, to }).collect()
        };
        let record = |list: &[(i32, i64, i64)]| {
            Record::Gradient(GradientRecord {
                fingerprint: model.fingerprint(),
                ranges: ranges(list),
                base: 0,
                examples: 3,
                skipped: 0,
                loss_sum: 2.0,
                oldest_ts: 0,
                producer: "t".into(),
                gradient: vec![GradTensor { param: 1, values: GradValues::Dense(vec![0.1, 0.1]) }],
            })
            .encode()
        };
        let mut apply =
            |offset, bytes: Vec<u8>| matches!(s.apply(&model, offset, &bytes, &mut NoTouch), Outcome::Applied(_));
        assert!(apply(0, record(&[(0, 0, 4), (3, 0, 2)])));
        // Partition 3 continues, partition 0 does not: nothing moves.
        assert!(!apply(1, record(&[(0, 2, 6), (3, 2, 5)])));
        // Out of partition order, or one partition twice: refused.
        assert!(!apply(2, record(&[(3, 2, 5), (0, 4, 6)])));
        assert!(!apply(3, record(&[(0, 4, 5), (0, 5, 6)])));
        assert!(apply(4, record(&[(0, 4, 6), (3, 2, 5), (7, 0, 1)])));
        assert_eq!(s.watermarks, BTreeMap::from([(0, 6), (3, 5), (7, 1)]));
        assert_eq!((s.records_applied, s.records_rejected, s.examples_learned), (2, 3, 6));
    }

    #[test]
    fn a_record_whose_sizes_disagree_is_rejected_and_moves_nothing() {
        use crate::update_log::record::{MAX_RANGE_GAP, MAX_RECORD_EVENTS};
        let (model, mut s) = setup();
        let record = |to: i64, examples: u32, skipped: u32| {
            Record::Gradient(GradientRecord {
                fingerprint: model.fingerprint(),
                ranges: vec![EventRange { partition: 0, from: 0, to }],
                base: 0,
                examples,
                skipped,
                loss_sum: 0.5 * f64::from(examples),
                oldest_ts: 0,
                producer: "hostile".into(),
                gradient: vec![GradTensor { param: 1, values: GradValues::Dense(vec![1e6, 1e6]) }],
            })
            .encode()
        };
        let cases = [
            // A watermark moved past anything the partition will ever hold.
            (1 << 62, 10, 0),
            // A norm bound as large as the record says.
            (i64::from(u32::MAX), u32::MAX, 0),
            (i64::from(MAX_RECORD_EVENTS) + 1, MAX_RECORD_EVENTS, 1),
            // More events than the ranges cover.
            (10, 11, 0),
            (10, 5, 6),
            (10 + MAX_RANGE_GAP + 1, 10, 0),
        ];
        for (i, (to, examples, skipped)) in cases.into_iter().enumerate() {
            let outcome = s.apply(&model, i as i64, &record(to, examples, skipped), &mut NoTouch);
            assert!(
                matches!(outcome, Outcome::Rejected(_, Reject::Size)),
                "[0, {to}), {examples}+{skipped}: {outcome:?}"
            );
        }
        assert!(s.watermarks.is_empty() && s.examples_learned == 0, "nothing moved");
        // A trainer's largest: its events and the whole gap allowance.
        let outcome = s.apply(&model, 9, &record(MAX_RANGE_GAP + 2000, 1900, 100), &mut NoTouch);
        assert!(matches!(outcome, Outcome::Applied(_)), "{outcome:?}");
    }

    #[test]
    fn inverse_sqrt_scaling_steps_a_gradient_less_for_each_record_it_did_not_see() {
        let moved = |scaling: StalenessScaling, offset: i64| {
            let mut c = ModelConfig { dense_dim: 2, buckets: 16, ..ModelConfig::small(ModelKind::Logistic) };
            (c.optimizer, c.learning_rate) = (Some(crate::config::OptimizerKind::Sgd), Some(1.0));
            c.staleness_scaling = scaling;
            let model = Model::new(&c).expect("a built-in model");
            let mut s = ReplicaState::initial(&model);
            let before = s.weights[1][0];
            // Computed at version 0, applied at `offset`: `offset` records unseen.
            let outcome = s.apply(&model, offset, &record(&model, 0, 0, 1, 0.5), &mut NoTouch);
            assert!(matches!(outcome, Outcome::Applied(_)), "{outcome:?}");
            before - s.weights[1][0]
        };
        assert_eq!(moved(StalenessScaling::None, 3), 0.5);
        assert_eq!(moved(StalenessScaling::InverseSqrt, 0), 0.5, "a fresh gradient counts in full");
        assert_eq!(moved(StalenessScaling::InverseSqrt, 3), 0.25, "3 unseen: 1 / sqrt(4)");
    }

    #[test]
    fn a_rollback_returns_learning_to_an_earlier_state_once() {
        let (model, mut s) = setup();
        let step = |s: &mut ReplicaState, offset, bytes: Vec<u8>| s.apply(&model, offset, &bytes, &mut NoTouch);
        step(&mut s, 0, record(&model, 0, 0, 10, 0.1));
        let at_1 = s.clone();
        step(&mut s, 1, record(&model, 0, 10, 20, 0.2));
        step(&mut s, 2, record(&model, 1, 0, 5, 0.3));
        let rollback = |to, seen, events| {
            Record::Rollback(RollbackRecord {
                fingerprint: model.fingerprint(),
                to,
                seen,
                events,
                reason: "t".into(),
                producer: "t".into(),
            })
            .encode()
        };
        // Skip: learning returns to position 1, the watermarks stay.
        let Outcome::RollBack(r) = step(&mut s, 3, rollback(1, 3, EventsSince::Skip)) else { panic!("not taken") };
        s.roll_back(3, &r, at_1.clone());
        assert_eq!((s.weights.clone(), s.examples_learned, s.loss_sum), (at_1.weights.clone(), 10, at_1.loss_sum));
        assert_eq!((s.watermarks[&0], s.watermarks[&1]), (20, 5));
        assert_eq!((s.position, s.records_applied, s.last_rollback), (4, 4, Some(3)));
        // Decided before that rollback was taken: superseded, nothing changes.
        let before = s.clone();
        let outcome = step(&mut s, 4, rollback(0, 3, EventsSince::Relearn));
        assert!(matches!(outcome, Outcome::RollbackRejected(_, Reject::Superseded)), "{outcome:?}");
        assert_eq!(s.weights, before.weights);
        // Ahead of what it saw, or of its own offset: refused.
        let outcome = step(&mut s, 5, rollback(5, 4, EventsSince::Skip));
        assert!(matches!(outcome, Outcome::RollbackRejected(_, Reject::BadTarget)), "{outcome:?}");
        let outcome = step(&mut s, 6, rollback(1, 9, EventsSince::Skip));
        assert!(matches!(outcome, Outcome::RollbackRejected(_, Reject::BadTarget)), "{outcome:?}");
        // Relearn: the watermarks return too.
        let Outcome::RollBack(r) = step(&mut s, 7, rollback(1, 7, EventsSince::Relearn)) else { panic!("not taken") };
        s.roll_back(7, &r, at_1.clone());
        assert_eq!(s.watermarks, at_1.watermarks);
        assert_eq!(s.records_rejected, 3);
    }
}
