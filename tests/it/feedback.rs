//! Predict now, learn later (docs/design.md section 8b), as far as it is
//! built: every served V1 instance logged to the predictions topic, keyed
//! by its id, as it was served.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use tributary::config::ModelKind;

use crate::helpers::*;

/// Every record of `topic` (of `partitions`), keyed: key -> value.
fn read_all(cluster: &Cluster, topic: &str, partitions: i32, n: usize) -> BTreeMap<String, Value> {
    let connection = tributary::update_log::kafka::Connection::of(&cluster.config.kafka).unwrap();
    let consumer: BaseConsumer =
        tributary::update_log::kafka::log_reader_config(&connection, "predictions-reader").create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut read = BTreeMap::new();
    wait_for(&format!("{n} records in {topic}"), Duration::from_secs(30), || {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let key = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
            read.insert(key, serde_json::from_slice(m.payload().unwrap()).unwrap());
        }
        (read.len() >= n).then_some(())
    });
    read
}

/// With `feedback.enabled`, a V1 predict's instances are logged under the
/// ids the request gave, or under ids the replica makes and answers, each
/// with the record as it came, the prediction and the version answered.
/// Ids that do not match the instances are a 400, and so are ids sent to a
/// replica that logs nothing.
#[test]
fn served_instances_are_logged_under_their_ids_as_they_were_served() {
    let mut cluster = Cluster::new("feedback_log", ModelKind::WideDeep);
    cluster.config.feedback.enabled = true;
    cluster.config.feedback.predictions_topic = format!("predictions-{}", cluster.config.kafka.events_topic);
    let mut replica = cluster.replica("r0");
    let grpc = format!("127.0.0.1:{}", procs::free_port());
    replica.env.push(("TRIBUTARY_GRPC__ADDR".into(), grpc.clone()));
    replica.start();
    replica.wait_ready();
    let path = format!("/v1/models/{}:predict", cluster.config.model.name);
    let instance = |i: usize| json!({"dense": vec![0.25 * i as f64; 8], "sparse": {"f0": format!("v{i}")}});
    let from_tensors = |i: usize| json!({"dense": vec![0.25 * i as f64; 8], "sparse": {"f0": [format!("v{i}")]}});
    // V1: ids given, ids made, ids that do not match the instances.
    let given = json!({"instances": [instance(1), instance(2)], "ids": ["click-1", "click-2"]});
    let (status, answered) = replica.post(&path, None, &given.to_string());
    assert_eq!((status, &answered["ids"]), (200, &json!(["click-1", "click-2"])), "{answered}");
    let (status, made) = replica.post(&path, None, &json!({"instances": [instance(3)]}).to_string());
    assert_eq!(status, 200, "{made}");
    let made_id = made["ids"][0].as_str().unwrap().to_string();
    assert!(made_id.starts_with("r0-"), "{made}");
    let (status, wrong) =
        replica.post(&path, None, &json!({"instances": [instance(4)], "ids": ["a", "b"]}).to_string());
    assert_eq!(status, 400, "{wrong}");
    // V2 REST and gRPC: the ids as the `id` input, back as the `id` output.
    let v2 = json!({"inputs": [
        {"name": "dense", "datatype": "FP32", "shape": [1, 8], "data": vec![0.25 * 5.0; 8]},
        {"name": "f0", "datatype": "BYTES", "shape": [1], "data": ["v5"]},
        {"name": "id", "datatype": "BYTES", "shape": [1], "data": ["click-5"]},
    ]});
    let (status, rest) =
        replica.post(&format!("/v2/models/{}/infer", cluster.config.model.name), None, &v2.to_string());
    assert_eq!(status, 200, "{rest}");
    assert_eq!(
        (&rest["outputs"][1]["name"], &rest["outputs"][1]["data"]),
        (&json!("id"), &json!(["click-5"])),
        "{rest}"
    );
    let grpc_answer = infer_over_grpc(&grpc, 6, "click-6");

    let logged = read_all(&cluster, &cluster.config.feedback.predictions_topic, 8, 5);
    let v1 = |answer: &Value, i: usize| (answer["predictions"][i].clone(), answer["model_version"].clone());
    let v2_rest =
        (rest["outputs"][0]["data"][0].clone(), json!(rest["model_version"].as_str().unwrap().parse::<i64>().unwrap()));
    let expect = [
        ("click-1", instance(1), v1(&answered, 0)),
        ("click-2", instance(2), v1(&answered, 1)),
        (made_id.as_str(), instance(3), v1(&made, 0)),
        // From tensors, a BYTES [N] input is a bag of one value per row.
        ("click-5", from_tensors(5), v2_rest),
        ("click-6", from_tensors(6), grpc_answer),
    ];
    for (id, instance, (prediction, version)) in expect {
        let record = &logged[id];
        assert_eq!((&record["id"], &record["instance"]), (&json!(id), &instance), "{record}");
        // The same f32, written once by the answer and once by the log.
        let f32_of = |v: &Value| v.as_f64().unwrap() as f32;
        assert_eq!(f32_of(&record["prediction"]).to_bits(), f32_of(&prediction).to_bits(), "as served: {record}");
        assert_eq!(record["model_version"], version, "{record}");
        assert!(record["ts"].as_i64().unwrap() > 1_700_000_000_000, "{record}");
    }
    assert_eq!(logged.len(), 5, "the refused request logged nothing: {logged:?}");
    assert_eq!(replica.metrics().value("tributary_predictions_logged_total", r#"result="queued""#), 5.0);
}

/// `ModelInfer` of instance `i` (as the test's V1 instances) under `id`:
/// the prediction (as JSON, from its f32) and the version answered; the
/// answer's `id` output is checked to be `id`.
fn infer_over_grpc(addr: &str, i: usize, id: &str) -> (Value, Value) {
    use tributary_load::driver::proto::{self, grpc_inference_service_client::GrpcInferenceServiceClient};
    let tensor = |name: &str, datatype: &str, shape: Vec<i64>| proto::model_infer_request::InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape,
        ..Default::default()
    };
    let bytes = |s: &str| [(s.len() as u32).to_le_bytes().to_vec(), s.as_bytes().to_vec()].concat();
    let dense: Vec<u8> = [0.25 * i as f32; 8].iter().flat_map(|v| v.to_le_bytes()).collect();
    let request = proto::ModelInferRequest {
        model_name: "default".into(),
        inputs: vec![
            tensor("dense", "FP32", vec![1, 8]),
            tensor("f0", "BYTES", vec![1]),
            tensor("id", "BYTES", vec![1]),
        ],
        raw_input_contents: vec![dense, bytes(&format!("v{i}")), bytes(id)],
        ..Default::default()
    };
    let answer = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut client = GrpcInferenceServiceClient::connect(format!("http://{addr}")).await.unwrap();
        client.model_infer(request).await.unwrap().into_inner()
    });
    assert_eq!(answer.outputs[1].name, "id");
    assert_eq!(answer.raw_output_contents[1], bytes(id));
    let prediction = f32::from_le_bytes(answer.raw_output_contents[0][..4].try_into().unwrap());
    let version: i64 = answer.model_version.parse().unwrap();
    (serde_json::to_value(prediction).unwrap(), json!(version))
}

/// The broker away: every prediction is still answered at once; the first
/// `max_unsent` served instances wait in the producer's queue and reach the
/// topic when the broker is back, and each one after them is counted as
/// unlogged, never a failed prediction.
#[test]
fn slow_with_the_broker_down_predictions_are_answered_and_what_does_not_fit_is_counted_unlogged() {
    let mut cluster = Cluster::with_own_brokers("feedback_down", ModelKind::Logistic, 1);
    cluster.config.feedback.enabled = true;
    cluster.config.feedback.max_unsent = 10;
    let replica = cluster.spawn("r0");
    replica.wait_ready();
    let path = format!("/v1/models/{}:predict", cluster.config.model.name);
    let body = json!({"instances": [{"dense": vec![0.5; 8], "sparse": {"f0": "v1"}}]}).to_string();

    cluster.brokers[0].kill();
    let mut ids = Vec::new();
    for _ in 0..30 {
        let started = std::time::Instant::now();
        let (status, answer) = replica.post(&path, None, &body);
        assert_eq!(status, 200, "{answer}");
        assert!(started.elapsed() < Duration::from_secs(1), "answered without waiting on the broker");
        ids.push(answer["ids"][0].as_str().unwrap().to_string());
    }
    let m = replica.metrics();
    let result = |r: &str| m.value("tributary_predictions_logged_total", &format!("result=\"{r}\""));
    assert_eq!((result("queued"), result("unlogged")), (10.0, 20.0));

    cluster.brokers[0].restart().unwrap();
    let topic = cluster.config.feedback.predictions_topic.clone();
    let logged = read_all(&cluster, &topic, cluster.config.kafka.events_partitions, 10);
    let mut queued: Vec<&String> = ids.iter().take(10).collect();
    queued.sort();
    assert_eq!(logged.keys().collect::<Vec<_>>(), queued, "the ten queued, and only they");
}
