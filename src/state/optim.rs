//! Deterministic optimizer steps on f32 buffers.
//!
//! The step runs in plain Rust, element by element in a fixed order, rather
//! than through libtorch's optimizers: every replica must reach bit-identical
//! weights, and a sparse gradient must touch only its rows (lazy Adagrad and
//! Adam, FTRL), which libtorch's dense optimizers would not do.
//!
//! Gradients are of the loss summed over a record's events, so the
//! per-coordinate optimizers (Adagrad, Adam, FTRL) step a coordinate by how
//! much evidence the record holds for it, whatever the record's size.

use crate::config::{ModelConfig, OptimizerKind};
use crate::model::{Buffers, GradTensor, GradValues, Layout, ParamSpec};

const ADAM_BETA1: f32 = 0.9;
const ADAM_BETA2: f32 = 0.999;
const EPS: f32 = 1e-8;

/// Receives what a step changed, so a serving snapshot can copy just that.
pub trait Touch {
    fn rows(&mut self, param: usize, ids: &[u32]);
    fn all(&mut self, param: usize);
}

/// Ignores what changed (tests, replay before the first publish).
pub struct NoTouch;
impl Touch for NoTouch {
    fn rows(&mut self, _: usize, _: &[u32]) {}
    fn all(&mut self, _: usize) {}
}

/// FTRL-Proximal's settings beyond its step size `alpha` (the optimizer's
/// `learning_rate`).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Ftrl {
    beta: f32,
    l1: f32,
    l2: f32,
}

impl Ftrl {
    /// The weight that the accumulators `z` and `n` give at step size `alpha`.
    fn weight(&self, alpha: f32, z: f32, n: f32) -> f32 {
        if z.abs() <= self.l1 {
            0.0
        } else {
            -(z - self.l1.copysign(z)) / ((self.beta + n.sqrt()) / alpha + self.l2)
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Optimizer {
    pub kind: OptimizerKind,
    pub learning_rate: f32,
    ftrl: Ftrl,
    /// Adagrad: the sum of squared gradients. Adam: first and second
    /// moments. FTRL: `z` and `n` (the sum of squared gradients).
    pub slots: Vec<Buffers>,
    /// Steps taken (Adam's bias correction).
    pub steps: u64,
    /// The rows of the sparse tables this replica holds (and steps).
    pub layout: Layout,
}

impl Optimizer {
    /// The optimizer of `config` with zero state (a checkpoint's to be read in).
    pub fn new(config: &ModelConfig, params: &[ParamSpec]) -> Self {
        Optimizer::for_layout(config, params, Layout::WHOLE)
    }

    /// The same for the shard `layout` of the parameters `params`: slots of
    /// the rows it holds only.
    pub fn for_layout(config: &ModelConfig, params: &[ParamSpec], layout: Layout) -> Self {
        let held = layout.held(params);
        let zeros = || held.iter().map(|p| vec![0f32; p.len()]).collect::<Buffers>();
        let (kind, learning_rate) = (config.optimizer(), config.step_size());
        Optimizer {
            kind,
            learning_rate,
            ftrl: Ftrl { beta: config.ftrl_beta, l1: config.l1, l2: config.l2 },
            slots: (0..kind.slots()).map(|_| zeros()).collect(),
            steps: 0,
            layout,
        }
    }

    /// The optimizer of `config` for initial `weights`. FTRL derives each
    /// weight from its accumulators: `z` starts where the closed form gives
    /// the initial weight (exactly, without L1 and L2), so the seeded
    /// embeddings and layers of the deep models keep their values.
    pub fn starting_at(config: &ModelConfig, params: &[ParamSpec], weights: &Buffers, layout: Layout) -> Self {
        let mut opt = Optimizer::for_layout(config, params, layout);
        if opt.kind == OptimizerKind::Ftrl {
            let scale = opt.ftrl.beta / opt.learning_rate + opt.ftrl.l2;
            for (z, w) in opt.slots[0].iter_mut().zip(weights) {
                z.iter_mut().zip(w).for_each(|(z, &w)| *z = -w * scale);
            }
        }
        opt
    }

    /// One step over every tensor of a gradient that the apply rule accepted
    /// (shapes already checked).
    pub fn step(&mut self, params: &[ParamSpec], weights: &mut Buffers, grads: &[GradTensor], touch: &mut impl Touch) {
        self.steps += 1;
        let at = self.at(self.steps);
        for g in grads {
            let p = g.param as usize;
            let cols = params[p].cols;
            match &g.values {
                GradValues::Dense(values) => {
                    let [s0, s1] = slot_slices(&mut self.slots, p, 0..values.len());
                    at.step_slice(values, &mut weights[p], [s0, s1]);
                    touch.all(p);
                }
                // Each row at its place in the tables: its id, or, for a
                // shard, the place of a row it holds (the others skipped).
                GradValues::Rows { ids, values } => {
                    let whole = self.layout == Layout::WHOLE;
                    let mut stepped = Vec::new(); // a shard's places, for `touch`
                    for (r, &id) in ids.iter().enumerate() {
                        let Some(place) = self.layout.place(id) else { continue };
                        if let Some(ahead) = ids.get(r + PREFETCH_ROWS_AHEAD).and_then(|&a| self.layout.place(a)) {
                            prefetch(&weights[p], ahead * cols);
                            self.slots.iter().for_each(|slot| prefetch(&slot[p], ahead * cols));
                        }
                        let row = place * cols..(place + 1) * cols;
                        let [s0, s1] = slot_slices(&mut self.slots, p, row.clone());
                        at.step_slice(&values[r * cols..(r + 1) * cols], &mut weights[p][row], [s0, s1]);
                        if !whole {
                            stepped.push(place as u32);
                        }
                    }
                    touch.rows(p, if whole { ids } else { &stepped });
                }
            }
        }
    }

    /// The step the optimizer takes as its `steps`-th: its kind, step size
    /// and Adam's bias corrections. Applied to slices of weights and slots,
    /// so that a trainer's overlay steps a copy of some rows with the same
    /// arithmetic, bit for bit, as the apply rule steps the whole state.
    pub fn at(&self, steps: u64) -> Step {
        Step {
            kind: self.kind,
            lr: self.learning_rate,
            ftrl: self.ftrl,
            c1: 1.0 - power(ADAM_BETA1, steps),
            c2: 1.0 - power(ADAM_BETA2, steps),
        }
    }
}

/// One optimizer step's constants (see [`Optimizer::at`]).
#[derive(Clone, Copy, Debug)]
pub struct Step {
    kind: OptimizerKind,
    lr: f32,
    ftrl: Ftrl,
    c1: f32,
    c2: f32,
}

impl Step {
    /// Steps `w` and its slots' cells (`kind.slots()` of them, each as long
    /// as `w`; the rest empty) by `grads`, coordinate by coordinate.
    pub fn step_slice(&self, grads: &[f32], w: &mut [f32], [s0, s1]: [&mut [f32]; 2]) {
        let lr = self.lr;
        match self.kind {
            OptimizerKind::Sgd => {
                for (w, &grad) in w.iter_mut().zip(grads) {
                    *w -= lr * grad;
                }
            }
            OptimizerKind::Adagrad => {
                for ((w, acc), &grad) in w.iter_mut().zip(s0).zip(grads) {
                    *acc += grad * grad;
                    *w -= lr * grad / (acc.sqrt() + EPS);
                }
            }
            OptimizerKind::Adam => {
                for (((w, m), v), &grad) in w.iter_mut().zip(s0).zip(s1).zip(grads) {
                    *m = ADAM_BETA1 * *m + (1.0 - ADAM_BETA1) * grad;
                    *v = ADAM_BETA2 * *v + (1.0 - ADAM_BETA2) * grad * grad;
                    *w -= lr * (*m / self.c1) / ((*v / self.c2).sqrt() + EPS);
                }
            }
            OptimizerKind::Ftrl => {
                for (((w, z), n), &grad) in w.iter_mut().zip(s0).zip(s1).zip(grads) {
                    let n_next = *n + grad * grad;
                    let sigma = (n_next.sqrt() - n.sqrt()) / lr;
                    *z += grad - sigma * *w;
                    *n = n_next;
                    *w = self.ftrl.weight(lr, *z, *n);
                }
            }
        }
    }
}

/// The cells `range` of parameter `p` in each of (up to two) slots; empty
/// slices for the slots the optimizer does not have.
pub fn slot_slices(slots: &mut [Buffers], p: usize, range: std::ops::Range<usize>) -> [&mut [f32]; 2] {
    let (first, rest) = slots.split_at_mut(slots.len().min(1));
    let s0: &mut [f32] = first.first_mut().map_or(&mut [], |s| &mut s[p][range.clone()]);
    let s1: &mut [f32] = rest.first_mut().map_or(&mut [], |s| &mut s[p][range]);
    [s0, s1]
}

/// How many rows ahead a sparse step asks the CPU to fetch: a record's rows
/// are scattered over tables larger than the caches, and a row's step is
/// short next to a miss. (Catching a snapshot up row by row gained nothing
/// from the same hint, measured.)
const PREFETCH_ROWS_AHEAD: usize = 8;

/// Asks the CPU to bring `values[at]` into cache (a hint: no effect on the
/// result, nothing where the target has no such instruction).
#[inline(always)]
fn prefetch(values: &[f32], at: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(v) = values.get(at) {
        // SAFETY: a prefetch never reads or faults; `v` is a live element.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>((v as *const f32).cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (values, at);
}

/// `base` to the power `exp` by squaring, in plain `f32` multiplications:
/// each is correctly rounded by IEEE 754, so every replica on every target
/// gets the same bits. (`powi` is an LLVM intrinsic whose precision Rust
/// does not specify: replicas built differently could step Adam apart.)
fn power(base: f32, mut exp: u64) -> f32 {
    let (mut result, mut square) = (1.0f32, base);
    while exp > 0 {
        if exp & 1 == 1 {
            result *= square;
        }
        square *= square;
        exp >>= 1;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adams_bias_correction_is_the_same_bits_everywhere() {
        // Fixed bits: a change of the algorithm changes how every replica
        // steps, and must be a change of the record format, not a surprise.
        let bits: Vec<u32> = [1, 2, 10, 1000, 1_000_000].iter().map(|&t| power(ADAM_BETA2, t).to_bits()).collect();
        assert_eq!(
            bits,
            [1_065_336_439, 1_065_319_679, 1_065_186_200, 1_052_525_466, 0],
            "{:?}",
            bits.iter().map(|&b| f32::from_bits(b)).collect::<Vec<_>>()
        );
        // Close to the exact power: each squaring at most doubles the
        // relative error, so it stays within about t f32 epsilons.
        for t in [1u64, 7, 100, 500] {
            let exact = f64::from(ADAM_BETA1).powf(t as f64);
            let error = (f64::from(power(ADAM_BETA1, t)) - exact).abs() / exact;
            assert!(error <= t as f64 * f64::from(f32::EPSILON), "t = {t}: relative error {error}");
        }
        assert_eq!(power(ADAM_BETA1, 0), 1.0);
        assert_eq!(power(ADAM_BETA1, u64::MAX), 0.0);
    }

    #[test]
    fn sparse_steps_touch_only_their_rows() {
        let params = vec![ParamSpec { name: "t".into(), rows: 4, cols: 2, sparse: true }];
        for kind in [OptimizerKind::Sgd, OptimizerKind::Adagrad, OptimizerKind::Adam, OptimizerKind::Ftrl] {
            let mut config = crate::config::Config::default().model;
            (config.optimizer, config.learning_rate) = (Some(kind), Some(0.1));
            let mut w = vec![vec![1f32; 8]];
            let mut opt = Optimizer::starting_at(&config, &params, &w, Layout::WHOLE);
            let g = GradTensor { param: 0, values: GradValues::Rows { ids: vec![2], values: vec![0.5, -0.5] } };
            opt.step(&params, &mut w, &[g], &mut NoTouch);
            assert_eq!(&w[0][..4], &[1.0; 4], "{kind:?}");
            assert!(w[0][4] < 1.0 && w[0][5] > 1.0, "{kind:?}: {:?}", w[0]);
        }
    }

    #[test]
    fn ftrl_starts_at_the_initial_weights_and_l1_zeroes_what_little_evidence_moves() {
        let params = vec![ParamSpec { name: "w".into(), rows: 1, cols: 3, sparse: false }];
        let mut config = crate::config::Config::default().model;
        (config.optimizer, config.learning_rate) = (Some(OptimizerKind::Ftrl), Some(0.1));
        let w = vec![vec![0.25f32, -0.5, 0.0]];
        let opt = Optimizer::starting_at(&config, &params, &w, Layout::WHOLE);
        let back: Vec<f32> =
            (0..3).map(|i| opt.ftrl.weight(opt.learning_rate, opt.slots[0][0][i], opt.slots[1][0][i])).collect();
        assert_eq!(back, w[0]);
        config.l1 = 1.0;
        let mut opt = Optimizer::starting_at(&config, &params, &vec![vec![0.0; 3]], Layout::WHOLE);
        let mut w = vec![vec![0.0f32; 3]];
        let g = |v: Vec<f32>| [GradTensor { param: 0, values: GradValues::Dense(v) }];
        opt.step(&params, &mut w, &g(vec![0.5, 3.0, -3.0]), &mut NoTouch);
        assert_eq!(w[0][0], 0.0, "|z| = 0.5 is within l1");
        assert!(w[0][1] < 0.0 && w[0][2] > 0.0, "{:?}", w[0]);
    }
}
