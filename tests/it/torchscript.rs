//! `model.kind = "torchscript"`: modules exported by the project
//! virtualenv's PyTorch (`examples/torchscript/export.py`), loaded, trained
//! through the model API, then learned from a stream by two replicas that
//! must end bit-identical.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tributary::config::{Config, ModelConfig, ModelKind};
use tributary::model::{GradValues, Model};

use crate::helpers::{constant_logloss, procs, Cluster};

/// Runs the example exporter with `args` into `dir`; the module's path.
fn export(dir: &Path, name: &str, args: &[&str]) -> PathBuf {
    let out = dir.join(name);
    procs::export_torchscript(&out, args).unwrap_or_else(|e| panic!("{e:#}"));
    out
}

/// Scripts and saves class `M` of `source` (torch.jit.script reads the
/// source from a file, not from `python -c`).
fn python_module(dir: &Path, name: &str, source: &str) -> PathBuf {
    let out = dir.join(name);
    let code = format!("import torch\n{source}\ntorch.jit.script(M()).save({:?})\n", out.to_str().unwrap());
    let file = dir.join(format!("{name}.py"));
    std::fs::write(&file, code).unwrap();
    let run = Command::new(procs::venv_python().unwrap()).arg(&file).output().unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    out
}

fn config(path: &Path) -> ModelConfig {
    let mut m = Config::default().model;
    m.kind = ModelKind::TorchScript;
    m.torchscript_path = path.to_path_buf();
    m.dense_dim = 3;
    m.sparse_fields = vec!["a".into(), "b".into()];
    m.buckets = 64;
    m
}

const SMALL: [&str; 10] = ["--dense-dim", "3", "--fields", "2", "--buckets", "64", "--dim", "4", "--hidden", "8"];

#[test]
fn an_exported_module_loads_predicts_and_learns() {
    let dir = tempfile::tempdir().unwrap();
    let path = export(dir.path(), "small.pt", &SMALL);
    let model = Model::new(&config(&path)).unwrap();
    let names: Vec<&str> = model.params().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "script.tables.0.weight",
            "script.tables.1.weight",
            "script.mlp.0.weight",
            "script.mlp.0.bias",
            "script.mlp.2.weight",
            "script.mlp.2.bias"
        ]
    );
    assert_eq!((model.params()[0].rows, model.params()[0].cols), (64, 4));
    // Same file, same fingerprint and weights; another module, another fingerprint.
    let again = Model::new(&config(&path)).unwrap();
    assert_eq!(model.fingerprint(), again.fingerprint());
    assert_eq!(model.digest(&model.init_weights()), again.digest(&again.init_weights()));
    let other = export(dir.path(), "other.pt", &[&SMALL[..], &["--seed", "7"]].concat());
    assert_ne!(Model::new(&config(&other)).unwrap().fingerprint(), model.fingerprint());

    let f = model.featurizer();
    let batch: Vec<_> = (0..64)
        .map(|i| {
            let json = format!(
                r#"{{"dense":[{},0.5,1],"sparse":{{"a":"x{}","b":["y{}","z"]}},"label":{}}}"#,
                (i % 7) as f32 / 7.0,
                i % 5,
                i % 3,
                u8::from(i % 7 < 3)
            );
            f.event(json.as_bytes()).unwrap()
        })
        .collect();
    let mut w = model.init_weights();
    // One batch forward equals one forward per instance, at any version.
    let features: Vec<_> = batch.iter().map(|e| &e.features).collect();
    let together = model.predict_batch(Some(1), &w, &features).unwrap();
    for (e, p) in batch.iter().zip(&together) {
        let alone = model.predict(&w, &e.features);
        assert!((alone - p).abs() < 1e-6 && (0.0..=1.0).contains(p), "{alone} vs {p}");
    }
    let first = model.gradient(&w, &batch).unwrap();
    // Embedding tables travel as the batch's rows: 5 values of "a", 4 of "b" (3 + "z").
    let rows: Vec<Option<usize>> = first
        .tensors
        .iter()
        .map(|t| match &t.values {
            GradValues::Rows { ids, .. } => Some(ids.len()),
            GradValues::Dense(_) => None,
        })
        .collect();
    assert_eq!(rows, [Some(5), Some(4), None, None, None, None]);
    // Dense embedding gradients (Embedding(sparse=False)) travel the same:
    // the touched rows, found by scanning.
    let dense = export(dir.path(), "dense.pt", &[&SMALL[..], &["--dense-tables"]].concat());
    let dense = Model::new(&config(&dense)).unwrap();
    assert_eq!(dense.init_weights(), w, "same seed, same weights");
    let from_dense = dense.gradient(&w, &batch).unwrap();
    assert_eq!(from_dense.tensors.len(), first.tensors.len());
    for (a, b) in from_dense.tensors.iter().zip(&first.tensors) {
        match (&a.values, &b.values) {
            (GradValues::Rows { ids: ia, values: va }, GradValues::Rows { ids: ib, values: vb }) => {
                assert_eq!(ia, ib);
                va.iter().zip(vb).for_each(|(x, y)| assert!((x - y).abs() < 1e-6, "{x} vs {y}"));
            }
            (GradValues::Dense(va), GradValues::Dense(vb)) => {
                va.iter().zip(vb).for_each(|(x, y)| assert!((x - y).abs() < 1e-6))
            }
            _ => panic!("param {}: sparse and dense modules travel differently", a.param),
        }
    }
    assert!((from_dense.loss_sum - first.loss_sum).abs() < 1e-6);
    let mut last = first.clone();
    let step = 0.5 / batch.len() as f32; // the gradient is of the summed loss
    for _ in 0..100 {
        last = model.gradient(&w, &batch).unwrap();
        for t in &last.tensors {
            let cols = model.params()[t.param as usize].cols;
            let buf = &mut w[t.param as usize];
            match &t.values {
                GradValues::Dense(g) => buf.iter_mut().zip(g).for_each(|(x, g)| *x -= step * g),
                GradValues::Rows { ids, values } => {
                    for (r, &id) in ids.iter().enumerate() {
                        let row = &mut buf[id as usize * cols..(id as usize + 1) * cols];
                        row.iter_mut().zip(&values[r * cols..(r + 1) * cols]).for_each(|(x, g)| *x -= step * g);
                    }
                }
            }
        }
    }
    assert!(last.loss_sum < first.loss_sum * 0.7, "{} -> {}", first.loss_sum, last.loss_sum);
    // A gradient at a named version uses the weights first copied in for it.
    let trained = model.gradient_at(Some(5), &w, &batch).unwrap();
    assert_eq!(model.gradient_at(Some(5), &model.init_weights(), &batch).unwrap(), trained, "version 5 is w");
    assert_eq!(
        model.gradient_at(Some(6), &model.init_weights(), &batch).unwrap(),
        model.gradient(&model.init_weights(), &batch).unwrap()
    );
    // The served version 1 still answers with its own weights, version 2 with the new ones.
    assert_eq!(model.predict_batch(Some(1), &model.init_weights(), &features).unwrap(), together);
    assert_ne!(model.predict_batch(Some(2), &w, &features).unwrap(), together);
}

#[test]
fn modules_that_do_not_fit_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let missing = Model::new(&config(&dir.path().join("nope.pt"))).unwrap_err().to_string();
    assert!(missing.contains("cannot read the TorchScript module"), "{missing}");
    let garbage = dir.path().join("garbage.pt");
    std::fs::write(&garbage, b"not a zip").unwrap();
    let err = Model::new(&config(&garbage)).unwrap_err().to_string();
    assert!(err.contains("is not a TorchScript module tributary can train"), "{err}");
    // Tables smaller than model.buckets: the probe with the last bucket fails.
    let small = export(
        dir.path(),
        "few-buckets.pt",
        &["--dense-dim", "3", "--fields", "2", "--buckets", "16", "--dim", "4", "--hidden", "8"],
    );
    let err = Model::new(&config(&small)).unwrap_err().to_string();
    assert!(err.contains("bucket 63") && err.contains("failed"), "{err}");
    let wrong_shape = python_module(
        dir.path(),
        "shape.pt",
        "class M(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n        self.w = torch.nn.Parameter(torch.ones(3, 2))\n    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:\n        return dense @ self.w\n",
    );
    let err = Model::new(&config(&wrong_shape)).unwrap_err().to_string();
    assert!(err.contains("one value per row"), "{err}");
    let no_params = python_module(
        dir.path(),
        "empty.pt",
        "class M(torch.nn.Module):\n    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:\n        return dense.sum(1)\n",
    );
    let err = Model::new(&config(&no_params)).unwrap_err().to_string();
    assert!(err.contains("no parameters"), "{err}");
}

#[test]
fn two_replicas_learn_a_stream_with_a_torchscript_module_and_agree() {
    let mut cluster = Cluster::new("torchscript", ModelKind::TorchScript);
    let path = export(
        cluster.dir.path(),
        "model.pt",
        &["--dense-dim", "8", "--fields", "4", "--buckets", "4096", "--dim", "8", "--hidden", "16"],
    );
    cluster.config.model.torchscript_path = path;
    // 4 000 events are 63 records: with the default 4 in flight per partition
    // nearly every gradient would be computed at the initial weights, and the
    // sum of those stale steps can overshoot. One in flight keeps this a test of the TorchScript path.
    cluster.config.train.max_in_flight = 1;
    let a = cluster.spawn("a");
    let b = cluster.spawn("b");
    a.wait_ready();
    b.wait_ready();
    let labels = cluster.produce(4000, 11);
    let info_a = a.wait_learned(4000, Duration::from_secs(120));
    let info_b = b.wait_learned(4000, Duration::from_secs(120));
    assert_eq!(info_a["kind"], "torchscript");
    // Compared at one version: a record may come between two answers.
    let now = crate::helpers::wait_at_one_version(&[&a, &b], Duration::from_secs(30));
    let (a_now, b_now) = (&now[0], &now[1]);
    assert_eq!(a_now["weights_digest"], b_now["weights_digest"], "replicas disagree: {a_now} {b_now}");
    let loss = info_b["progressive_logloss"].as_f64().unwrap();
    let baseline = constant_logloss(&labels);
    eprintln!("progressive loss {loss}, the constant predictor's {baseline}");
    assert!(loss < baseline, "progressive loss {loss} does not beat the constant predictor's {baseline}");
    let (status, v) = a.post("/v1/models/default:predict", None, r#"{"instances":[{"dense":[0,0,0,0,0,0,0,0]}]}"#);
    assert_eq!(status, 200, "{v}");
    assert!(v["predictions"][0].as_f64().is_some_and(|p| (0.0..=1.0).contains(&p)), "{v}");
}

#[test]
fn parameters_a_batch_does_not_reach_travel_no_gradient() {
    let dir = tempfile::tempdir().unwrap();
    let path = python_module(
        dir.path(),
        "unused.pt",
        "class M(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n        self.w = torch.nn.Parameter(torch.ones(3))\n        self.spare = torch.nn.Parameter(torch.zeros(64, 4))\n    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:\n        return dense @ self.w\n",
    );
    let model = Model::new(&config(&path)).unwrap();
    assert_eq!(model.params().len(), 2);
    let example = model.featurizer().event(br#"{"dense":[1,2,3],"label":1}"#).unwrap();
    let g = model.gradient(&model.init_weights(), &[example]).unwrap();
    let params: Vec<u32> = g.tensors.iter().map(|t| t.param).collect();
    assert_eq!(params, [0], "only w was reached");
}

#[test]
fn events_whose_gradient_fails_are_dead_lettered_and_the_rest_of_their_batch_is_learned() {
    let mut cluster = Cluster::new("ts-raises", ModelKind::TorchScript);
    // Raises on a dense value above 1000: a module's own check of its input.
    let path = python_module(
        cluster.dir.path(),
        "raises.pt",
        "class M(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n        self.w = torch.nn.Parameter(torch.zeros(8))\n    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:\n        if bool((dense > 1000.0).any()):\n            raise RuntimeError(\"dense value out of range\")\n        return dense @ self.w\n",
    );
    cluster.config.model.torchscript_path = path;
    let r = cluster.spawn("r0");
    r.wait_ready();
    cluster.produce(500, 5);
    r.wait_learned(500, Duration::from_secs(120));
    // Valid events (finite, the right shape) that the module refuses.
    let mut synthetic = tributary::synthetic::Synthetic::new(&cluster.config.model, 6);
    let refused: Vec<String> = (0..40)
        .map(|_| {
            let mut e: serde_json::Value = serde_json::from_str(&synthetic.event(1)).unwrap();
            e["dense"][0] = 5000.0.into();
            e.to_string()
        })
        .collect();
    cluster.produce_payloads(&refused);
    cluster.produce(500, 7);
    let info = crate::helpers::wait_for("every event taken by a record", Duration::from_secs(120), || {
        let info = r.info()?;
        (crate::helpers::watermark_sum(&info) == 1040).then_some(info)
    });
    let (learned, skipped) = (info["examples_learned"].as_u64().unwrap(), info["examples_skipped"].as_u64().unwrap());
    // A failing batch has each event's gradient computed alone: the refused
    // ones are skipped and dead-lettered, every other event of their
    // batches is learned; none is counted as learned (nor fed to the
    // divergence guard as a loss of 0).
    assert_eq!((learned, skipped), (1000, 40), "{info}");
    let refused = r.metrics().value("tributary_events_refused_total", "reason=\"gradient_failed\"");
    assert_eq!(refused, 40.0, "{info}");
    let letters = cluster.dead_letters(40);
    assert!(letters.iter().all(|(_, kind, _)| kind == "gradient_failed"), "{letters:?}");
    let log = std::fs::read_to_string(&r.log).unwrap();
    assert!(log.contains("dense value out of range"), "{}", r.log_tail(20));
    assert!(info["progressive_logloss"].as_f64().is_some_and(f64::is_finite), "{info}");
}
