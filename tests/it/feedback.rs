//! Predict now, learn later (docs/design.md section 8b): every served
//! instance logged to the predictions topic, keyed by its id, as it was
//! served; labels posted under the same ids; the join of the two into
//! training events, exactly once through a SIGKILL of a joiner.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use tributary::config::ModelKind;

use crate::helpers::*;

/// Every record of `topic` (of `partitions`), keyed: key -> value.
fn read_all(cluster: &Cluster, topic: &str, partitions: i32, n: usize) -> BTreeMap<String, Value> {
    let records = read_records(cluster, topic, partitions, n);
    records.into_iter().map(|r| (r.key, serde_json::from_slice(&r.payload).unwrap())).collect()
}

/// A record as read back: its key, payload and headers.
struct Read {
    key: String,
    payload: Vec<u8>,
    headers: BTreeMap<String, String>,
}

/// The first `n` records of `topic` (of `partitions`), committed ones
/// only, in the order read.
fn read_records(cluster: &Cluster, topic: &str, partitions: i32, n: usize) -> Vec<Read> {
    use rdkafka::message::Headers;
    let connection = tributary::update_log::kafka::Connection::of(&cluster.config.kafka).unwrap();
    let consumer: BaseConsumer =
        tributary::update_log::kafka::log_reader_config(&connection, "feedback-reader").create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut read = Vec::new();
    wait_for(&format!("{n} records in {topic}"), Duration::from_secs(60), || {
        // Everything fetched, then the check: one record per call of the
        // closure read 1 200 records in 30 s on a busy machine.
        while let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let headers = m.headers().map_or_else(BTreeMap::new, |h| {
                let text = |v: Option<&[u8]>| String::from_utf8(v.unwrap_or_default().to_vec()).unwrap();
                h.iter().map(|h| (h.key.to_string(), text(h.value))).collect()
            });
            let key = String::from_utf8(m.key().unwrap_or_default().to_vec()).unwrap();
            read.push(Read { key, payload: m.payload().unwrap_or_default().to_vec(), headers });
            if read.len() >= n {
                break;
            }
        }
        (read.len() >= n).then_some(())
    });
    read
}

/// Feedback on, on topics of the test's own, the join's window `window_ms`.
fn feedback_on(cluster: &mut Cluster, window_ms: u64) {
    let events = cluster.config.kafka.events_topic.clone();
    let f = &mut cluster.config.feedback;
    f.enabled = true;
    f.predictions_topic = format!("predictions-{events}");
    f.labels_topic = format!("labels-{events}");
    f.window_ms = window_ms;
}

/// An instance that names its id, so that its training event shows whose
/// it is; the dense values vary with it.
fn named_instance(id: &str, i: usize) -> Value {
    json!({"dense": (0..8).map(|d| ((i * 8 + d) % 97) as f64 / 97.0).collect::<Vec<_>>(), "sparse": {"f0": id}})
}

/// V1 predictions of `ids` (instance `i` each) on `replica`.
fn predict_ids(replica: &Replica, ids: &[(String, usize)]) {
    let instances: Vec<Value> = ids.iter().map(|(id, i)| named_instance(id, *i)).collect();
    let names: Vec<&str> = ids.iter().map(|(id, _)| id.as_str()).collect();
    let body = json!({"instances": instances, "ids": names}).to_string();
    let (status, answer) = replica.post(&format!("/v1/models/{}:predict", replica.model_name), None, &body);
    assert_eq!(status, 200, "{answer}");
}

/// Posts `(id, label)` pairs to the feedback endpoint of `replica`.
fn post_labels(replica: &Replica, labels: &[(&str, i64)]) {
    let labels: Vec<Value> = labels.iter().map(|(id, label)| json!({"id": id, "label": label})).collect();
    let body = json!({"labels": labels}).to_string();
    let (status, answer) = replica.post(&format!("/v1/models/{}/feedback", replica.model_name), None, &body);
    assert_eq!(status, 202, "{answer}");
}

/// The training events the join wrote, by the prediction id (their key).
fn joined_events(cluster: &Cluster, n: usize) -> BTreeMap<String, Value> {
    let k = &cluster.config.kafka;
    let read = read_records(cluster, &k.events_topic, k.events_partitions, n);
    let ids: BTreeSet<&String> = read.iter().map(|r| &r.key).collect();
    assert_eq!(ids.len(), read.len(), "one event per prediction id");
    read.into_iter().map(|r| (r.key, serde_json::from_slice(&r.payload).unwrap())).collect()
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

/// The window's cases, on one replica: a label before its prediction waits
/// for it; a label joins its prediction into an event of the served
/// instance at the prediction's time; a prediction without a label is
/// learned with the default label once the window passes; a second label,
/// a label after the window and a label no prediction had are
/// dead-lettered, each with its reason. Every joined event is learned once.
#[test]
fn labels_join_their_predictions_and_second_late_and_unknown_labels_are_dead_lettered() {
    let mut cluster = Cluster::new("feedback_join", ModelKind::Logistic);
    // Long enough that the late label below comes within the window after
    // the expiry (an id is remembered that long), on a busy machine.
    feedback_on(&mut cluster, 4000);
    let replica = cluster.spawn("r0");
    replica.wait_ready();
    post_labels(&replica, &[("early", 1)]);
    let ids: Vec<(String, usize)> =
        ["early", "labeled", "expires", "late"].iter().map(|s| s.to_string()).zip(0..).collect();
    predict_ids(&replica, &ids);
    post_labels(&replica, &[("labeled", 1), ("labeled", 0), ("unknown", 1)]);

    let events = joined_events(&cluster, 4);
    post_labels(&replica, &[("late", 1)]);
    let label = |id: &str| events[id]["label"].as_i64();
    assert_eq!(
        [label("early"), label("labeled"), label("expires"), label("late")],
        [Some(1), Some(1), Some(0), Some(0)]
    );
    let logged = read_all(&cluster, &cluster.config.feedback.predictions_topic, 8, 4);
    // As the model reads them: f32 (serde_json may read a decimal one f64
    // ulp off; the instance logged is the one served, parsed once).
    let f32s =
        |v: &Value| v.as_array().unwrap().iter().map(|x| (x.as_f64().unwrap() as f32).to_bits()).collect::<Vec<_>>();
    for (id, i) in &ids {
        let event = &events[id];
        assert_eq!(f32s(&event["dense"]), f32s(&named_instance(id, *i)["dense"]), "{id}");
        assert_eq!((&event["dense"], &event["sparse"]), (&logged[id]["instance"]["dense"], &json!({"f0": id})));
        assert_eq!(event["ts"], logged[id]["ts"], "the prediction's time");
    }
    let dead = read_records(&cluster, &cluster.config.kafka.dlq_topic, 1, 3);
    let reasons: BTreeMap<&str, &str> =
        dead.iter().map(|d| (d.key.as_str(), d.headers["tributary.reason_kind"].as_str())).collect();
    let expected = [("labeled", "label_duplicate"), ("late", "label_late"), ("unknown", "label_unknown")];
    assert_eq!(reasons, expected.into_iter().collect(), "{:?}", dead.iter().map(|d| &d.headers).collect::<Vec<_>>());
    assert!(dead.iter().all(|d| d.headers["tributary.topic"] == cluster.config.feedback.labels_topic));
    replica.wait_learned(4, Duration::from_secs(30));
    let m = replica.metrics();
    let ending = |e: &str| m.value("tributary_join_predictions_total", &format!("ending=\"{e}\""));
    assert_eq!((ending("labeled"), ending("expired")), (2.0, 2.0));
}

/// Exactly once through a SIGKILL: two replicas join (each owns half the
/// partitions) while predictions with ids are served and labels for half
/// of them arrive after random delays; one replica is SIGKILLed mid-stream
/// and restarted. Every prediction becomes exactly one training event, with
/// its label (or the default after the window) and the features as served,
/// bit for bit; both replicas learn each event once and hold equal weights.
#[test]
fn slow_every_prediction_is_learned_once_with_its_label_through_a_sigkill_of_a_joiner() {
    const N: usize = 1200;
    let mut cluster = Cluster::new("feedback_sigkill", ModelKind::Logistic);
    feedback_on(&mut cluster, 2500);
    let (mut r0, r1) = (cluster.spawn("r0"), cluster.spawn("r1"));
    r0.wait_ready();
    r1.wait_ready();
    // Labels for ids whose number is odd, each due a pseudo-random 0 to
    // 1 s after its prediction.
    let delay = |i: usize| Duration::from_millis((i as u64 * 7919) % 1000);
    let labeled = |i: usize| i % 2 == 1;
    let started = Instant::now();
    let mut due: Vec<(Instant, String)> = Vec::new();
    for step in 0..N / 4 {
        let ids: Vec<(String, usize)> = (step * 4..step * 4 + 4).map(|i| (format!("p{i}"), i)).collect();
        predict_ids(&r1, &ids);
        let now = Instant::now();
        due.extend(ids.iter().filter(|(_, i)| labeled(*i)).map(|(id, i)| (now + delay(*i), id.clone())));
        let (ready, waiting): (Vec<_>, Vec<_>) = due.into_iter().partition(|(at, _)| *at <= now);
        due = waiting;
        if !ready.is_empty() {
            post_labels(&r1, &ready.iter().map(|(_, id)| (id.as_str(), 1)).collect::<Vec<_>>());
        }
        if step == N / 8 {
            r0.kill();
            r0.start();
        }
        std::thread::sleep(Duration::from_millis(10).saturating_sub(now.elapsed()));
    }
    for (at, id) in due {
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        post_labels(&r1, &[(id.as_str(), 1)]);
    }
    eprintln!("{N} predictions and {} labels sent in {:?}", N / 2, started.elapsed());

    let events = joined_events(&cluster, N);
    let logged = read_all(&cluster, &cluster.config.feedback.predictions_topic, 8, N);
    for i in 0..N {
        let id = format!("p{i}");
        let (event, served) = (&events[&id], &logged[&id]);
        assert_eq!(event["label"].as_i64(), Some(labeled(i) as i64), "{id}: {event}");
        assert_eq!((&event["dense"], &event["sparse"]), (&served["instance"]["dense"], &served["instance"]["sparse"]));
        assert_eq!(event["ts"], served["ts"]);
    }
    r0.wait_ready();
    for r in [&r0, &r1] {
        r.wait_learned(N as u64, Duration::from_secs(60));
    }
    let infos = wait_at_one_version(&[&r0, &r1], Duration::from_secs(30));
    assert_eq!(infos[0]["weights_digest"], infos[1]["weights_digest"]);
}

/// Hostile labels, under a memory cap: bodies the feedback endpoint must
/// refuse (an id too long, a label that is no scalar, more labels than a
/// batch, nesting past serde's limit, bytes that are no JSON) are 400s;
/// records on the labels topic that are no label are dead-lettered as
/// `record_invalid`; the replica stays up, and a good prediction and label
/// after them are joined and learned.
#[test]
fn hostile_labels_are_refused_or_dead_lettered_and_the_good_one_after_them_is_learned() {
    let mut cluster = Cluster::new("feedback_hostile", ModelKind::Logistic);
    feedback_on(&mut cluster, 60_000);
    let replica = cluster.spawn_capped("r0");
    replica.wait_ready();
    let path = format!("/v1/models/{}/feedback", replica.model_name);
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let over_a_batch = cluster.config.http.max_batch + 1;
    let many: Vec<Value> = (0..over_a_batch).map(|i| json!({"id": format!("m{i}"), "label": 1})).collect();
    let bodies = [
        json!({"labels": [{"id": "x".repeat(10_000), "label": 1}]}).to_string(),
        json!({"labels": [{"id": "a", "label": {"nested": [1, 2]}}]}).to_string(),
        json!({"labels": many}).to_string(),
        format!("{{\"labels\": [{{\"id\": \"a\", \"label\": {nested}}}]}}"),
        "\u{0}\u{1}not json".to_string(),
    ];
    for body in &bodies {
        let (status, answer) = replica.post(&path, None, body);
        assert_eq!(status, 400, "{}: {answer}", &body[..body.len().min(80)]);
    }

    let f = &cluster.config.feedback;
    let producer: rdkafka::producer::BaseProducer = tributary::update_log::kafka::producer_config(
        &tributary::update_log::kafka::Connection::of(&cluster.config.kafka).unwrap(),
        "hostile-labels",
    )
    .create()
    .unwrap();
    let records: [&[u8]; 3] = [b"\xff\xfe garbage", br#"{"id": 7}"#, br#"{"id": "b", "label": [1]}"#];
    for record in records {
        let sent =
            producer.send(rdkafka::producer::BaseRecord::<(), [u8]>::to(&f.labels_topic).partition(0).payload(record));
        sent.map_err(|(e, _)| e).unwrap();
    }
    rdkafka::producer::Producer::flush(&producer, Duration::from_secs(30)).unwrap();
    predict_ids(&replica, &[("good".to_string(), 1)]);
    post_labels(&replica, &[("good", 1)]);

    let events = joined_events(&cluster, 1);
    assert_eq!(events["good"]["label"], json!(1));
    let dead = read_records(&cluster, &cluster.config.kafka.dlq_topic, 1, 3);
    assert!(dead.iter().all(|d| d.headers["tributary.reason_kind"] == "record_invalid"), "{:?}", dead.len());
    replica.wait_learned(1, Duration::from_secs(30));
    assert!(replica.is_running(), "the replica is up after the hostile labels");
}
