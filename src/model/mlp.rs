//! `mlp`: dense features through ReLU hidden layers to one output.

use tch::Tensor;

use super::graph::BatchGraph;
use super::{MlpIdx, Weights};

pub(super) fn forward<W: Weights + ?Sized>(m: &MlpIdx, w: &W, input: &[f32]) -> f32 {
    let mut x = input.to_vec();
    let last = m.layers.len() - 1;
    for (i, &(wi, bi)) in m.layers.iter().enumerate() {
        let (weights, bias) = (w.param(wi), w.param(bi));
        let fan_in = x.len();
        x = (bias.iter().enumerate())
            .map(|(o, b)| {
                let v = b + super::dot(&weights[o * fan_in..(o + 1) * fan_in], &x);
                if i == last {
                    v
                } else {
                    v.max(0.0)
                }
            })
            .collect();
    }
    x[0]
}

/// The same function as [`forward`], over a batch `[B, in]`, as a libtorch graph.
pub(super) fn graph(m: &MlpIdx, g: &BatchGraph, input: Tensor) -> Tensor {
    let last = m.layers.len() - 1;
    let mut x = input;
    for (i, &(wi, bi)) in m.layers.iter().enumerate() {
        x = x.linear(g.leaf(wi), Some(g.leaf(bi).view([-1])));
        if i != last {
            x = x.relu();
        }
    }
    x
}
