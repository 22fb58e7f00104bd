//! Criterion benchmarks of the model's hot paths, each next to its baseline:
//! predict per kind, a training step per kind, a replica's whole work per
//! batch, the applier alone per record, a trainer's gradient over its
//! records in flight against one at the served snapshot, a
//! serving-snapshot publish left-right against a full copy, and decoding a
//! training event from Avro against JSON.
//! `cargo bench --bench model` runs them. The `torchscript` cases export
//! `examples/torchscript/export.py`'s model (2.1 M parameters; sparse
//! embedding gradients, and dense ones for comparison) with the
//! project virtualenv's PyTorch, and are skipped where it cannot.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use tributary::config::{Config, ModelConfig, ModelKind};
use tributary::event::avro::AvroEvents;
use tributary::event::{EventCodec, Example};
use tributary::model::{Gradient, Model};
use tributary::snapshot::Publisher;
use tributary::state::optim::NoTouch;
use tributary::state::ReplicaState;
use tributary::synthetic::Synthetic;
use tributary::train::overlay::Overlay;
use tributary::update_log::record::{EventRange, GradientRecord, Record, RecordMeta};

fn model(kind: ModelKind) -> Model {
    let mut c = Config::default().model;
    c.kind = kind;
    Model::new(&c).expect("a built-in model")
}

fn examples(model: &Model, n: usize) -> Vec<Example> {
    let mut s = Synthetic::new(model.config(), 3);
    (0..n).map(|_| model.featurizer().event(s.event(0).as_bytes()).unwrap()).collect()
}

fn predict(c: &mut Criterion) {
    tributary::replica::init_libtorch();
    for kind in [ModelKind::Logistic, ModelKind::Mlp, ModelKind::WideDeep] {
        let m = model(kind);
        let w = m.init_weights();
        let ex = examples(&m, 64);
        c.bench_function(&format!("predict_1/{kind:?}"), |b| b.iter(|| m.predict(&w, black_box(&ex[0].features))));
        c.bench_function(&format!("predict_64/{kind:?}"), |b| {
            b.iter(|| ex.iter().map(|e| m.predict(&w, &e.features)).sum::<f32>())
        });
    }
}

fn train_step(c: &mut Criterion) {
    tributary::replica::init_libtorch();
    for kind in [ModelKind::Logistic, ModelKind::Mlp, ModelKind::WideDeep] {
        let m = model(kind);
        let w = m.init_weights();
        let ex = examples(&m, 256);
        c.bench_function(&format!("gradient_256/{kind:?}"), |b| b.iter(|| m.gradient(&w, black_box(&ex)).unwrap()));
    }
}

/// The example TorchScript model with its default sizes and `args`,
/// exported into a temporary directory; `None` without the virtualenv's python.
fn torchscript_model(args: &[&str]) -> Option<(tempfile::TempDir, Model)> {
    let dir = tempfile::tempdir().ok()?;
    let out = dir.path().join("model.pt");
    if let Err(e) = tributary_testkit::export_torchscript(&out, args) {
        eprintln!("torchscript benches skipped: {e:#}");
        return None;
    }
    let mut c = Config::default().model;
    c.kind = ModelKind::TorchScript;
    c.torchscript_path = out;
    c.buckets = 65536; // export.py's default
    Some((dir, Model::new(&c).ok()?))
}

/// The TorchScript model's training step and a 64-instance prediction, one
/// forward each; `wide_deep`'s same cases above are the baseline.
fn torchscript(c: &mut Criterion) {
    tributary::replica::init_libtorch();
    if let Some((_dir, m)) = torchscript_model(&["--dense-tables"]) {
        let w = m.init_weights();
        let ex = examples(&m, 256);
        c.bench_function("gradient_256/TorchScript dense tables (same version)", |b| {
            b.iter(|| m.gradient_at(Some(1), &w, black_box(&ex)).unwrap())
        });
    }
    let Some((_dir, m)) = torchscript_model(&[]) else { return };
    let w = m.init_weights();
    let ex = examples(&m, 256);
    c.bench_function("gradient_256/TorchScript (same version)", |b| {
        b.iter(|| m.gradient_at(Some(1), &w, black_box(&ex)).unwrap())
    });
    c.bench_function("gradient_256/TorchScript (weights copied in)", |b| {
        b.iter(|| m.gradient(&w, black_box(&ex)).unwrap())
    });
    let features: Vec<_> = ex[..64].iter().map(|e| &e.features).collect();
    c.bench_function("predict_64/TorchScript (same version)", |b| {
        b.iter(|| m.predict_batch(Some(1), &w, black_box(&features)).unwrap())
    });
    let mut version = 0;
    c.bench_function("predict_64/TorchScript (new version each call)", |b| {
        b.iter(|| {
            version += 1;
            m.predict_batch(Some(version), &w, black_box(&features)).unwrap()
        })
    });
}

/// One batch's gradient record of `events` events from partition 0 at
/// `from`, encoded.
fn record_bytes(m: &Model, from: i64, events: u32, gradient: Gradient) -> Vec<u8> {
    let meta = RecordMeta {
        fingerprint: m.fingerprint(),
        ranges: vec![EventRange { partition: 0, from, to: from + i64::from(events) }],
        base: 0,
        examples: events,
        skipped: 0,
        oldest_ts: 0,
        producer: "bench".into(),
    };
    Record::Gradient(GradientRecord::new(meta, gradient)).encode()
}

/// Everything a replica does per batch of 256 events, on one core and with
/// no broker: parse and hash the JSON events, compute the gradient, encode
/// the record, decode it and apply it. 256 over its time is the learning
/// rate tributary's own work allows; the broker's round trips come on top.
fn pipeline(c: &mut Criterion) {
    tributary::replica::init_libtorch();
    for kind in [ModelKind::Logistic, ModelKind::WideDeep] {
        let m = model(kind);
        let mut synthetic = Synthetic::new(m.config(), 5);
        let lines: Vec<String> = (0..256).map(|_| synthetic.event(1)).collect();
        let mut state = ReplicaState::initial(&m);
        let mut offset = 0;
        c.bench_function(&format!("pipeline_256/{kind:?}"), |b| {
            b.iter(|| {
                let batch: Vec<Example> = lines.iter().map(|l| m.featurizer().event(l.as_bytes()).unwrap()).collect();
                let gradient = m.gradient(&state.weights, &batch).unwrap();
                let bytes = record_bytes(&m, state.watermarks.get(&0).copied().unwrap_or(0), 256, gradient);
                state.apply(&m, offset, &bytes, &mut NoTouch);
                offset += 1;
            })
        });
    }
}

/// The applier alone, per record of 1024 events (the default batch) with
/// each kind's default optimizer: decode, the apply rule, the optimizer
/// step and a left-right publish. Every replica applies every record, so
/// 1024 over this time is the fleet's learning ceiling; over the trainer's
/// own time per batch it is how many trainers one applier absorbs.
fn applier(c: &mut Criterion) {
    tributary::replica::init_libtorch();
    for kind in [ModelKind::Logistic, ModelKind::WideDeep] {
        let m = Arc::new(model(kind));
        let gradient = ctr_gradient_1024(&m);
        bench_applier(c, &format!("applier_1024/{kind:?}"), &m, &gradient, true);
        // The applier's stages alone, each a part of the whole above:
        // decoding, then decoding and the step with nothing to publish.
        let bytes = record_bytes(&m, 0, 1024, gradient.clone());
        c.bench_function(&format!("applier_1024_decode/{kind:?}"), |b| b.iter(|| Record::decode(black_box(&bytes))));
        bench_applier(c, &format!("applier_1024_unpublished/{kind:?}"), &m, &gradient, false);
    }
}

/// The gradient of 1024 events of the load report's click-through stream
/// (most values rare, so a record touches about as many rows per table as
/// it has events) at `m`'s initial weights.
fn ctr_gradient_1024(m: &Model) -> Gradient {
    let mut ctr = tributary::synthetic::CtrStream::new(m.config(), 7, u64::MAX);
    let ex: Vec<Example> =
        (0..1024).map(|_| m.featurizer().event(ctr.next_event(Some(1)).json.as_bytes()).unwrap()).collect();
    m.gradient(&ReplicaState::initial(m).weights, &ex).unwrap()
}

/// Records of `gradient` over 1024 events applied to a fresh state of `m`,
/// each continuing the one before (record k covers [1024 k, 1024 (k + 1))),
/// with a left-right publish after each when `publish`.
fn bench_applier(c: &mut Criterion, name: &str, m: &Arc<Model>, gradient: &Gradient, publish: bool) {
    let mut state = ReplicaState::initial(m);
    let mut publisher = Publisher::new(m.clone(), &state, false);
    let next_from = std::cell::Cell::new(0i64);
    let next_record = || record_bytes(m, next_from.replace(next_from.get() + 1024), 1024, gradient.clone());
    let mut offset = 0;
    c.bench_function(name, |b| {
        b.iter_batched(
            next_record,
            |bytes| {
                match publish {
                    true => {
                        state.apply(m, offset, &bytes, &mut publisher);
                        publisher.publish(&state);
                    }
                    false => {
                        state.apply(m, offset, &bytes, &mut NoTouch);
                    }
                }
                offset += 1;
            },
            BatchSize::SmallInput,
        )
    });
    assert_eq!(state.records_rejected, 0, "every record continued the one before");
}

/// The applier of one shard of S, per record of 1024 events (as
/// `applier_1024`, whose S = 1 it is): every replica decodes the whole
/// record and steps the dense part, and only its own rows of the sparse
/// tables, so a shard's applier is faster, and the fleet's learning
/// ceiling grows with S as far as the rows are the record's cost.
fn applier_sharded(c: &mut Criterion) {
    tributary::replica::init_libtorch();
    for kind in [ModelKind::Logistic, ModelKind::WideDeep] {
        let whole = model(kind);
        let gradient = ctr_gradient_1024(&whole);
        for count in [1, 2, 4] {
            let m = Arc::new(whole.clone().with_layout(tributary::model::Layout::new(count, 0).unwrap()));
            bench_applier(c, &format!("applier_sharded_1024/{kind:?}/S={count}"), &m, &gradient, true);
        }
    }
}

/// A trainer's next gradient of 1024 events while 3 of its records are in
/// flight: the served snapshot with those records stepped on (copies of
/// the rows the batch reads), against the gradient at the snapshot alone
/// (what a trainer that waits for its records computes).
fn overlay(c: &mut Criterion) {
    tributary::replica::init_libtorch();
    for kind in [ModelKind::Logistic, ModelKind::WideDeep] {
        let m = Arc::new(model(kind));
        let mut ctr = tributary::synthetic::CtrStream::new(m.config(), 11, u64::MAX);
        let mut batch = || -> Vec<Example> {
            (0..1024).map(|_| m.featurizer().event(ctr.next_event(Some(1)).json.as_bytes()).unwrap()).collect()
        };
        let state = ReplicaState::initial(&m);
        let snapshot = Publisher::new(m.clone(), &state, true).serving().load_full();
        let mut in_flight = Overlay::default();
        for k in 0..3 {
            let gradient = m.gradient(&state.weights, &batch()).unwrap();
            in_flight.push(vec![EventRange { partition: 0, from: 1024 * k, to: 1024 * (k + 1) }], gradient.tensors);
        }
        let next = batch();
        c.bench_function(&format!("next_gradient_1024/{kind:?} at the snapshot"), |b| {
            b.iter(|| m.gradient(&snapshot.weights, black_box(&next)).unwrap())
        });
        c.bench_function(&format!("next_gradient_1024/{kind:?} over 3 in flight"), |b| {
            b.iter(|| {
                let overlaid = in_flight.over(&m, &snapshot, None, black_box(&next)).expect("records in flight");
                m.gradient_on(&overlaid, &next).unwrap()
            })
        });
    }
}

/// Apply one batch's record, then publish: left-right copies the touched
/// rows, the baseline clones the whole model (64 MB for wide_deep).
fn publish(c: &mut Criterion) {
    tributary::replica::init_libtorch();
    let m = Arc::new(model(ModelKind::WideDeep));
    let ex = examples(&m, 256);
    let mut state = ReplicaState::initial(&m);
    let gradient = m.gradient(&state.weights, &ex).unwrap();
    let mut publisher = Publisher::new(m.clone(), &state, false);
    let mut offset = 0;
    let record = |from: i64| record_bytes(&m, from, 256, gradient.clone());
    c.bench_function("publish_after_batch/left_right", |b| {
        b.iter(|| {
            let bytes = record(state.watermarks.get(&0).copied().unwrap_or(0));
            state.apply(&m, offset, &bytes, &mut publisher);
            offset += 1;
            publisher.publish(&state)
        })
    });
    c.bench_function("publish_after_batch/full_copy", |b| {
        b.iter_batched(
            || (),
            |()| {
                let bytes = record(state.watermarks.get(&0).copied().unwrap_or(0));
                state.apply(&m, offset, &bytes, &mut NoTouch);
                offset += 1;
                black_box(state.weights.clone())
            },
            BatchSize::SmallInput,
        )
    });
}

/// 256 events of the default model, decoded as the trainer does: from
/// JSON, and from Avro in the Confluent wire format (config/event.avsc).
fn event_decode(c: &mut Criterion) {
    let m = model(ModelKind::WideDeep);
    let mut s = Synthetic::new(m.config(), 3);
    let json: Vec<String> = (0..256).map(|_| s.event(0)).collect();
    let schema = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/event.avsc")).unwrap();
    let avro = AvroEvents::new(&schema, Some(1), None).unwrap();
    let framed: Vec<Vec<u8>> =
        json.iter().map(|line| avro.encode(serde_json::from_str(line).unwrap()).unwrap()).collect();
    let codecs = [
        ("json", EventCodec::Json, json.iter().map(|l| l.as_bytes().to_vec()).collect()),
        ("avro", EventCodec::Avro(Box::new(avro)), framed),
    ];
    for (name, codec, events) in &codecs {
        c.bench_function(&format!("event_decode_256/{name}"), |b| {
            b.iter(|| {
                for e in events {
                    black_box(codec.example(m.featurizer(), black_box(e)).unwrap());
                }
            })
        });
    }
}

/// 256 events as a team writes them (nested, with fields no feature reads)
/// through a declaration of 10 features (`[model.features]`), against the
/// same events reshaped into the fixed schema, decoded from JSON.
fn declared_decode(c: &mut Criterion) {
    const DECLARATION: &str = r#"
        label = { path = "clicked", positive = [true] }
        time = { path = "ts", unit = "ms" }
        dense = [{ name = "price", path = "price" }, { name = "age", path = "user.age", default = 30.0 },
                 { name = "score", path = "ad.score" }, { name = "rank", path = "rank" }]
        sparse = [{ name = "user", path = "user.id" }, { name = "country", path = "user.country" },
                  { name = "ad", path = "ad.id" }, { name = "category", path = "ad.category" },
                  { name = "hour", path = "hour", boundaries = [6, 12, 18] },
                  { name = "user_x_ad", cross = ["user", "ad"] }]
    "#;
    let mut declared = ModelConfig::small(ModelKind::Logistic);
    declared.features = toml::from_str(DECLARATION).unwrap();
    (declared.dense_dim, declared.sparse_fields) = (4, declared.features.sparse_names());
    let fixed = ModelConfig { features: Default::default(), ..declared.clone() };
    let (declared, fixed) = (Model::new(&declared).unwrap(), Model::new(&fixed).unwrap());
    let events: Vec<(String, String)> = (0..256)
        .map(|i| {
            let (user, ad, hour) = (format!("u{}", i * 7 % 500), format!("a{}", i % 40), i % 24);
            let bucket = [6, 12, 18].iter().filter(|&&b| b <= hour).count();
            let domain = serde_json::json!({
                "user": {"id": user, "age": 20 + i % 40, "country": "de", "segment": "s1", "signup": "2024-01-01"},
                "ad": {"id": ad, "category": "shoes", "score": 0.5, "campaign": "c9", "creative": {"w": 300, "h": 250}},
                "price": 12.5, "rank": i % 10, "hour": hour, "clicked": i % 3 == 0, "ts": 1_764_000_000_000i64 + i,
                "session": format!("s{i}"), "page": "/home", "referrer": "search",
            });
            let reshaped = serde_json::json!({
                "dense": [12.5, 20 + i % 40, 0.5, i % 10],
                "sparse": {"user": user, "country": "de", "ad": ad, "category": "shoes",
                           "hour": format!("b{bucket}"), "user_x_ad": format!("{user}\u{1f}{ad}")},
                "label": u8::from(i % 3 == 0), "ts": 1_764_000_000_000i64 + i,
            });
            (domain.to_string(), reshaped.to_string())
        })
        .collect();
    let fixed_schema = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/event.avsc")).unwrap();
    let avro = |schema: &str, model: &Model| {
        EventCodec::Avro(Box::new(AvroEvents::new(schema, None, model.featurizer().declared()).unwrap()))
    };
    let (declared_avro, fixed_avro) = (avro(DOMAIN_SCHEMA, &declared), avro(&fixed_schema, &fixed));
    let encoded = |codec: &EventCodec, e: &str| codec.encode(e.as_bytes()).unwrap().into_owned();
    let runs = [("json", &EventCodec::Json, &EventCodec::Json), ("avro", &fixed_avro, &declared_avro)];
    for (format, fixed_codec, declared_codec) in runs {
        let fixed_events: Vec<Vec<u8>> = events.iter().map(|(_, e)| encoded(fixed_codec, e)).collect();
        let declared_events: Vec<Vec<u8>> = events.iter().map(|(e, _)| encoded(declared_codec, e)).collect();
        for (name, model, codec, events) in [
            ("fixed schema", &fixed, fixed_codec, &fixed_events),
            ("declared, 10 features", &declared, declared_codec, &declared_events),
        ] {
            c.bench_function(&format!("declared_decode_256/{format}/{name}"), |b| {
                b.iter(|| events.iter().for_each(|e| drop(black_box(codec.example(model.featurizer(), e).unwrap()))))
            });
        }
    }
}

/// The Avro writer schema of the team events `declared_decode` reads.
const DOMAIN_SCHEMA: &str = r#"{"type": "record", "name": "Click", "fields": [
    {"name": "user", "type": {"type": "record", "name": "User", "fields": [
        {"name": "id", "type": "string"}, {"name": "age", "type": "int"}, {"name": "country", "type": "string"},
        {"name": "segment", "type": "string"}, {"name": "signup", "type": "string"}]}},
    {"name": "ad", "type": {"type": "record", "name": "Ad", "fields": [
        {"name": "id", "type": "string"}, {"name": "category", "type": "string"}, {"name": "score", "type": "double"},
        {"name": "campaign", "type": "string"},
        {"name": "creative", "type": {"type": "record", "name": "Creative", "fields": [
            {"name": "w", "type": "int"}, {"name": "h", "type": "int"}]}}]}},
    {"name": "price", "type": "double"}, {"name": "rank", "type": "int"}, {"name": "hour", "type": "int"},
    {"name": "clicked", "type": "boolean"}, {"name": "ts", "type": "long"},
    {"name": "session", "type": "string"}, {"name": "page", "type": "string"}, {"name": "referrer", "type": "string"}
]}"#;

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(3));
    targets = predict, train_step, torchscript, pipeline, applier, applier_sharded, overlay, publish, event_decode, declared_decode
}
criterion_main!(benches);
