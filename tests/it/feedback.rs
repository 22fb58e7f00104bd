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
    let replica = cluster.spawn("r0");
    replica.wait_ready();
    let path = format!("/v1/models/{}:predict", cluster.config.model.name);
    let instance = |i: usize| json!({"dense": vec![0.1 * i as f64; 8], "sparse": {"f0": format!("v{i}")}});
    let given = json!({"instances": [instance(1), instance(2)], "ids": ["click-1", "click-2"]});
    let (status, answered) = replica.post(&path, None, &given.to_string());
    assert_eq!(status, 200, "{answered}");
    assert_eq!(answered["ids"], json!(["click-1", "click-2"]));
    let (status, made) = replica.post(&path, None, &json!({"instances": [instance(3)]}).to_string());
    assert_eq!(status, 200, "{made}");
    let made_id = made["ids"][0].as_str().unwrap().to_string();
    assert!(made_id.starts_with("r0-"), "{made}");
    let (status, wrong) =
        replica.post(&path, None, &json!({"instances": [instance(4)], "ids": ["a", "b"]}).to_string());
    assert_eq!(status, 400, "{wrong}");

    let logged = read_all(&cluster, &cluster.config.feedback.predictions_topic, 8, 3);
    let expect = [
        ("click-1", instance(1), &answered, 0),
        ("click-2", instance(2), &answered, 1),
        (&made_id, instance(3), &made, 0),
    ];
    for (id, instance, answer, i) in expect {
        let record = &logged[id];
        assert_eq!((&record["id"], &record["instance"]), (&json!(id), &instance), "{record}");
        assert_eq!(record["prediction"], answer["predictions"][i], "the prediction served: {record}");
        assert_eq!(record["model_version"], answer["model_version"], "{record}");
        assert!(record["ts"].as_i64().unwrap() > 1_700_000_000_000, "{record}");
    }
    assert_eq!(logged.len(), 3, "the refused request logged nothing: {logged:?}");
    assert_eq!(replica.metrics().value("tributary_predictions_logged_total", r#"result="queued""#), 3.0);
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
