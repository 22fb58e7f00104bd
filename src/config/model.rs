//! The `[model]` section: which model, its shape, its loss and optimizer,
//! and its declared features (`[model.features]`, see `features`). Its keys
//! stay flat, as users write them: serde's `flatten` would group them but
//! cannot refuse unknown keys.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::features::FeaturesConfig;
use super::ConfigError;

/// Which model to train and serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// Dense features plus hashed sparse features, linear.
    Logistic,
    /// Dense features through hidden layers.
    Mlp,
    /// Bags of hashed embeddings per sparse field, concatenated with the dense
    /// features into an MLP, plus the linear part of `logistic`.
    WideDeep,
    /// A TorchScript module exported from PyTorch (`model.torchscript_path`),
    /// `forward(dense, ids)`: see `examples/torchscript/export.py`.
    #[serde(rename = "torchscript")]
    TorchScript,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Loss {
    /// Binary log-loss on a logit; labels in [0, 1]; predictions are probabilities.
    Logloss,
    /// Squared error; any finite label; predictions are the raw output.
    Squared,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    Sgd,
    Adagrad,
    Adam,
    /// FTRL-Proximal (McMahan et al. 2013): per-coordinate rates like
    /// Adagrad, with L1 that makes weights exactly zero.
    Ftrl,
}

impl OptimizerKind {
    /// Buffers of state per parameter besides the weights.
    pub fn slots(self) -> usize {
        match self {
            OptimizerKind::Sgd => 0,
            OptimizerKind::Adagrad => 1,
            OptimizerKind::Adam | OptimizerKind::Ftrl => 2,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Name under which the model is served (`/v1/models/{name}`).
    pub name: String,
    pub kind: ModelKind,
    /// Length of every event's `dense` array.
    pub dense_dim: usize,
    /// Names of the sparse fields an event may carry.
    pub sparse_fields: Vec<String>,
    /// Hash buckets per sparse field.
    pub buckets: u32,
    /// Embedding width per sparse field (`wide_deep`).
    pub embedding_dim: usize,
    /// Hidden layer widths (`mlp`, `wide_deep`).
    pub hidden: Vec<usize>,
    /// The module file of `kind = "torchscript"`.
    pub torchscript_path: PathBuf,
    pub loss: Loss,
    /// Unset: the kind's default ([`ModelConfig::optimizer`]).
    pub optimizer: Option<OptimizerKind>,
    /// The step size (FTRL's alpha). Unset: the optimizer's default
    /// ([`ModelConfig::step_size`]).
    pub learning_rate: Option<f32>,
    /// FTRL's beta: a coordinate's rate is `alpha / (beta + sqrt(n))`.
    pub ftrl_beta: f32,
    /// L1 and L2 strength (FTRL).
    pub l1: f32,
    pub l2: f32,
    /// Initial weights come from this seed: equal seeds, bit-identical weights.
    pub seed: u64,
    /// Gradients whose global L2 norm exceeds this are rejected.
    pub max_grad_norm: f32,
    /// How a gradient counts when other records changed the weights between
    /// the version it was computed at and its own offset.
    pub staleness_scaling: StalenessScaling,
    /// The model's inputs declared over the team's own events
    /// (`[model.features]`); none: the fixed event schema. Declared, they
    /// make `dense_dim` and `sparse_fields`.
    #[serde(default, skip_serializing_if = "FeaturesConfig::is_empty")]
    pub features: FeaturesConfig,
}

/// A deterministic step for stale gradients: every replica computes the
/// same scale from the log (`offset - base`, the records the gradient did
/// not see).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StalenessScaling {
    /// Every gradient counts in full.
    None,
    /// The gradient is scaled by `1 / sqrt(1 + s)` for `s` records unseen.
    InverseSqrt,
}

impl ModelConfig {
    /// A small model of `kind` (3 dense values, fields `a` and `b`, 64
    /// buckets, embeddings of 4, hidden layers [8, 4]), the defaults
    /// otherwise: the one fixture of unit tests that need a model quickly.
    pub fn small(kind: ModelKind) -> ModelConfig {
        ModelConfig {
            kind,
            dense_dim: 3,
            sparse_fields: vec!["a".into(), "b".into()],
            buckets: 64,
            embedding_dim: 4,
            hidden: vec![8, 4],
            ..ModelConfig::default()
        }
    }

    /// The optimizer: as set, else FTRL for `logistic` (measured on the
    /// load report's click-through stream: 0.521 against Adagrad's 0.553
    /// and Vowpal Wabbit's 0.528) and Adagrad for the deep kinds.
    pub fn optimizer(&self) -> OptimizerKind {
        self.optimizer.unwrap_or(match self.kind {
            ModelKind::Logistic => OptimizerKind::Ftrl,
            _ => OptimizerKind::Adagrad,
        })
    }

    /// The step size: as set, else 0.3 for FTRL (its alpha) and 0.05 for
    /// the others.
    pub fn step_size(&self) -> f32 {
        self.learning_rate.unwrap_or(match self.optimizer() {
            OptimizerKind::Ftrl => 0.3,
            _ => 0.05,
        })
    }

    /// The model section's own check.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: &str| Err(ConfigError::Invalid(msg.to_string()));
        if self.name.is_empty() || self.name.contains(['/', ':']) {
            return bad("model.name must be non-empty without '/' or ':'");
        }
        if self.buckets == 0 || self.embedding_dim == 0 {
            return bad("model.buckets and model.embedding_dim must be positive");
        }
        if self.kind == ModelKind::Mlp && self.dense_dim == 0 {
            return bad("model.kind = \"mlp\" needs model.dense_dim > 0");
        }
        if self.kind == ModelKind::TorchScript && self.torchscript_path.as_os_str().is_empty() {
            return bad(
                "model.kind = \"torchscript\" needs model.torchscript_path (a module saved by torch.jit.script)",
            );
        }
        if self.hidden.contains(&0) {
            return bad("model.hidden widths must be positive");
        }
        let mut names: Vec<&String> = self.sparse_fields.iter().collect();
        names.sort();
        names.dedup();
        if names.len() != self.sparse_fields.len() {
            return bad("model.sparse_fields has a duplicate name");
        }
        self.validate_features()?;
        self.validate_optimizer()
    }

    /// A declaration, checked, and the inputs it makes agreeing with
    /// `dense_dim` and `sparse_fields` (see [`ModelConfig::adopt_features`]).
    fn validate_features(&self) -> Result<(), ConfigError> {
        if !self.features.is_declared() {
            return Ok(());
        }
        self.features.validate()?;
        if self.dense_dim != self.features.dense.len() || self.sparse_fields != self.features.sparse_names() {
            return Err(ConfigError::Invalid(
                "model.dense_dim and model.sparse_fields come from model.features: leave them out".into(),
            ));
        }
        Ok(())
    }

    /// With declared features, the inputs they make: `dense_dim` their
    /// dense count, `sparse_fields` their sparse names. Left as they were
    /// when the configuration sets them otherwise: validation then says so.
    pub fn adopt_features(&mut self) {
        let defaults = ModelConfig::default();
        let untouched = self.dense_dim == defaults.dense_dim && self.sparse_fields == defaults.sparse_fields;
        if self.features.is_declared() && untouched {
            self.dense_dim = self.features.dense.len();
            self.sparse_fields = self.features.sparse_names();
        }
    }

    fn validate_optimizer(&self) -> Result<(), ConfigError> {
        let bad = |msg: &str| Err(ConfigError::Invalid(msg.to_string()));
        if !self.learning_rate.is_none_or(|lr| lr.is_finite() && lr > 0.0) {
            return bad("model.learning_rate must be a positive number");
        }
        if !(self.ftrl_beta.is_finite() && self.ftrl_beta > 0.0) {
            return bad("model.ftrl_beta must be a positive number");
        }
        if ![self.l1, self.l2].iter().all(|v| v.is_finite() && *v >= 0.0) {
            return bad("model.l1 and model.l2 must be finite numbers, 0 or more");
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm > 0.0) {
            return bad("model.max_grad_norm must be a positive number");
        }
        Ok(())
    }
}

impl Default for ModelConfig {
    fn default() -> ModelConfig {
        ModelConfig {
            name: "default".into(),
            kind: ModelKind::WideDeep,
            dense_dim: 8,
            sparse_fields: ["f0", "f1", "f2", "f3"].map(String::from).to_vec(),
            buckets: 1 << 18,
            embedding_dim: 16,
            hidden: vec![64, 32],
            torchscript_path: PathBuf::new(),
            loss: Loss::Logloss,
            optimizer: None,
            learning_rate: None,
            ftrl_beta: 1.0,
            l1: 0.0,
            l2: 0.0,
            seed: 42,
            max_grad_norm: 1000.0,
            staleness_scaling: StalenessScaling::None,
            features: FeaturesConfig::default(),
        }
    }
}
