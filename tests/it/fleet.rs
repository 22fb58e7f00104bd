//! The exactly-once protocol across real processes: an Apache Kafka broker, replicas
//! started as child processes and killed with SIGKILL.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tributary::config::ModelKind;
use tributary::model::{GradTensor, GradValues, Model};
use tributary::update_log::kafka;
use tributary::update_log::record::{EventRange, GradientRecord, Record};

use crate::helpers::*;

const LEARN_LIMIT: Duration = Duration::from_secs(120);

#[test]
fn one_replica_learns_every_event_exactly_once() {
    let cluster = Cluster::new("one_replica", ModelKind::Logistic);
    let replica = cluster.spawn("r0");
    replica.wait_ready();
    let labels = cluster.produce(6000, 1);
    let info = replica.wait_learned(6000, LEARN_LIMIT);
    assert_eq!(watermark_sum(&info), 6000, "{info}");
    let loss = info["progressive_logloss"].as_f64().unwrap();
    let baseline = constant_logloss(&labels);
    assert!(loss < baseline, "progressive log-loss {loss} should beat the constant predictor's {baseline}");

    // The group's committed offsets catch up with the applied watermarks.
    let consumer: BaseConsumer = {
        let mut c = kafka::base_config(&kafka::Connection::of(&cluster.config.kafka).unwrap(), "offset-check");
        c.set("group.id", &cluster.config.kafka.group_id);
        c.create().unwrap()
    };
    let mut tpl = TopicPartitionList::new();
    for p in 0..cluster.config.kafka.events_partitions {
        tpl.add_partition(&cluster.config.kafka.events_topic, p);
    }
    let want = watermarks(&info);
    wait_for("committed offsets to equal the watermarks", Duration::from_secs(20), || {
        let committed = consumer.committed_offsets(tpl.clone(), Duration::from_secs(5)).ok()?;
        let got: std::collections::BTreeMap<String, u64> = (committed.elements().iter())
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition().to_string(), o as u64)),
                _ => None,
            })
            .collect();
        (got == want).then_some(())
    });
    let metrics = replica.metrics();
    assert_eq!(metrics.value("tributary_examples_learned_total", ""), 6000.0);
    assert_eq!(metrics.value("tributary_events_consumed_total", ""), 6000.0);
}

#[test]
fn zombie_records_for_the_same_range_are_applied_once_everywhere() {
    let mut cluster = Cluster::new("zombie", ModelKind::Logistic);
    cluster.config.train.enabled = false; // only our hand-made trainers write
                                          // No checkpoint, so no attestation record, while the test counts records.
    cluster.config.checkpoint.interval_secs = 3600;
    let replicas = [cluster.spawn("r0"), cluster.spawn("r1")];
    replicas.iter().for_each(Replica::wait_ready);
    let model = Model::new(&cluster.config.model).expect("a built-in model");
    let record = |producer: &str, from: i64, to: i64, g: f32| {
        Record::Gradient(GradientRecord {
            fingerprint: model.fingerprint(),
            ranges: vec![EventRange { partition: 3, from, to }],
            base: 0,
            examples: (to - from) as u32,
            skipped: 0,
            loss_sum: 0.5,
            oldest_ts: 0,
            producer: producer.into(),
            gradient: vec![GradTensor { param: 1, values: GradValues::Dense(vec![g; model.params()[1].len()]) }],
        })
        .encode()
    };
    let producer: BaseProducer =
        kafka::producer_config(&kafka::Connection::of(&cluster.config.kafka).unwrap(), "zombies").create().unwrap();
    // The live trainer and a zombie that lost the partition both send [0, 10);
    // then the zombie goes on with [0, 20) and the live one with [10, 20).
    for bytes in [
        record("live", 0, 10, 0.1),
        record("zombie", 0, 10, 0.3),
        record("zombie", 0, 20, 0.3),
        record("live", 10, 20, 0.1),
    ] {
        producer.send(BaseRecord::<(), _>::to(&cluster.config.kafka.updates_topic).payload(&bytes)).unwrap();
        producer.flush(Duration::from_secs(10)).unwrap();
    }
    let infos: Vec<_> = replicas.iter().map(|r| r.wait_learned(20, LEARN_LIMIT)).collect();
    for (r, info) in replicas.iter().zip(&infos) {
        // Each replica's settings record (at start-up), then the four above.
        assert_eq!(info["model_version"], 6, "{info}");
        assert_eq!(watermarks(info)["3"], 20);
        let m = r.metrics();
        assert_eq!(m.value("tributary_records_applied_total", ""), 2.0, "{}", r.id);
        assert_eq!(m.value("tributary_records_rejected_total", "reason=\"not_contiguous\""), 2.0, "{}", r.id);
    }
    assert_eq!(infos[0]["weights_digest"], infos[1]["weights_digest"]);
    // The digest is that of the live trainer's two records alone.
    let mut state = tributary::state::ReplicaState::initial(&model);
    state.apply(&model, 0, &record("live", 0, 10, 0.1), &mut tributary::state::optim::NoTouch);
    state.apply(&model, 1, &record("live", 10, 20, 0.1), &mut tributary::state::optim::NoTouch);
    assert_eq!(infos[0]["weights_digest"], model.digest(&state.weights));
}

#[test]
fn restart_from_checkpoint_and_replay_matches_a_replica_that_never_stopped() {
    let cluster = Cluster::new("restart", ModelKind::WideDeep);
    let steady = cluster.spawn("steady");
    let mut restarted = cluster.spawn("restarted");
    steady.wait_ready();
    restarted.wait_ready();
    cluster.produce(3000, 1);
    restarted.wait_learned(3000, LEARN_LIMIT);
    assert!(restarted.terminate().success());
    // While it is away the log grows: the restart must replay it.
    cluster.produce(3000, 2);
    steady.wait_learned(6000, LEARN_LIMIT);
    restarted.start();
    restarted.wait_learned(6000, LEARN_LIMIT);
    // The restart appended its settings record: both read it, then agree.
    let infos = wait_at_one_version(&[&steady, &restarted], LEARN_LIMIT);
    assert_eq!(infos[0]["examples_learned"], 6000);
    assert_eq!(infos[0]["weights_digest"], infos[1]["weights_digest"]);
    let log = std::fs::read_to_string(&restarted.log).unwrap();
    assert!(log.contains("restored checkpoint"), "the restart should load a checkpoint, not replay from zero");
}

#[test]
fn slow_three_replicas_survive_a_sigkill_with_no_failed_prediction() {
    let cluster = Cluster::new("sigkill", ModelKind::WideDeep);
    let mut replicas = [cluster.spawn("r0"), cluster.spawn("r1"), cluster.spawn("r2")];
    replicas.iter().for_each(Replica::wait_ready);

    // Predictions go to the two survivors the whole time.
    let predict_path = format!("/v1/models/{}:predict", cluster.config.model.name);
    let body = r#"{"instances": [{"dense": [0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8], "sparse": {"f0": "v1"}}]}"#;
    let load = PredictionLoad::start(&[replicas[0].http, replicas[1].http], &predict_path, body);

    cluster.produce(4000, 1);
    wait_for("a checkpoint of r2", Duration::from_secs(60), || {
        let learned = replicas[2].info()?["examples_learned"].as_u64()? > 0;
        let saved = std::fs::read_dir(&replicas[2].state_dir)
            .ok()?
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".bin"));
        (learned && saved).then_some(())
    });
    replicas[2].kill();
    cluster.produce(4000, 2);
    // The survivors take r2's partitions once its session times out, and
    // learn every event without it.
    for r in &replicas[..2] {
        r.wait_learned(8000, LEARN_LIMIT);
    }
    replicas[2].start();
    cluster.produce(2000, 3);
    replicas.iter().for_each(|r| drop(r.wait_learned(10000, LEARN_LIMIT)));
    // The restart appended its settings record (and maybe records its
    // trainer sent while it replayed, which all reject): all read them.
    let infos = wait_at_one_version(&replicas.iter().collect::<Vec<_>>(), LEARN_LIMIT);
    let (ok, errors) = load.stop();
    for info in &infos {
        assert_eq!(info["weights_digest"], infos[0]["weights_digest"], "{infos:?}");
        assert_eq!(watermark_sum(info), 10000);
    }
    assert!(ok > 100, "the prediction load ran");
    let log = std::fs::read_to_string(&replicas[2].log).unwrap();
    assert!(log.contains("restored checkpoint"), "r2 should restart from its checkpoint and replay the log");
    assert!(errors.is_empty(), "failed predictions at the survivors: {errors:?}");
}

#[test]
fn slow_sigterm_hands_partitions_over_within_two_seconds() {
    let cluster = Cluster::new("sigterm", ModelKind::Logistic);
    let survivor = cluster.spawn("r0");
    let mut leaving = cluster.spawn("r1");
    survivor.wait_ready();
    leaving.wait_ready();
    cluster.produce(2000, 1);
    survivor.wait_learned(2000, LEARN_LIMIT);
    // Both members must own partitions before the stop means anything.
    wait_for("both replicas to own partitions", Duration::from_secs(60), || {
        let owned = |r: &Replica| r.metrics().series("tributary_consumer_lag");
        (owned(&survivor) > 0 && owned(&leaving) > 0).then_some(())
    });
    let status = leaving.terminate();
    assert!(status.success(), "graceful stop exits 0: {status:?}");
    let stopped = Instant::now();
    cluster.produce(800, 2);
    survivor.wait_learned(2800, Duration::from_secs(10));
    let took = stopped.elapsed();
    assert!(took < Duration::from_secs(2), "partitions took {took:?} to move and be learned");
    let log = std::fs::read_to_string(&leaving.log).unwrap();
    assert!(log.contains("trainer left the consumer group") && log.contains("final checkpoint"), "{log}");
}

#[test]
fn bad_events_go_to_the_dead_letter_topic_and_every_good_one_is_learned_once() {
    let cluster = Cluster::new("dlq", ModelKind::Logistic);
    let replica = cluster.spawn("r0");
    replica.wait_ready();
    let k = &cluster.config.kafka;
    let dense = |v: &str| format!("[{v},0,0,0,0,0,0,0]");
    let bad: Vec<(Vec<u8>, &str)> = vec![
        (b"{\"dense\": [1, 2".to_vec(), "json"),
        (vec![0xff, 0x00, 0xfe, 0x13, 0x80], "json"),
        (br#"{"dense":[1,2,3],"label":1}"#.to_vec(), "dense_length"),
        (format!(r#"{{"dense":{},"label":1}}"#, dense("1e39")).into_bytes(), "non_finite"),
        (format!(r#"{{"dense":{},"label":7}}"#, dense("1")).into_bytes(), "label_range"),
        (
            format!(r#"{{"dense":{},"label":1,"sparse":{{"f0":"{}"}}}}"#, dense("1"), "x".repeat(256 << 10))
                .into_bytes(),
            "event_too_large",
        ),
    ];
    // Good events with a bad one every hundred, over all partitions.
    let mut synthetic = tributary::synthetic::Synthetic::new(&cluster.config.model, 3);
    let total = 100 * bad.len();
    let producer: BaseProducer =
        kafka::producer_config(&kafka::Connection::of(k).unwrap(), "dlq-test").create().unwrap();
    for i in 0..total {
        let payload = if i % 100 == 50 { bad[i / 100].0.clone() } else { synthetic.event(1).into_bytes() };
        let record = BaseRecord::<(), _>::to(&k.events_topic).partition((i % 8) as i32).payload(&payload);
        producer.send(record).map_err(|(e, _)| e).unwrap();
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).unwrap();

    let info = replica.wait_learned((total - bad.len()) as u64, LEARN_LIMIT);
    assert_eq!(watermark_sum(&info), total as u64, "every partition moved past its bad events: {info}");

    // Every bad event is in the dead-letter topic, as it came, with its reason.
    let letters = cluster.dead_letters(bad.len());
    let mut got: Vec<(Vec<u8>, String)> = letters.iter().map(|(p, kind, _)| (p.clone(), kind.clone())).collect();
    let mut want: Vec<(Vec<u8>, String)> = bad.iter().map(|(p, kind)| (p.clone(), kind.to_string())).collect();
    got.sort();
    want.sort();
    assert!(got == want, "dead letters {:?}", letters.iter().map(|l| (&l.1, &l.2)).collect::<Vec<_>>());
    assert!(letters.iter().all(|(_, _, reason)| !reason.is_empty()));
    let m = replica.metrics();
    assert_eq!(m.value("tributary_events_invalid_total", ""), bad.len() as f64);
    assert_eq!(m.value("tributary_dead_letters_total", "result=\"delivered\""), bad.len() as f64);
}

#[test]
fn a_checkpoint_ahead_of_the_update_log_is_refused_with_a_clear_error() {
    let old = Cluster::new("ahead_old", ModelKind::Logistic);
    let mut first = old.spawn("r0");
    first.wait_ready();
    old.produce(200, 1);
    first.wait_learned(200, LEARN_LIMIT);
    assert!(first.terminate().success(), "a graceful stop writes a final checkpoint");
    // A new, empty update log (a recreated topic, another cluster): the
    // checkpoint's position is beyond its end, and reading on would wait for
    // offsets that new records will reuse.
    let new = Cluster::new("ahead_new", ModelKind::Logistic);
    let mut second = new.replica("r0");
    second.state_dir = first.state_dir.clone();
    second.start();
    let status = second.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(!status.success());
    let log = std::fs::read_to_string(&second.log).unwrap();
    // It announced its settings first, so the new log ends at 1.
    assert!(log.contains("but that log ends at 1"), "{log}");
}

#[test]
fn an_events_topic_recreated_below_the_watermarks_is_reported() {
    let cluster = Cluster::new("recreated", ModelKind::Logistic);
    let mut replica = cluster.spawn("r0");
    replica.wait_ready();
    cluster.produce(800, 1);
    replica.wait_learned(800, LEARN_LIMIT);
    replica.terminate();
    recreate_events_topic(&cluster);
    // About 10 events a partition, where the watermarks are near 100.
    cluster.produce(80, 2);
    replica.start();
    replica.wait_ready();
    wait_for("the replica to report the partitions below their watermarks", LEARN_LIMIT, || {
        (replica.metrics().value("tributary_events_below_watermark_total", "") >= 1.0).then_some(())
    });
    let log = std::fs::read_to_string(&replica.log).unwrap();
    assert!(log.contains("ends below its applied watermark"), "{}", replica.log_tail(20));
}

/// Deletes the cluster's events topic and creates it again, empty.
fn recreate_events_topic(cluster: &Cluster) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let k = &cluster.config.kafka;
    let admin: AdminClient<DefaultClientContext> =
        kafka::base_config(&kafka::Connection::of(k).unwrap(), "test-admin").create().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(admin.delete_topics(&[&k.events_topic], &AdminOptions::new())).unwrap();
    let lister: BaseConsumer =
        kafka::log_reader_config(&kafka::Connection::of(k).unwrap(), "test-lister").create().unwrap();
    wait_for("the events topic to be deleted", LEARN_LIMIT, || {
        let metadata = lister.fetch_metadata(None, Duration::from_secs(5)).ok()?;
        (!metadata.topics().iter().any(|t| t.name() == k.events_topic)).then_some(())
    });
    wait_for("the events topic to be created again", LEARN_LIMIT, || runtime.block_on(kafka::ensure_topics(k)).ok());
}

#[test]
fn a_replica_with_another_learning_rate_refuses_to_join_and_names_it() {
    let mut cluster = Cluster::new("settings", ModelKind::Logistic);
    let steady = cluster.spawn("r0");
    steady.wait_ready();
    cluster.produce(500, 1);
    steady.wait_learned(500, LEARN_LIMIT);
    let fleet_rate = Model::new(&cluster.config.model).unwrap().settings()["model.learning_rate"].clone();
    cluster.config.model.learning_rate = Some(0.1);
    let mut odd = cluster.spawn("r1");
    let status = odd.wait_exit(LEARN_LIMIT).unwrap_or_else(|e| panic!("{e}\n{}", odd.log_tail(20)));
    assert!(!status.success(), "{status}");
    let said = std::fs::read_to_string(&odd.log).unwrap();
    let named = format!("model.learning_rate: 0.1 here, {fleet_rate} in the fleet");
    assert!(said.contains(&named), "{named:?} not in\n{}", odd.log_tail(20));
    // The fleet goes on, every event once, and it said who was configured otherwise.
    cluster.produce(500, 2);
    let info = steady.wait_learned(1000, LEARN_LIMIT);
    assert_eq!(watermark_sum(&info), 1000, "{info}");
    let said = std::fs::read_to_string(&steady.log).unwrap();
    assert!(said.contains("a replica started with other model settings"), "{}", steady.log_tail(20));
}

#[test]
fn records_over_the_size_limit_are_learned_in_smaller_batches() {
    let mut cluster = Cluster::new("record_limit", ModelKind::WideDeep);
    // A batch of 64 events makes a record of about 14 KB (the dense layers'
    // gradient and a few hundred embedding rows); 4 KB holds a handful.
    cluster.config.train.max_record_bytes = 4096;
    let replica = cluster.spawn("r0");
    replica.wait_ready();
    cluster.produce(1500, 1);
    let info = replica.wait_learned(1500, LEARN_LIMIT);
    assert_eq!(watermark_sum(&info), 1500, "{info}");
    assert_eq!(info["examples_skipped"], 0, "{info}");
    assert!(replica.metrics().value("tributary_records_too_large_total", "") >= 1.0);
}

#[test]
fn a_replica_whose_position_was_deleted_from_the_log_stops_applying_and_says_why() {
    let cluster = Cluster::new("trimmed", ModelKind::Logistic);
    let mut early = cluster.spawn("early");
    let steady = cluster.spawn("steady");
    early.wait_ready();
    steady.wait_ready();
    cluster.produce(500, 1);
    early.wait_learned(500, LEARN_LIMIT);
    assert!(early.terminate().success(), "a final checkpoint at its position");
    cluster.produce(500, 2);
    let info = steady.wait_learned(1000, LEARN_LIMIT);
    // Everything the stopped replica has not read is deleted (DeleteRecords).
    let end = info["model_version"].as_i64().unwrap();
    delete_update_log_records_before(&cluster, end);
    early.start();
    wait_for("the replica to say its position is gone", LEARN_LIMIT, || {
        (early.metrics().value("tributary_update_log_stalled", "") == 1.0).then_some(())
    });
    let said = std::fs::read_to_string(&early.log).unwrap();
    assert!(said.contains(&format!("(it starts at {end})")), "{}", early.log_tail(20));
    assert!(!early.is_ready(), "a replica that cannot apply the log is not ready");
    // It still serves its last weights.
    assert_eq!(early.info().unwrap()["examples_learned"], 500);
}

#[test]
fn a_new_replica_bootstraps_from_a_peer_after_the_log_start_moved() {
    let mut cluster = Cluster::new("bootstrap", ModelKind::Logistic);
    cluster.config.checkpoint.peer_token = "the-fleet-peer-token".into();
    let steady = cluster.spawn("steady");
    steady.wait_ready();
    cluster.produce(600, 1);
    steady.wait_learned(600, LEARN_LIMIT);
    // A checkpoint of everything learned (one every 2 s here), then the log
    // before it is deleted: a new replica cannot replay from 0 any more.
    let checkpointed = wait_for("a checkpoint of the 600 events", LEARN_LIMIT, || {
        let (_, body) = steady.get("/v1/models/default/checkpoints")?;
        let newest = serde_json::from_str::<serde_json::Value>(&body).ok()?["checkpoints"][0].clone();
        (newest["examples_learned"].as_u64()? == 600).then(|| newest["position"].as_i64())?
    });
    delete_update_log_records_before(&cluster, checkpointed);
    let (status, _) = steady.get("/v1/models/default/checkpoint").unwrap();
    assert_eq!(status, 401, "a checkpoint goes only to a peer with the token");
    cluster.config.checkpoint.bootstrap_from = format!("http://{}", steady.http);
    let late = cluster.spawn("late");
    assert_joins_alike(&cluster, &steady, &late, 900, "bootstrapped from a peer's checkpoint");
}
