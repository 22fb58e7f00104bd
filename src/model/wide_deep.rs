//! `wide_deep`: the linear part of `logistic` plus a deep part, an MLP over
//! the dense features concatenated with the mean embedding of each sparse
//! field's bag (an empty bag embeds as zeros).

use tch::Tensor;

use super::graph::BatchGraph;
use super::{LinearIdx, MlpIdx, Weights};
use crate::event::Features;

pub(super) fn forward<W: Weights + ?Sized>(
    linear: &LinearIdx,
    emb: &[usize],
    mlp: &MlpIdx,
    dim: usize,
    w: &W,
    f: &Features,
) -> f32 {
    let mut x = Vec::with_capacity(f.dense.len() + emb.len() * dim);
    x.extend_from_slice(&f.dense);
    for (&table, ids) in emb.iter().zip(&f.ids) {
        let start = x.len();
        x.resize(start + dim, 0.0);
        for &id in ids {
            let row = w.row(table, id, dim);
            x[start..].iter_mut().zip(row).for_each(|(a, b)| *a += b);
        }
        if ids.len() > 1 {
            let n = ids.len() as f32;
            x[start..].iter_mut().for_each(|a| *a /= n);
        }
    }
    super::linear_forward(linear, w, f) + super::mlp::forward(mlp, w, &x)
}

/// The same function as [`forward`], over a batch, as a libtorch graph.
pub(super) fn graph(linear: &LinearIdx, emb: &[usize], mlp: &MlpIdx, g: &BatchGraph) -> Tensor {
    let mut parts = vec![g.dense()];
    parts.extend(emb.iter().enumerate().map(|(field, &table)| g.bag_mean(field, table)));
    g.linear(linear) + super::mlp::graph(mlp, g, Tensor::cat(&parts, 1))
}
