//! Declared features end to end: a team's own nested JSON events, with
//! fields the model does not use, learned by a fleet through
//! `[model.features]`, and records predicted through the same declaration.
//! (That a declared event reads, and learns, as the same event reshaped by
//! hand into the fixed schema is `event::declared`'s unit test.)

use serde_json::{json, Value};
use tributary::config::ModelKind;

use crate::helpers::*;

const LEARN_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

const DECLARATION: &str = r#"
label = { path = "clicked", positive = [true], negative = [false] }
time = { path = "event_time", unit = "iso8601" }
dense = [{ name = "price", path = "price" }, { name = "age", path = "user.age", default = 30.0 }]
sparse = [
  { name = "user", path = "user.id" },
  { name = "category", path = "ad.category", if_missing = "dead_letter" },
  { name = "hour", path = "hour", boundaries = [6, 12, 18] },
  { name = "user_x_category", cross = ["user", "category"] },
]
"#;

/// The `i`th event of a click stream as a team writes it: nested, with
/// fields no feature reads; clicks from a hidden rule.
fn domain_event(i: usize) -> Value {
    let (user, category) = (i * 7 % 31, ["shoes", "books", "games", "tools"][i % 4]);
    let clicked = user.is_multiple_of(3) ^ (category == "games") ^ i.is_multiple_of(11);
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_248_680 + i as u64);
    json!({
        "user": {"id": format!("u{user}"), "age": 20 + i % 40, "country": "de"},
        "ad": {"id": format!("a{}", i % 13), "category": category},
        "price": (i % 50) as f64 / 10.0, "hour": i % 24, "clicked": clicked,
        "event_time": tributary::telemetry::utc(time), "session": format!("s{}", i / 10),
    })
}

/// The declaration's model and the same model over the fixed schema.
fn declared_and_fixed() -> (tributary::model::Model, tributary::model::Model) {
    let mut m = tributary::config::ModelConfig::small(ModelKind::WideDeep);
    m.features = toml::from_str(DECLARATION).unwrap();
    (m.dense_dim, m.sparse_fields) = (m.features.dense.len(), m.features.sparse_names());
    let fixed = tributary::config::ModelConfig { features: Default::default(), ..m.clone() };
    (tributary::model::Model::new(&m).unwrap(), tributary::model::Model::new(&fixed).unwrap())
}

#[test]
fn declared_events_learn_the_weights_of_the_same_events_reshaped_by_hand_bit_for_bit() {
    use tributary::state::ReplicaState;
    let (declared, fixed) = declared_and_fixed();
    let by_hand = |e: &Value| {
        let (user, category) = (e["user"]["id"].as_str().unwrap(), e["ad"]["category"].as_str().unwrap());
        let hour = e["hour"].as_f64().unwrap();
        let bucket = [6.0, 12.0, 18.0].iter().filter(|&&b| b <= hour).count();
        json!({
            "dense": [e["price"], e["user"]["age"]],
            "sparse": {"user": user, "category": category, "hour": format!("b{bucket}"),
                       "user_x_category": format!("{user}\u{1f}{category}")},
            "label": if e["clicked"].as_bool().unwrap() { 1 } else { 0 },
        })
    };
    let read = |model: &tributary::model::Model, e: &Value| model.featurizer().event(e.to_string().as_bytes()).unwrap();
    let domain: Vec<Value> = (0..256).map(domain_event).collect();
    let ours: Vec<_> = domain.iter().map(|e| read(&declared, e)).collect();
    let theirs: Vec<_> = domain.iter().map(|e| read(&fixed, &by_hand(e))).collect();
    let strip_time = |x: &tributary::event::Example| (x.features.clone(), x.label);
    assert_eq!(ours.iter().map(strip_time).collect::<Vec<_>>(), theirs.iter().map(strip_time).collect::<Vec<_>>());
    // The same batches from the same seed weights: the same gradients, bit for bit.
    let (a, b) = (ReplicaState::initial(&declared), ReplicaState::initial(&fixed));
    assert_eq!(a.weights, b.weights);
    for (x, y) in ours.chunks(64).zip(theirs.chunks(64)) {
        let (ga, gb) =
            (declared.gradient_at(None, &a.weights, x).unwrap(), fixed.gradient_at(None, &b.weights, y).unwrap());
        assert_eq!((ga.tensors, ga.loss_sum.to_bits()), (gb.tensors, gb.loss_sum.to_bits()));
    }
    assert_ne!(declared.fingerprint(), fixed.fingerprint(), "a declaration is a setting of the model");
}

/// `domain_event(i)` with the value at `path` replaced.
fn broken(i: usize, path: &[&str], value: Value) -> Value {
    let mut e = domain_event(i);
    let (last, parents) = path.split_last().unwrap();
    let node = parents.iter().fold(&mut e, |v, k| &mut v[*k]);
    node[*last] = value;
    e
}

/// A cluster of the declared model.
fn declared_cluster(name: &str) -> Cluster {
    let mut cluster = Cluster::new(name, ModelKind::Logistic);
    let m = &mut cluster.config.model;
    m.features = toml::from_str(DECLARATION).unwrap();
    (m.dense_dim, m.sparse_fields) = (m.features.dense.len(), m.features.sparse_names());
    cluster
}

/// Two replicas (under the memory cap: they are sent what the declaration
/// refuses) learn `good` domain events, sent as `tributary produce` sends a
/// team's JSON lines (each checked through the declaration, encoded as the
/// topic's format), and the `refused` payloads sent as they are, after
/// them: each good one learned once, equal digests, each refused one in
/// the dead-letter topic naming its feature.
fn two_replicas_learn(cluster: &Cluster, good: &[String], refused: &[(Vec<u8>, &str)]) -> [Replica; 2] {
    let replicas = [cluster.spawn_capped("r0"), cluster.spawn_capped("r1")];
    replicas.iter().for_each(Replica::wait_ready);
    cluster.produce_lines(good, &Default::default());
    cluster.produce_payloads(&refused.iter().map(|(event, _)| event.clone()).collect::<Vec<_>>());
    // The refused ones come last: wait until every event is taken, then
    // check that each good one was learned once.
    let all = good.len() + refused.len();
    for r in &replicas {
        let info = wait_for(&format!("{} to take every event", r.id), LEARN_LIMIT, || {
            r.info().filter(|info| watermark_sum(info) >= all as u64)
        });
        assert_eq!(watermark_sum(&info), all as u64, "{}: every event taken once: {info}", r.id);
        assert_eq!(info["examples_learned"], good.len(), "{}: every good event learned once: {info}", r.id);
    }
    let infos = wait_at_one_version(&[&replicas[0], &replicas[1]], LEARN_LIMIT);
    assert_eq!(infos[0]["weights_digest"], infos[1]["weights_digest"], "{infos:?}");
    let letters = cluster.dead_letters(refused.len());
    for (event, feature) in refused {
        let letter = letters.iter().find(|(payload, _, _)| payload == event);
        let (_, kind, reason) = letter.unwrap_or_else(|| panic!("{event:?} not dead-lettered: {letters:?}"));
        assert_eq!(kind, "feature");
        assert!(reason.contains(feature), "{reason}");
    }
    replicas
}

#[test]
fn a_domain_stream_is_learned_once_by_two_replicas_and_what_it_cannot_read_goes_where_declared() {
    let cluster = declared_cluster("features");
    let events: Vec<String> = (0..396).map(|i| domain_event(i).to_string()).collect();
    // What the declaration refuses, each naming its feature.
    let bad = [
        (broken(1, &["price"], json!("cheap")), "\"price\""),
        (broken(2, &["clicked"], json!("maybe")), "\"label\""),
        (broken(3, &["event_time"], json!("yesterday")), "\"time\""),
        (broken(4, &["ad", "category"], Value::Null), "\"category\""),
    ];
    let bad = bad.map(|(event, feature)| (event.to_string().into_bytes(), feature));
    let replicas = two_replicas_learn(&cluster, &events, &bad);
    // A record predicts as a V1 instance and as V2's `record` input alike,
    // its unused fields ignored.
    let record = domain_event(7);
    let (status, v1) =
        replicas[0].post("/v1/models/default:predict", None, &json!({"instances": [record]}).to_string());
    assert_eq!(status, 200, "{v1}");
    let infer =
        json!({"inputs": [{"name": "record", "shape": [1], "datatype": "BYTES", "data": [record.to_string()]}]});
    let (status, v2) = replicas[0].post("/v2/models/default/infer", None, &infer.to_string());
    assert_eq!(status, 200, "{v2}");
    assert_eq!(v2["outputs"][0]["data"][0], v1["predictions"][0], "{v1} {v2}");
    // And as V2's inputs of the declared features, one per feature, the
    // cross made from them: the inputs the model's metadata lists.
    let (status, metadata) = replicas[0].get("/v2/models/default").unwrap();
    assert_eq!(status, 200, "{metadata}");
    let metadata: Value = serde_json::from_str(&metadata).unwrap();
    let listed: Vec<&str> =
        metadata["inputs"].as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(listed, ["price", "age", "user", "category", "hour"], "{metadata}");
    let input = |name: &str, datatype: &str, value: &Value| json!({"name": name, "shape": [1], "datatype": datatype, "data": [value]});
    let features = json!({"inputs": [
        input("price", "FP32", &record["price"]), input("age", "FP32", &record["user"]["age"]),
        input("user", "BYTES", &record["user"]["id"]), input("category", "BYTES", &record["ad"]["category"]),
        input("hour", "FP32", &record["hour"]),
    ]});
    let (status, by_feature) = replicas[0].post("/v2/models/default/infer", None, &features.to_string());
    assert_eq!(status, 200, "{by_feature}");
    assert_eq!(by_feature["outputs"][0]["data"][0], v1["predictions"][0], "{v1} {by_feature}");
    let (status, refused) = replicas[0].post(
        "/v1/models/default:predict",
        None,
        &json!({"instances": [broken(8, &["ad", "category"], Value::Null)]}).to_string(),
    );
    assert_eq!(status, 400, "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("instances[0]: feature \"category\""), "{refused}");
}

/// The team's writer schema of the same click events: nested records, a
/// nullable one, an enum, fields no feature reads.
const CLICK_SCHEMA: &str = r#"{"type": "record", "name": "Click", "namespace": "shop", "fields": [
    {"name": "user", "type": {"type": "record", "name": "User", "fields": [
        {"name": "id", "type": "string"}, {"name": "age", "type": ["null", "int"]}, {"name": "country", "type": "string"}]}},
    {"name": "ad", "type": ["null", {"type": "record", "name": "Ad", "fields": [
        {"name": "id", "type": "string"},
        {"name": "category", "type": ["null", {"type": "enum", "name": "Category", "symbols": ["shoes", "books", "games", "tools"]}]}]}]},
    {"name": "price", "type": "double"},
    {"name": "hour", "type": "int"},
    {"name": "clicked", "type": ["null", "boolean"]},
    {"name": "event_time", "type": "string"},
    {"name": "session", "type": "string"}
]}"#;

#[test]
fn the_same_domain_stream_as_avro_of_its_own_writer_schema_is_learned_once_by_two_replicas() {
    let mut cluster = declared_cluster("features-avro");
    let schema = cluster.dir.path().join("click.avsc");
    std::fs::write(&schema, CLICK_SCHEMA).unwrap();
    let k = &mut cluster.config.kafka;
    (k.event_format, k.avro_schema) = (tributary::config::EventFormat::Avro, schema);
    let events: Vec<String> = (0..198).map(|i| domain_event(i).to_string()).collect();
    // What fits the schema but not the declaration, encoded as any Avro
    // producer would.
    let model = tributary::model::Model::new(&cluster.config.model).unwrap();
    let codec = tributary::event::EventCodec::new(&cluster.config.kafka, model.featurizer()).unwrap();
    let encode = |e: Value| codec.encode(e.to_string().as_bytes()).unwrap().into_owned();
    let bad = [
        (encode(broken(2, &["clicked"], Value::Null)), "\"label\""),
        (encode(broken(4, &["ad", "category"], Value::Null)), "\"category\""),
    ];
    two_replicas_learn(&cluster, &events, &bad);
}
