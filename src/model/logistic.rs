//! `logistic`: dense features plus hashed sparse features, linear.

use tch::Tensor;

use super::graph::BatchGraph;
use super::{LinearIdx, Weights};
use crate::event::Features;

pub(super) fn forward<W: Weights + ?Sized>(l: &LinearIdx, w: &W, f: &Features) -> f32 {
    super::linear_forward(l, w, f)
}

/// The same function as [`forward`], over a batch, as a libtorch graph.
pub(super) fn graph(l: &LinearIdx, g: &BatchGraph) -> Tensor {
    g.linear(l)
}
