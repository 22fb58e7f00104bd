//! Deterministic optimizer steps on f32 buffers.
//!
//! The step runs in plain Rust, element by element in a fixed order, rather
//! than through libtorch's optimizers: every replica must reach bit-identical
//! weights, and a sparse gradient must touch only its rows (lazy Adagrad and
//! Adam), which libtorch's dense optimizers would not do.

use crate::config::OptimizerKind;
use crate::model::{Buffers, GradTensor, GradValues, ParamSpec};

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

#[derive(Clone, Debug, PartialEq)]
pub struct Optimizer {
    pub kind: OptimizerKind,
    pub learning_rate: f32,
    /// Adagrad: the sum of squared gradients. Adam: first and second moments.
    pub slots: Vec<Buffers>,
    /// Steps taken (Adam's bias correction).
    pub steps: u64,
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, learning_rate: f32, params: &[ParamSpec]) -> Self {
        let n_slots = match kind {
            OptimizerKind::Sgd => 0,
            OptimizerKind::Adagrad => 1,
            OptimizerKind::Adam => 2,
        };
        let zeros = || params.iter().map(|p| vec![0f32; p.len()]).collect::<Buffers>();
        Optimizer { kind, learning_rate, slots: (0..n_slots).map(|_| zeros()).collect(), steps: 0 }
    }

    /// One step over every tensor of a gradient that the apply rule accepted
    /// (shapes already checked).
    pub fn step(&mut self, params: &[ParamSpec], weights: &mut Buffers, grads: &[GradTensor], touch: &mut impl Touch) {
        self.steps += 1;
        let lr = self.learning_rate;
        let t = self.steps.min(i32::MAX as u64) as i32;
        let (c1, c2) = (1.0 - ADAM_BETA1.powi(t), 1.0 - ADAM_BETA2.powi(t));
        for g in grads {
            let p = g.param as usize;
            let cols = params[p].cols;
            let update = |i: usize, grad: f32, slots: &mut [Buffers], w: &mut [f32]| match self.kind {
                OptimizerKind::Sgd => w[i] -= lr * grad,
                OptimizerKind::Adagrad => {
                    let acc = &mut slots[0][p][i];
                    *acc += grad * grad;
                    w[i] -= lr * grad / (acc.sqrt() + EPS);
                }
                OptimizerKind::Adam => {
                    let (m, v) = slots.split_at_mut(1);
                    let (m, v) = (&mut m[0][p][i], &mut v[0][p][i]);
                    *m = ADAM_BETA1 * *m + (1.0 - ADAM_BETA1) * grad;
                    *v = ADAM_BETA2 * *v + (1.0 - ADAM_BETA2) * grad * grad;
                    w[i] -= lr * (*m / c1) / ((*v / c2).sqrt() + EPS);
                }
            };
            let w = &mut weights[p];
            match &g.values {
                GradValues::Dense(values) => {
                    for (i, &grad) in values.iter().enumerate() {
                        update(i, grad, &mut self.slots, w);
                    }
                    touch.all(p);
                }
                GradValues::Rows { ids, values } => {
                    for (r, &id) in ids.iter().enumerate() {
                        for c in 0..cols {
                            update(id as usize * cols + c, values[r * cols + c], &mut self.slots, w);
                        }
                    }
                    touch.rows(p, ids);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_steps_touch_only_their_rows() {
        let params = vec![ParamSpec { name: "t".into(), rows: 4, cols: 2, sparse: true }];
        for kind in [OptimizerKind::Sgd, OptimizerKind::Adagrad, OptimizerKind::Adam] {
            let mut opt = Optimizer::new(kind, 0.1, &params);
            let mut w = vec![vec![1f32; 8]];
            let g = GradTensor { param: 0, values: GradValues::Rows { ids: vec![2], values: vec![0.5, -0.5] } };
            opt.step(&params, &mut w, &[g], &mut NoTouch);
            assert_eq!(&w[0][..4], &[1.0; 4], "{kind:?}");
            assert!(w[0][4] < 1.0 && w[0][5] > 1.0, "{kind:?}: {:?}", w[0]);
        }
    }
}
