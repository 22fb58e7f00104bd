//! The model: parameter layout, seeded initial weights, the serving forward
//! pass (plain Rust over the snapshot's f32 buffers) and the training graph
//! (libtorch autograd through tch). Knows neither HTTP nor Kafka.
//!
//! Each model kind lives in its own file with its forward pass and its
//! training graph side by side, so the two can be read against each other;
//! `tests::forward_matches_libtorch` checks that they agree.
//!
//! Why serve from Rust rather than libtorch: one libtorch op costs a few
//! microseconds of dispatch, and a `wide_deep` prediction is a dozen ops; the
//! Rust loop answers a single instance in about a microsecond.

pub mod gathered;
mod graph;
mod init;
pub mod layout;
mod logistic;
mod mlp;
mod script;
mod wide_deep;

use std::sync::Arc;

use crate::config::{Loss, ModelConfig, ModelKind};
use crate::event::{Example, Features, Featurizer};

pub use graph::GradientError;
pub use layout::Layout;
pub use script::ScriptError;

/// One parameter tensor, stored row-major as `rows x cols` f32 values.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    /// Indexed by bucket id: gradients touch few rows and travel as rows.
    pub sparse: bool,
}

impl ParamSpec {
    fn new(name: impl Into<String>, rows: usize, cols: usize, sparse: bool) -> Self {
        ParamSpec { name: name.into(), rows, cols, sparse }
    }
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Weights (or optimizer state): one buffer per parameter, in layout order.
pub type Buffers = Vec<Vec<f32>>;

/// Weights as a gradient reads them: each dense parameter whole, and single
/// rows of the sparse tables (so a view can hold a few rows of its own over
/// shared weights: the trainer's overlay).
pub trait Weights {
    /// Parameter `param`, whole.
    fn param(&self, param: usize) -> &[f32];
    /// Row `id` (of `cols` values) of parameter `param`.
    fn row(&self, param: usize, id: u32, cols: usize) -> &[f32] {
        &self.param(param)[id as usize * cols..(id as usize + 1) * cols]
    }
}

impl<B: AsRef<[f32]>> Weights for [B] {
    fn param(&self, param: usize) -> &[f32] {
        self[param].as_ref()
    }
}

/// The gradient of one parameter.
#[derive(Clone, Debug, PartialEq)]
pub enum GradValues {
    Dense(Vec<f32>),
    /// `ids` are distinct row indices; `values` holds `ids.len() x cols`.
    Rows {
        ids: Vec<u32>,
        values: Vec<f32>,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct GradTensor {
    pub param: u32,
    pub values: GradValues,
}

/// The result of one training step on a batch, before any weight changes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Gradient {
    /// Loss summed over the batch, computed before the update (progressive).
    pub loss_sum: f64,
    /// Gradient of the loss summed over the batch (not its mean): batches
    /// vary in size, and a coordinate that k events touch should move about
    /// k times as far as one that one event touches, whatever the batch.
    pub tensors: Vec<GradTensor>,
}

/// Indices of the parameters of the linear part (`logistic`, and the wide
/// half of `wide_deep`).
#[derive(Clone, Debug)]
struct LinearIdx {
    bias: usize,
    dense: usize,
    /// One `[buckets, 1]` table per sparse field.
    wide: Vec<usize>,
}

/// Indices of an MLP's layers: (weight `[out, in]`, bias `[1, out]`).
#[derive(Clone, Debug)]
struct MlpIdx {
    layers: Vec<(usize, usize)>,
}

#[derive(Clone, Debug)]
enum Arch {
    Logistic(LinearIdx),
    Mlp(MlpIdx),
    WideDeep {
        linear: LinearIdx,
        emb: Vec<usize>,
        mlp: MlpIdx,
    },
    /// A TorchScript module: its parameters, in `named_parameters` order.
    Script(Arc<script::Script>),
}

/// A model's structure, fixed by its configuration.
#[derive(Clone, Debug)]
pub struct Model {
    config: ModelConfig,
    params: Vec<ParamSpec>,
    arch: Arch,
    featurizer: Featurizer,
    settings: Settings,
    fingerprint: u64,
    /// The rows of the sparse tables this replica holds: not a setting (the
    /// log and its records are the same whatever the layout).
    layout: Layout,
}

/// The named settings that decide what a weight and a gradient record mean
/// and what applying one does: setting -> value as text. The fingerprint is
/// their hash, so the two cannot disagree, and a replica can say which
/// setting differs from another's.
pub type Settings = std::collections::BTreeMap<String, String>;

/// Everything that changes the meaning of a weight or of a gradient record,
/// or what applying one does (the optimizer and all its settings), or the
/// weights a replica starts from (the seed); a TorchScript module's own
/// code counts too, as the hash of its file.
fn settings_of(config: &ModelConfig, params: &[ParamSpec], script: Option<&[u8]>) -> Settings {
    let c = config;
    let layout: Vec<String> = params.iter().map(|p| format!("{}:{}x{}", p.name, p.rows, p.cols)).collect();
    let mut settings: Settings = [
        ("model.kind", format!("{:?}", c.kind)),
        ("model.loss", format!("{:?}", c.loss)),
        ("model.dense_dim", c.dense_dim.to_string()),
        ("model.sparse_fields", format!("{:?}", c.sparse_fields)),
        ("model.buckets", c.buckets.to_string()),
        ("model.optimizer", format!("{:?}", c.optimizer())),
        ("model.learning_rate", c.step_size().to_string()),
        ("model.ftrl_beta", c.ftrl_beta.to_string()),
        ("model.l1", c.l1.to_string()),
        ("model.l2", c.l2.to_string()),
        ("model.max_grad_norm", c.max_grad_norm.to_string()),
        ("model.staleness_scaling", format!("{:?}", c.staleness_scaling)),
        ("model.seed", c.seed.to_string()),
        ("parameters", layout.join(";")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if let Some(bytes) = script {
        settings.insert("torchscript module (blake3)".into(), blake3::hash(bytes).to_hex().to_string());
    }
    // Only when declared: a model of the fixed schema keeps its fingerprint.
    if c.features.is_declared() {
        let declared = serde_json::to_string(&c.features).expect("a declaration serializes");
        settings.insert("model.features".into(), declared);
    }
    settings
}

fn fingerprint_of(settings: &Settings) -> u64 {
    let mut h = blake3::Hasher::new();
    for (name, value) in settings {
        h.update(format!("{name}={value}\n").as_bytes());
    }
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
}

/// The settings that differ between `ours` and `theirs`, one line each:
/// `name: ours here, theirs <where>` (`where`: "in the fleet", "in the
/// checkpoint"; a setting only one side has shows as `(none)` on the other).
pub fn settings_diff(ours: &Settings, theirs: &Settings, theirs_at: &str) -> Vec<String> {
    let none = String::from("(none)");
    let names: std::collections::BTreeSet<&String> = ours.keys().chain(theirs.keys()).collect();
    names
        .into_iter()
        .filter_map(|name| {
            let (a, b) = (ours.get(name).unwrap_or(&none), theirs.get(name).unwrap_or(&none));
            (a != b).then(|| format!("{name}: {a} here, {b} {theirs_at}"))
        })
        .collect()
}

impl Model {
    /// The model of `config`. Only `torchscript` can fail (the module file);
    /// the built-in kinds cannot.
    pub fn new(config: &ModelConfig) -> Result<Model, ScriptError> {
        let mut params = Vec::new();
        let mut add = |p: ParamSpec| {
            params.push(p);
            params.len() - 1
        };
        let arch = match config.kind {
            ModelKind::Logistic => Arch::Logistic(linear_params(config, &mut add)),
            ModelKind::Mlp => Arch::Mlp(mlp_params(config, "mlp", config.dense_dim, &mut add)),
            ModelKind::WideDeep => {
                let linear = linear_params(config, &mut add);
                let emb = (config.sparse_fields.iter())
                    .map(|f| {
                        add(ParamSpec::new(format!("emb.{f}"), config.buckets as usize, config.embedding_dim, true))
                    })
                    .collect();
                let input = config.dense_dim + config.sparse_fields.len() * config.embedding_dim;
                let mlp = mlp_params(config, "deep", input, &mut add);
                Arch::WideDeep { linear, emb, mlp }
            }
            ModelKind::TorchScript => {
                let (script, specs) = script::Script::load(config)?;
                for p in specs {
                    add(p);
                }
                Arch::Script(Arc::new(script))
            }
        };
        let script = match &arch {
            Arch::Script(script) => Some(script.bytes.as_slice()),
            _ => None,
        };
        let settings = settings_of(config, &params, script);
        let fingerprint = fingerprint_of(&settings);
        let featurizer = Featurizer::new(config);
        Ok(Model { featurizer, config: config.clone(), params, arch, settings, fingerprint, layout: Layout::WHOLE })
    }

    /// The same model as a replica of shard `layout` holds it.
    pub fn with_layout(self, layout: Layout) -> Model {
        Model { layout, ..self }
    }

    /// The rows of the sparse tables this replica holds.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }
    pub fn params(&self) -> &[ParamSpec] {
        &self.params
    }
    pub fn featurizer(&self) -> &Featurizer {
        &self.featurizer
    }
    /// The settings the fingerprint is made of.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Identifies the structure: equal fingerprints, interchangeable weights.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The model's output for one instance: a probability under log-loss, the
    /// raw value under squared error.
    /// (TorchScript: NaN if libtorch fails; serving uses [`Model::predict_batch`].)
    pub fn predict<B: AsRef<[f32]>>(&self, w: &[B], f: &Features) -> f32 {
        match &self.arch {
            Arch::Script(s) => self.link(s.outputs(None, w, &[f]).map_or(f32::NAN, |v| v[0])),
            _ => self.predict_on(w, f),
        }
    }

    /// The same, over any view of the weights (a shard's own rows with the
    /// rows it gathered from the others); not for TorchScript modules,
    /// which read whole weights.
    pub fn predict_on<W: Weights + ?Sized>(&self, w: &W, f: &Features) -> f32 {
        let out = match &self.arch {
            Arch::Logistic(l) => logistic::forward(l, w, f),
            Arch::Mlp(m) => mlp::forward(m, w, &f.dense),
            Arch::WideDeep { linear, emb, mlp } => {
                wide_deep::forward(linear, emb, mlp, self.config.embedding_dim, w, f)
            }
            Arch::Script(_) => f32::NAN,
        };
        self.link(out)
    }

    /// Predictions for a batch, under the weights of served `version`
    /// (`None`: weights that no version names). TorchScript models run the
    /// batch as one `forward`, in an instance that already holds `version`'s
    /// weights where there is one; the others answer per instance.
    pub fn predict_batch<B: AsRef<[f32]>>(
        &self,
        version: Option<i64>,
        w: &[B],
        batch: &[&Features],
    ) -> Result<Vec<f32>, GradientError> {
        match &self.arch {
            Arch::Script(s) => Ok(s.outputs(version, w, batch)?.into_iter().map(|o| self.link(o)).collect()),
            _ => Ok(batch.iter().map(|f| self.predict(w, f)).collect()),
        }
    }

    /// The output as served: a probability under log-loss, else as it is.
    fn link(&self, out: f32) -> f32 {
        match self.config.loss {
            Loss::Logloss => 1.0 / (1.0 + (-out).exp()),
            Loss::Squared => out,
        }
    }

    /// Progressive loss and gradient of a batch against weights `w`.
    pub fn gradient<B: AsRef<[f32]>>(&self, w: &[B], batch: &[Example]) -> Result<Gradient, GradientError> {
        self.gradient_at(None, w, batch)
    }

    /// The same, where `version` names `w` (a served version: equal versions,
    /// equal weights); a TorchScript model then copies `w` into its module
    /// only when the version changes. `None`: `w` is copied in each time.
    pub fn gradient_at<B: AsRef<[f32]>>(
        &self,
        version: Option<i64>,
        w: &[B],
        batch: &[Example],
    ) -> Result<Gradient, GradientError> {
        match &self.arch {
            Arch::Script(script) => script.gradient(version, w, batch),
            _ => graph::gradient(self, w, batch),
        }
    }

    /// The sparse field whose ids index the rows of parameter `param`
    /// (`emb.f1` and `wide.f1` are indexed by field `f1`); `None` for a
    /// dense parameter.
    pub fn sparse_field(&self, param: usize) -> Option<usize> {
        let p = self.params.get(param)?;
        let suffix = p.name.split_once('.').map(|(_, f)| f)?;
        p.sparse.then(|| self.featurizer.fields().iter().position(|f| f == suffix)).flatten()
    }

    /// Progressive loss and gradient of a batch against a view of weights
    /// (see [`Weights`]); not for TorchScript models, whose module takes
    /// whole weights.
    pub fn gradient_on<W: Weights + ?Sized>(&self, w: &W, batch: &[Example]) -> Result<Gradient, GradientError> {
        match &self.arch {
            Arch::Script(_) => Err(GradientError::WholeWeightsOnly),
            _ => graph::gradient(self, w, batch),
        }
    }

    /// A stable digest of all weights, hex: equal digests, equal weights.
    pub fn digest<B: AsRef<[f32]>>(&self, w: &[B]) -> String {
        let mut h = blake3::Hasher::new();
        for (p, buf) in self.params.iter().zip(w) {
            h.update(p.name.as_bytes());
            h.update(&(p.len() as u64).to_le_bytes());
            h.update(f32_bytes(buf.as_ref()));
        }
        h.finalize().to_hex().to_string()
    }
}

/// The bytes of an f32 slice in memory order (little-endian on every target
/// tributary builds for; `lib.rs` refuses big-endian targets).
pub fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and every byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

fn linear_params(c: &ModelConfig, add: &mut impl FnMut(ParamSpec) -> usize) -> LinearIdx {
    LinearIdx {
        bias: add(ParamSpec::new("linear.bias", 1, 1, false)),
        dense: add(ParamSpec::new("linear.dense", 1, c.dense_dim, false)),
        wide: (c.sparse_fields.iter())
            .map(|f| add(ParamSpec::new(format!("wide.{f}"), c.buckets as usize, 1, true)))
            .collect(),
    }
}

fn mlp_params(c: &ModelConfig, prefix: &str, input: usize, add: &mut impl FnMut(ParamSpec) -> usize) -> MlpIdx {
    let mut layers = Vec::new();
    let mut fan_in = input;
    for (i, &out) in c.hidden.iter().chain(std::iter::once(&1)).enumerate() {
        let w = add(ParamSpec::new(format!("{prefix}{i}.w"), out, fan_in, false));
        let b = add(ParamSpec::new(format!("{prefix}{i}.b"), 1, out, false));
        layers.push((w, b));
        fan_in = out;
    }
    MlpIdx { layers }
}

/// The linear part: bias + dense weights . dense + the wide weight of every
/// bucket in every bag.
fn linear_forward<W: Weights + ?Sized>(l: &LinearIdx, w: &W, f: &Features) -> f32 {
    let mut out = w.param(l.bias)[0] + dot(w.param(l.dense), &f.dense);
    for (&table, ids) in l.wide.iter().zip(&f.ids) {
        out += ids.iter().map(|&id| w.row(table, id, 1)[0]).sum::<f32>();
    }
    out
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::init::SplitMix64;
    use super::*;

    fn batch(model: &Model, n: usize) -> Vec<Example> {
        let f = model.featurizer();
        (0..n)
            .map(|i| {
                let json = format!(
                    r#"{{"dense":[{},{},0.5],"sparse":{{"a":"x{}","b":["y{}","z"]}},"label":{}}}"#,
                    i as f32 / n as f32,
                    (i % 7) as f32 / 7.0,
                    i % 5,
                    i % 3,
                    u8::from(i % 7 < 3) // learnable from dense[1]
                );
                f.event(json.as_bytes()).unwrap()
            })
            .collect()
    }

    #[test]
    fn same_seed_same_weights_other_seed_other_weights() {
        let a = Model::new(&ModelConfig::small(ModelKind::WideDeep)).expect("a built-in model");
        let b = Model::new(&ModelConfig::small(ModelKind::WideDeep)).expect("a built-in model");
        assert_eq!(a.digest(&a.init_weights()), b.digest(&b.init_weights()));
        let mut c = ModelConfig::small(ModelKind::WideDeep);
        c.seed += 1;
        let c = Model::new(&c).expect("a built-in model");
        assert_ne!(a.digest(&a.init_weights()), c.digest(&c.init_weights()));
    }

    #[test]
    fn forward_matches_libtorch() {
        for kind in [ModelKind::Logistic, ModelKind::Mlp, ModelKind::WideDeep] {
            let model = Model::new(&ModelConfig::small(kind)).expect("a built-in model");
            let mut w = model.init_weights();
            // Non-zero linear weights, so every term of the forward pass counts.
            for (p, buf) in model.params().iter().zip(w.iter_mut()) {
                if !p.name.starts_with("emb.") && !p.name.ends_with(".w") {
                    let mut rng = SplitMix64(7 + p.len() as u64);
                    buf.iter_mut().for_each(|v| *v = 0.3 * rng.uniform());
                }
            }
            let examples = batch(&model, 16);
            let logits = graph::logits(&model, w.as_slice(), &examples).unwrap();
            for (e, want) in examples.iter().zip(logits) {
                let got = model.predict(&w, &e.features);
                let want = 1.0 / (1.0 + (-want).exp());
                assert!((got - want).abs() < 1e-5, "{kind:?}: rust {got} vs libtorch {want}");
            }
        }
    }

    #[test]
    fn gradient_descent_lowers_the_loss() {
        for kind in [ModelKind::Logistic, ModelKind::Mlp, ModelKind::WideDeep] {
            let model = Model::new(&ModelConfig::small(kind)).expect("a built-in model");
            let mut w = model.init_weights();
            let examples = batch(&model, 32);
            let step = 0.5 / examples.len() as f32; // the gradient is of the summed loss
            let first = model.gradient(&w, &examples).unwrap();
            let mut last = first.clone();
            for _ in 0..50 {
                last = model.gradient(&w, &examples).unwrap();
                for t in &last.tensors {
                    let buf = &mut w[t.param as usize];
                    let cols = model.params()[t.param as usize].cols;
                    match &t.values {
                        GradValues::Dense(g) => buf.iter_mut().zip(g).for_each(|(x, g)| *x -= step * g),
                        GradValues::Rows { ids, values } => {
                            for (r, id) in ids.iter().enumerate() {
                                for c in 0..cols {
                                    buf[*id as usize * cols + c] -= step * values[r * cols + c];
                                }
                            }
                        }
                    }
                }
            }
            assert!(last.loss_sum < first.loss_sum * 0.9, "{kind:?}: {} -> {}", first.loss_sum, last.loss_sum);
        }
    }
}
