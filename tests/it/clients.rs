//! The clients users already have, against a real replica and broker:
//! `examples/client/client.py` sends events with confluent-kafka (JSON, or
//! Avro in the Confluent wire format written with fastavro) and predicts
//! with tritonclient over HTTP (binary tensors, its default) and gRPC.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tributary::config::{EventFormat, ModelKind};
use tributary::event::avro::AvroEvents;

use crate::helpers::*;

const LEARN_LIMIT: Duration = Duration::from_secs(120);

/// Runs the example client with `args`; its last line of output, as JSON.
fn run_client(args: &[&str]) -> Value {
    let python = procs::venv_python().expect("the project's virtualenv (scripts/setup)");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/client/client.py");
    let out = Command::new(python).arg(script).args(args).output().expect("python runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "client.py {args:?}: {}\n{stdout}\n{stderr}", out.status);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// A replica of `cluster` serving gRPC too; its gRPC address.
fn spawn_with_grpc(cluster: &Cluster, id: &str) -> (Replica, String) {
    let mut r = cluster.replica(id);
    let grpc = format!("127.0.0.1:{}", procs::free_port());
    r.env.push(("TRIBUTARY_GRPC__ADDR".into(), grpc.clone()));
    r.start();
    r.wait_ready();
    (r, grpc)
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().expect("an array").iter().map(|p| p.as_f64().expect("a number") as f32).collect()
}

#[test]
fn python_clients_send_events_and_predict_alike_over_v1_v2_http_and_grpc() {
    let cluster = Cluster::new("clients", ModelKind::WideDeep);
    let (r, grpc) = spawn_with_grpc(&cluster, "r0");
    let (http, k) = (r.http.to_string(), &cluster.config.kafka);
    let sent =
        run_client(&["send", "--http", &http, "--brokers", &k.brokers, "--topic", &k.events_topic, "--events", "500"]);
    assert_eq!(sent["sent"], 500);
    let info = r.wait_learned(500, LEARN_LIMIT);
    assert_eq!(watermark_sum(&info), 500, "{info}");

    let answers = run_client(&["predict", "--http", &http, "--grpc", &grpc, "--rows", "8"]);
    let v1 = floats(&answers["v1"]);
    assert_eq!(v1.len(), 8, "{answers}");
    assert_eq!(floats(&answers["v2_http"]), v1, "tritonclient.http (binary tensors) vs V1: {answers}");
    assert_eq!(floats(&answers["v2_grpc"]), v1, "tritonclient.grpc vs V1: {answers}");
    assert_eq!(floats(&answers["v2_http_gzip"]), v1, "tritonclient.http, gzip both ways: {answers}");
    assert_eq!(floats(&answers["v2_grpc_gzip"]), v1, "tritonclient.grpc, gzip: {answers}");
    let fields = &cluster.config.model.sparse_fields;
    let want_inputs: Vec<&str> = std::iter::once("dense").chain(fields.iter().map(String::as_str)).collect();
    assert_eq!(answers["grpc_inputs"], serde_json::json!(want_inputs));
    let m = r.metrics();
    let infer = r#"method="POST",protocol="grpc",route="/inference.GRPCInferenceService/ModelInfer",status="Ok""#;
    assert_eq!(m.value("tributary_requests_total", infer), 2.0, "gRPC requests are counted");
    let http_infer = r#"method="POST",protocol="http",route="/v2/models/{model}/infer",status="200""#;
    assert_eq!(m.value("tributary_requests_total", http_infer), 2.0);
    // The deprecated name counts the same, for dashboards that read it.
    assert_eq!(m.value("tributary_http_requests_total", infer), 2.0);
}

#[test]
fn avro_events_from_a_confluent_producer_are_learned_once_and_malformed_ones_dead_lettered() {
    let mut cluster = Cluster::new("avro", ModelKind::Logistic);
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/event.avsc");
    let k = &mut cluster.config.kafka;
    (k.event_format, k.avro_schema, k.avro_schema_id) = (EventFormat::Avro, schema.clone(), Some(3));
    let r = cluster.spawn("r0");
    r.wait_ready();
    let k = &cluster.config.kafka;
    let (http, schema_arg) = (r.http.to_string(), schema.display().to_string());
    let args = ["--brokers", &k.brokers, "--topic", &k.events_topic, "--avro-schema", &schema_arg];
    let sent = run_client(&[&["send", "--http", &http, "--events", "600", "--schema-id", "3"][..], &args].concat());
    assert_eq!(sent["sent"], 600);

    // Malformed, as a misconfigured or buggy producer writes them.
    let avro = AvroEvents::new(&std::fs::read_to_string(&schema).unwrap(), Some(3), None).unwrap();
    let good =
        avro.encode(serde_json::json!({"dense": vec![0.5; cluster.config.model.dense_dim], "label": 1})).unwrap();
    let bad: Vec<(Vec<u8>, &str)> = vec![
        (br#"{"dense":[],"label":1}"#.to_vec(), "avro"), // JSON on an Avro topic
        ([&[0, 0, 0, 0, 4][..], &good[5..]].concat(), "avro"), // another schema id
        (vec![0, 0, 0, 0, 3, 0xff, 0xff, 0xff], "avro"), // a body that does not decode
        (
            avro.encode(serde_json::json!({"dense": vec![0.5; cluster.config.model.dense_dim], "label": 4})).unwrap(),
            "label_range",
        ),
    ];
    cluster.produce_payloads(&bad.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>());
    // Events posted over HTTP go to the topic as Avro too.
    let posted = serde_json::json!({"events": [
        {"dense": vec![0.5; cluster.config.model.dense_dim], "label": 1},
        {"dense": vec![-0.5; cluster.config.model.dense_dim], "label": 0},
    ]});
    let (status, body) = r.post("/v1/events", None, &posted.to_string());
    assert_eq!(status, 202, "{body}");

    let info = r.wait_learned(602, LEARN_LIMIT);
    assert_eq!(watermark_sum(&info), 602 + bad.len() as u64, "every event read once: {info}");
    let mut got: Vec<(Vec<u8>, String)> =
        cluster.dead_letters(bad.len()).into_iter().map(|(p, kind, _)| (p, kind)).collect();
    let mut want: Vec<(Vec<u8>, String)> = bad.iter().map(|(p, kind)| (p.clone(), kind.to_string())).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    assert_eq!(r.metrics().value("tributary_events_invalid_total", ""), bad.len() as f64);
}

/// The walk-through of docs/api.md: a team's own click events, as Avro of
/// their writer schema (`examples/domain/click.avsc`), learned through the
/// example declaration (`examples/domain/tributary.toml`), sent and
/// predicted by the example client: the same records predict alike as V1
/// instances, as V2's `record` input and as V2's inputs per feature, over
/// HTTP and gRPC.
#[test]
fn a_team_s_own_avro_clicks_are_learned_and_predicted_through_the_example_declaration() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/domain");
    let walked = tributary::config::Config::load(Some(&example.join("tributary.toml")), [], &Default::default())
        .expect("the example configuration loads");
    let mut cluster = Cluster::new("clicks", ModelKind::WideDeep);
    let m = &mut cluster.config.model;
    (m.features, m.dense_dim, m.sparse_fields) =
        (walked.model.features.clone(), walked.model.dense_dim, walked.model.sparse_fields.clone());
    let schema = example.join("click.avsc");
    let k = &mut cluster.config.kafka;
    (k.event_format, k.avro_schema, k.avro_schema_id) = (EventFormat::Avro, schema.clone(), Some(5));
    let (r, grpc) = spawn_with_grpc(&cluster, "r0");
    let (http, k) = (r.http.to_string(), &cluster.config.kafka);
    let schema = schema.display().to_string();
    let sent = run_client(&[
        "send",
        "--http",
        &http,
        "--brokers",
        &k.brokers,
        "--topic",
        &k.events_topic,
        "--events",
        "400",
        "--avro-schema",
        &schema,
        "--schema-id",
        "5",
    ]);
    assert_eq!(sent["sent"], 400);
    let info = r.wait_learned(400, LEARN_LIMIT);
    assert_eq!(watermark_sum(&info), 400, "every click read once, none refused: {info}");

    let answers = run_client(&["predict", "--http", &http, "--grpc", &grpc, "--rows", "8"]);
    assert_eq!(answers["inputs"], serde_json::json!(["price", "age", "user", "country", "category", "tags", "hour"]));
    let v1 = floats(&answers["v1"]);
    assert_eq!(v1.len(), 8, "{answers}");
    for way in ["v2_http_record", "v2_http_features", "v2_grpc_record", "v2_grpc_features"] {
        assert_eq!(floats(&answers[way]), v1, "{way} vs V1: {answers}");
    }
}
