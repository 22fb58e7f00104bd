//! The training graph of one batch in libtorch: leaf tensors for the dense
//! parameters and for only the rows of the sparse tables that the batch
//! touches, a forward pass per model kind, the loss, autograd, and the
//! gradients read back as dense buffers or sparse rows.

use std::collections::HashMap;

use tch::{Kind, Reduction, Tensor};

use super::{Arch, GradTensor, GradValues, Gradient, Model, Weights};
use crate::config::Loss;
use crate::event::Example;

#[derive(Debug, thiserror::Error)]
pub enum GradientError {
    #[error("empty batch")]
    Empty,
    #[error("libtorch failed: {0}")]
    Torch(String),
    #[error("a TorchScript model computes gradients on whole weights only")]
    WholeWeightsOnly,
}

/// Per sparse field: which examples hold which (local) rows.
struct FieldIndex {
    /// Distinct bucket ids of the field in this batch, in first-seen order.
    unique: Vec<u32>,
    /// For every (example, value) pair: the example's index in the batch.
    example: Tensor,
    /// For every pair: the value's index into `unique`.
    local: Tensor,
    /// Bag size per example, at least 1, `[B, 1]`, for bag means.
    counts: Tensor,
}

/// The inputs and leaf tensors of one batch.
pub(super) struct BatchGraph {
    batch: i64,
    dense: Tensor,
    fields: Vec<FieldIndex>,
    /// Per parameter: its leaf tensor, if the batch touches it.
    leaves: Vec<Option<Tensor>>,
    /// Per sparse parameter: the field whose ids index its rows.
    field_of: Vec<Option<usize>>,
    embedding_dim: i64,
}

impl BatchGraph {
    fn new<W: Weights + ?Sized>(model: &Model, w: &W, batch: &[Example]) -> BatchGraph {
        let n = batch.len();
        let dim = model.config.dense_dim;
        let dense: Vec<f32> = batch.iter().flat_map(|e| e.features.dense.iter().copied()).collect();
        let fields: Vec<FieldIndex> = (0..model.featurizer.fields().len())
            .map(|field| {
                let mut unique = Vec::new();
                let mut seen: HashMap<u32, i64> = HashMap::new();
                let (mut example, mut local, mut counts) = (Vec::new(), Vec::new(), Vec::with_capacity(n));
                for (i, e) in batch.iter().enumerate() {
                    let ids = &e.features.ids[field];
                    counts.push(ids.len().max(1) as f32);
                    for &id in ids {
                        let l = *seen.entry(id).or_insert_with(|| {
                            unique.push(id);
                            unique.len() as i64 - 1
                        });
                        example.push(i as i64);
                        local.push(l);
                    }
                }
                FieldIndex {
                    unique,
                    example: Tensor::from_slice(&example),
                    local: Tensor::from_slice(&local),
                    counts: Tensor::from_slice(&counts).view([n as i64, 1]),
                }
            })
            .collect();
        let field_of: Vec<Option<usize>> = (0..model.params.len()).map(|p| model.sparse_field(p)).collect();
        let leaves = (model.params.iter().enumerate().zip(&field_of))
            .map(|((param, p), field)| {
                let t = match field {
                    None => Tensor::from_slice(w.param(param)).view([p.rows as i64, p.cols as i64]),
                    Some(f) if fields[*f].unique.is_empty() => return None,
                    Some(f) => {
                        let ids = &fields[*f].unique;
                        let mut rows = Vec::with_capacity(ids.len() * p.cols);
                        for &id in ids {
                            rows.extend_from_slice(w.row(param, id, p.cols));
                        }
                        Tensor::from_slice(&rows).view([ids.len() as i64, p.cols as i64])
                    }
                };
                Some(t.set_requires_grad(true))
            })
            .collect();
        BatchGraph {
            batch: n as i64,
            dense: Tensor::from_slice(&dense).view([n as i64, dim as i64]),
            fields,
            leaves,
            field_of,
            embedding_dim: model.config.embedding_dim as i64,
        }
    }

    /// The leaf of a dense parameter (always present).
    pub(super) fn leaf(&self, param: usize) -> &Tensor {
        self.leaves[param].as_ref().expect("dense parameters always have a leaf")
    }

    pub(super) fn dense(&self) -> Tensor {
        self.dense.shallow_clone()
    }

    /// `[B, cols]`: per example, the sum of the rows of `table` its bag
    /// selects through `field`.
    fn bag_sum(&self, field: usize, table: usize, cols: i64) -> Tensor {
        let zeros = Tensor::zeros([self.batch, cols], (Kind::Float, tch::Device::Cpu));
        match &self.leaves[table] {
            None => zeros,
            Some(rows) => {
                let f = &self.fields[field];
                zeros.index_add(0, &f.example, &rows.index_select(0, &f.local))
            }
        }
    }

    /// `[B, embedding_dim]`: the mean embedding of each example's bag in `field`.
    pub(super) fn bag_mean(&self, field: usize, table: usize) -> Tensor {
        self.bag_sum(field, table, self.embedding_dim) / &self.fields[field].counts
    }

    /// `[B, 1]`: the linear part.
    pub(super) fn linear(&self, l: &super::LinearIdx) -> Tensor {
        let mut out = self.dense.matmul(&self.leaf(l.dense).tr()) + self.leaf(l.bias);
        for (field, &table) in l.wide.iter().enumerate() {
            if self.leaves[table].is_some() {
                out += self.bag_sum(field, table, 1);
            }
        }
        out
    }
}

fn forward(model: &Model, g: &BatchGraph) -> Tensor {
    match &model.arch {
        Arch::Logistic(l) => super::logistic::graph(l, g),
        Arch::Mlp(m) => super::mlp::graph(m, g, g.dense()),
        Arch::WideDeep { linear, emb, mlp } => super::wide_deep::graph(linear, emb, mlp, g),
        Arch::Script(_) => unreachable!("TorchScript models run their own graph (script.rs)"),
    }
}

/// Runs `f`, turning a libtorch exception (which tch raises as a panic) into
/// an error: bad data must never take the process down.
pub(super) fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, GradientError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|e| {
        let msg = (e.downcast_ref::<String>().cloned())
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown error".into());
        GradientError::Torch(msg)
    })
}

/// The logits of a batch, through libtorch (tests compare them with the
/// Rust forward pass).
#[cfg(test)]
pub(super) fn logits<W: Weights + ?Sized>(model: &Model, w: &W, batch: &[Example]) -> Result<Vec<f32>, GradientError> {
    guarded(|| {
        let g = BatchGraph::new(model, w, batch);
        let out = tch::no_grad(|| forward(model, &g)).view([-1]);
        let mut v = vec![0f32; batch.len()];
        out.copy_data(&mut v, batch.len());
        v
    })
}

pub(super) fn gradient<W: Weights + ?Sized>(
    model: &Model,
    w: &W,
    batch: &[Example],
) -> Result<Gradient, GradientError> {
    if batch.is_empty() {
        return Err(GradientError::Empty);
    }
    guarded(|| {
        let g = BatchGraph::new(model, w, batch);
        let labels: Vec<f32> = batch.iter().map(|e| e.label).collect();
        let labels = Tensor::from_slice(&labels).view([g.batch, 1]);
        let out = forward(model, &g);
        let loss_sum = match model.config.loss {
            Loss::Logloss => out.binary_cross_entropy_with_logits::<Tensor>(&labels, None, None, Reduction::Sum),
            Loss::Squared => out.mse_loss(&labels, Reduction::Sum),
        };
        loss_sum.backward();
        let tensors = (g.leaves.iter().enumerate())
            .filter_map(|(param, leaf)| {
                let grad = leaf.as_ref()?.grad();
                let mut values = vec![0f32; grad.numel()];
                let n = values.len();
                grad.copy_data(&mut values, n);
                let values = match g.field_of[param] {
                    None => GradValues::Dense(values),
                    Some(f) => GradValues::Rows { ids: g.fields[f].unique.clone(), values },
                };
                Some(GradTensor { param: param as u32, values })
            })
            .collect();
        Gradient { loss_sum: loss_sum.double_value(&[]), tensors }
    })
}
