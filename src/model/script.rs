//! `torchscript`: bring your own PyTorch model. A module exported with
//! `torch.jit.script` (see `examples/torchscript/export.py`) whose
//! `forward(dense, ids)` takes
//!
//! - `dense`: float32 `[B, dense_dim]`,
//! - `ids`: int64 `[B, F, L]`, per sparse field the bucket ids of the bag
//!   (hashed as for the built-in kinds), padded with -1, `L >= 1`,
//!
//! and returns B scores (logits under log-loss). Every parameter of the
//! module is a tributary parameter: trained through the same gradient log,
//! checkpointed and rolled back like the built-in kinds'. A parameter's
//! gradient travels as the rows it touches when that is at most half of
//! them (an embedding table's rows of the batch's buckets), else whole;
//! `Embedding(sparse=True)` gradients name their rows, dense ones are
//! scanned for them (slower: a full-size gradient per table and step).
//! The weights of each new served version are copied into the trainer's
//! instance (once for all the batches trained at that version) and into a
//! serving instance: a few million parameters cost a few milliseconds per
//! swap; for 10^7 and more, prefer a built-in kind.
//! Initial weights are the module's own saved values, so every replica
//! starts from the same ones.
//!
//! The trainer's instance has its parameters overwritten with the weights
//! of each batch; serving instances hold the weights of a served version,
//! two of them (the left-right pair of `serving`), so a swap costs one copy
//! of the weights into the instance that served the version before.

use std::path::PathBuf;
use std::sync::Mutex;

use tch::{CModule, Kind, Reduction, Tensor};

use super::graph::guarded;
use super::{Buffers, GradTensor, GradValues, Gradient, GradientError, ParamSpec};
use crate::config::{Loss, ModelConfig};
use crate::event::{Example, Features};

#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    #[error("model.torchscript_path is empty: model.kind = \"torchscript\" needs a module file")]
    NoPath,
    #[error("cannot read the TorchScript module {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a TorchScript module tributary can train: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// One loaded copy of the module and handles to its parameters.
struct Instance {
    module: CModule,
    params: Vec<Tensor>,
}

impl Instance {
    fn new(bytes: &[u8]) -> Result<Instance, String> {
        let module = CModule::load_data(&mut &bytes[..]).map_err(|e| e.to_string())?;
        let params = module.named_parameters().map_err(|e| e.to_string())?.into_iter().map(|(_, t)| t).collect();
        Ok(Instance { module, params })
    }

    /// Overwrites every parameter with `w`.
    fn set_weights<B: AsRef<[f32]>>(&mut self, w: &[B]) {
        tch::no_grad(|| {
            for (t, buf) in self.params.iter_mut().zip(w) {
                let src = Tensor::from_slice(buf.as_ref()).reshape(t.size());
                t.copy_(&src);
            }
        });
    }

    /// `forward(dense, ids)` as B values.
    fn forward(&self, dense_dim: usize, fields: usize, batch: &[&Features]) -> Result<Tensor, String> {
        let (dense, ids) = inputs(dense_dim, fields, batch);
        let out = self.module.forward_ts(&[dense, ids]).map_err(|e| e.to_string())?;
        if out.numel() != batch.len() {
            return Err(format!(
                "forward returned shape {:?} for a batch of {}; it must return one value per row",
                out.size(),
                batch.len()
            ));
        }
        Ok(out.to_kind(Kind::Float).reshape([-1]))
    }
}

/// The module's inputs for a batch.
fn inputs(dense_dim: usize, fields: usize, batch: &[&Features]) -> (Tensor, Tensor) {
    let b = batch.len();
    let dense: Vec<f32> = batch.iter().flat_map(|f| f.dense.iter().copied()).collect();
    let longest = batch.iter().flat_map(|f| f.ids.iter().map(Vec::len)).max().unwrap_or(0).max(1);
    let mut ids = vec![-1i64; b * fields * longest];
    for (row, f) in batch.iter().enumerate() {
        for (field, bag) in f.ids.iter().enumerate().take(fields) {
            let at = (row * fields + field) * longest;
            ids[at..at + bag.len()].iter_mut().zip(bag).for_each(|(slot, &id)| *slot = i64::from(id));
        }
    }
    (
        Tensor::from_slice(&dense).view([b as i64, dense_dim as i64]),
        Tensor::from_slice(&ids).view([b as i64, fields as i64, longest as i64]),
    )
}

/// A parameter's gradient as it travels: the rows it touches when that is
/// at most half of them (embedding tables: the batch's buckets), else all;
/// `None` when the batch did not reach it (as for the built-in kinds'
/// untouched tables). Dense gradients are scanned for non-zero rows; sparse
/// ones (an `Embedding(..., sparse=True)`) name their rows themselves.
fn gradient_values(t: &Tensor) -> Option<GradValues> {
    let grad = t.grad();
    if !grad.defined() {
        return None;
    }
    let rows = t.size().first().copied().unwrap_or(1).max(1);
    let (touched, picked) = if grad.is_sparse() {
        // Rows looked up but given a zero gradient (a padded slot's row 0)
        // are left out, as the dense path leaves them out.
        let g = grad.coalesce();
        let values = g.values().reshape([g.values().size()[0], -1]);
        let nonzero = values.ne(0.0).any_dim(1, false).nonzero().reshape([-1]);
        (g.indices().select(0, 0).index_select(0, &nonzero), values.index_select(0, &nonzero))
    } else {
        let g = grad.contiguous().reshape([rows, -1]);
        if rows == 1 {
            return Some(GradValues::Dense(read(&g)));
        }
        let touched = g.ne(0.0).any_dim(1, false).nonzero().reshape([-1]);
        (touched.shallow_clone(), g.index_select(0, &touched))
    };
    let k = touched.numel();
    if k == 0 {
        return None;
    }
    if 2 * k > rows as usize {
        let dense = if grad.is_sparse() { grad.to_dense(None, false) } else { grad };
        return Some(GradValues::Dense(read(&dense.contiguous())));
    }
    let mut ids = vec![0i64; k];
    touched.copy_data(&mut ids, k);
    Some(GradValues::Rows { ids: ids.into_iter().map(|i| i as u32).collect(), values: read(&picked.contiguous()) })
}

fn read(t: &Tensor) -> Vec<f32> {
    let n = t.numel();
    let mut values = vec![0f32; n];
    t.copy_data(&mut values, n);
    values
}

pub(super) struct Script {
    path: PathBuf,
    /// The file: each instance loads from it, the fingerprint hashes it.
    pub(super) bytes: Vec<u8>,
    pub(super) initial: Buffers,
    dense_dim: usize,
    fields: usize,
    loss: Loss,
    /// The trainer's instance and the version of the weights it holds.
    train: Mutex<(Option<i64>, Instance)>,
    /// (the served version it holds, the instance), most recently used last.
    serve: Mutex<Vec<(Option<i64>, Instance)>>,
}

impl std::fmt::Debug for Script {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Script({}, {} parameters)", self.path.display(), self.initial.len())
    }
}

/// Serving instances kept: the two versions of the left-right pair.
const SERVING_INSTANCES: usize = 2;

impl Script {
    /// Loads the module, reads its parameters, and runs it once on a batch
    /// with every input at its extreme (the last bucket of every field), so
    /// that a module that does not fit the configuration fails here, with
    /// a message, rather than on the first event.
    pub(super) fn load(config: &ModelConfig) -> Result<(Script, Vec<ParamSpec>), ScriptError> {
        let path = config.torchscript_path.clone();
        if path.as_os_str().is_empty() {
            return Err(ScriptError::NoPath);
        }
        let bytes = std::fs::read(&path).map_err(|source| ScriptError::Read { path: path.clone(), source })?;
        let invalid = |reason: String| ScriptError::Invalid { path: path.clone(), reason };
        let mut instance = Instance::new(&bytes).map_err(invalid)?;
        instance.module.f_set_train().map_err(|e| invalid(e.to_string()))?;
        let named = instance.module.named_parameters().map_err(|e| invalid(e.to_string()))?;
        if named.is_empty() {
            return Err(invalid("it has no parameters to train".into()));
        }
        let mut specs = Vec::new();
        let mut initial = Vec::new();
        for (name, t) in &named {
            if t.kind() != Kind::Float {
                return Err(invalid(format!(
                    "parameter {name} is {:?}; tributary trains float32 parameters",
                    t.kind()
                )));
            }
            let size = t.size();
            let rows = size.first().copied().unwrap_or(1).max(1) as usize;
            let n = t.numel();
            let mut values = vec![0f32; n];
            t.detach().contiguous().copy_data(&mut values, n);
            specs.push(ParamSpec { name: format!("script.{name}"), rows, cols: n / rows, sparse: false });
            initial.push(values);
        }
        let fields = config.sparse_fields.len();
        let last = config.buckets.saturating_sub(1);
        let probe = Features { dense: vec![1.0; config.dense_dim], ids: vec![vec![last]; fields] };
        let _ = guarded(|| instance.forward(config.dense_dim, fields, &[&probe, &probe]))
            .map_err(|e| invalid(e.to_string()))?
            .map_err(|e| {
                invalid(format!(
                    "forward(dense [2, {}], ids [2, {fields}, 1] = bucket {last}) failed: {e}",
                    config.dense_dim
                ))
            })?;
        let script = Script {
            path,
            bytes,
            initial,
            dense_dim: config.dense_dim,
            fields,
            loss: config.loss,
            train: Mutex::new((None, instance)),
            serve: Mutex::new(Vec::new()),
        };
        Ok((script, specs))
    }

    /// The gradient of `batch` at weights `w`, which `version` names (see
    /// [`Script::outputs`]): the trainer's batches between two swaps share
    /// a version, and the weights are copied in once for all of them.
    pub(super) fn gradient<B: AsRef<[f32]>>(
        &self,
        version: Option<i64>,
        w: &[B],
        batch: &[Example],
    ) -> Result<Gradient, GradientError> {
        if batch.is_empty() {
            return Err(GradientError::Empty);
        }
        let mut train = self.train.lock().unwrap_or_else(|e| e.into_inner());
        let (held, instance) = &mut *train;
        guarded(|| {
            // Untagged until the copy is whole (a failure leaves it untagged).
            let had = held.take();
            if version.is_none() || had != version {
                instance.set_weights(w);
            }
            *held = version;
            for t in instance.params.iter_mut() {
                t.zero_grad();
            }
            let features: Vec<&Features> = batch.iter().map(|e| &e.features).collect();
            let out = instance.forward(self.dense_dim, self.fields, &features).map_err(GradientError::Torch)?;
            let labels: Vec<f32> = batch.iter().map(|e| e.label).collect();
            let labels = Tensor::from_slice(&labels);
            let loss_sum = match self.loss {
                Loss::Logloss => out.binary_cross_entropy_with_logits::<Tensor>(&labels, None, None, Reduction::Sum),
                Loss::Squared => out.mse_loss(&labels, Reduction::Sum),
            };
            loss_sum.backward();
            let tensors = (instance.params.iter().enumerate())
                .filter_map(|(param, t)| Some(GradTensor { param: param as u32, values: gradient_values(t)? }))
                .collect();
            Ok(Gradient { loss_sum: loss_sum.double_value(&[]), tensors })
        })?
    }

    /// Raw outputs for `batch` under weights `w`. `version` names the
    /// weights (a served version): an instance that holds them already is
    /// used as it is. `None`: the weights are copied in for this call.
    pub(super) fn outputs<B: AsRef<[f32]>>(
        &self,
        version: Option<i64>,
        w: &[B],
        batch: &[&Features],
    ) -> Result<Vec<f32>, GradientError> {
        let mut pool = self.serve.lock().unwrap_or_else(|e| e.into_inner());
        let at = match pool.iter().position(|(v, _)| version.is_some() && *v == version) {
            Some(i) => i,
            None => {
                // A new instance while there are fewer than two, else the
                // least recently used one (the first).
                let i = if pool.len() < SERVING_INSTANCES {
                    let mut fresh = Instance::new(&self.bytes).map_err(GradientError::Torch)?;
                    fresh.module.f_set_eval().map_err(|e| GradientError::Torch(e.to_string()))?;
                    pool.push((None, fresh));
                    pool.len() - 1
                } else {
                    0
                };
                pool[i].0 = None; // untagged until the copy is whole
                guarded(|| pool[i].1.set_weights(w))?;
                pool[i].0 = version;
                i
            }
        };
        // Most recently used last.
        let entry = pool.remove(at);
        pool.push(entry);
        let (_, instance) = pool.last().expect("just pushed");
        guarded(|| {
            let out =
                tch::no_grad(|| instance.forward(self.dense_dim, self.fields, batch)).map_err(GradientError::Torch)?;
            let mut values = vec![0f32; batch.len()];
            out.copy_data(&mut values, batch.len());
            Ok(values)
        })?
    }
}
