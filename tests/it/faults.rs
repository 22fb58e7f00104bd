//! The faults of docs/design.md section 9 that involve the checkpoint store and
//! the broker, each ending with the exactly-once accounting: every event
//! learned once (examples learned = events = sum of watermarks), and
//! replicas that agree.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use tributary::checkpoint::{postgres::Scope, LocalStore, PgStore, Store};
use tributary::config::{CheckpointStore, ModelKind};
use tributary::model::Model;

use crate::helpers::*;

const LEARN_LIMIT: Duration = Duration::from_secs(120);

fn pg_store(cluster: &Cluster, url: &str) -> PgStore {
    let scope = Scope {
        model: cluster.config.model.name.clone(),
        log: cluster.config.kafka.updates_topic.clone(),
        writer: "test".into(),
    };
    PgStore::open(url, scope, 3, Duration::ZERO).unwrap()
}

/// Every checkpoint the store lists loads whole; how many there are.
fn all_load(store: &dyn Store, model: &Model) -> usize {
    let listed = store.list().unwrap();
    for info in &listed {
        if let Err(e) = store.load(model, info) {
            panic!("{} lists a checkpoint that does not load: {e}", store.describe());
        }
    }
    listed.len()
}

/// Kills `r` right after its log says a checkpoint write began.
fn kill_while_writing(cluster: &Cluster, r: &mut Replica, seed: u64) {
    let mark = std::fs::metadata(&r.log).unwrap().len() as usize;
    cluster.produce(500, seed); // the position moves, so a checkpoint comes due
    wait_for(&format!("{} to begin a checkpoint", r.id), Duration::from_secs(60), || {
        let log = std::fs::read(&r.log).ok()?;
        String::from_utf8_lossy(&log[mark.min(log.len())..]).contains("writing checkpoint").then_some(())
    });
    r.kill();
}

#[test]
fn slow_replicas_killed_while_writing_a_snapshot_leave_no_torn_one() {
    let mut cluster = Cluster::new("torn", ModelKind::WideDeep);
    // Big enough that a write takes a while: 32 MiB of weights and slots.
    cluster.config.model.buckets = 1 << 17;
    cluster.config.checkpoint.interval_secs = 1;
    let db = fresh_database("torn");
    let url = &db.url;
    let mut local = cluster.replica("local");
    let mut shared = cluster.replica("pg");
    shared.env.push(("TRIBUTARY_CHECKPOINT_STORE".into(), url.clone()));
    for r in [&mut local, &mut shared] {
        r.start();
        r.wait_ready();
    }
    cluster.produce(2000, 1);
    for r in [&local, &shared] {
        r.wait_learned(2000, LEARN_LIMIT);
    }
    // A whole checkpoint in each store first: the kill then tears the next
    // write, and the one before must still load.
    let model = Model::new(&cluster.config.model).expect("a built-in model");
    wait_for("a checkpoint in each store", Duration::from_secs(30), || {
        let local_has = LocalStore::open(&local.state_dir, 3).ok()?.list().ok()?.len();
        let pg_has = pg_store(&cluster, url).list().ok()?.len();
        (local_has > 0 && pg_has > 0).then_some(())
    });
    kill_while_writing(&cluster, &mut local, 2);
    kill_while_writing(&cluster, &mut shared, 3);

    let half_written: Vec<PathBuf> = (std::fs::read_dir(&local.state_dir).unwrap().flatten())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "tmp"))
        .collect();
    eprintln!("half-written files left by the kill: {half_written:?}");
    assert!(all_load(&LocalStore::open(&local.state_dir, 3).unwrap(), &model) > 0);
    assert!(all_load(&pg_store(&cluster, url), &model) > 0);

    for r in [&mut local, &mut shared] {
        r.start();
    }
    let infos: Vec<Value> = [&local, &shared].iter().map(|r| r.wait_learned(3000, LEARN_LIMIT)).collect();
    for info in &infos {
        assert_eq!(watermark_sum(info), 3000, "{info}");
        assert_eq!(info["weights_digest"], infos[0]["weights_digest"], "{infos:?}");
    }
    for r in [&local, &shared] {
        let log = std::fs::read_to_string(&r.log).unwrap();
        assert!(log.contains("restored checkpoint"), "{} restarts from a whole checkpoint", r.id);
    }
}

#[test]
fn slow_postgres_unreachable_during_training_loses_nothing() {
    let mut cluster = Cluster::new("pgdown", ModelKind::Logistic);
    cluster.config.checkpoint.interval_secs = 1;
    let db = fresh_database("pgdown");
    let url = &db.url;
    let proxy = Proxy::start(&db.addr);
    let via_proxy = url.replacen(&db.addr, &format!("127.0.0.1:{}", proxy.port), 1);
    cluster.config.checkpoint.store = CheckpointStore::try_from(via_proxy).unwrap();
    let mut r = cluster.spawn("r0");
    r.wait_ready();
    cluster.produce(2000, 1);
    r.wait_learned(2000, LEARN_LIMIT);
    let saved =
        |r: &Replica, result: &str| r.metrics().value("tributary_checkpoints_total", &format!("result=\"{result}\""));
    wait_for("a checkpoint in PostgreSQL", Duration::from_secs(30), || (saved(&r, "ok") >= 1.0).then_some(()));

    proxy.cut();
    // Training goes on from the log; snapshots fail and are retried.
    cluster.produce(2000, 2);
    let during = r.wait_learned(4000, LEARN_LIMIT);
    wait_for("a failed checkpoint", Duration::from_secs(60), || (saved(&r, "error") >= 1.0).then_some(()));
    let ok_before = saved(&r, "ok");

    proxy.restore();
    let version = during["model_version"].as_i64().unwrap();
    let store = pg_store(&cluster, url);
    wait_for("snapshots to resume", Duration::from_secs(60), || {
        let newest = store.list().ok()?.first()?.position;
        (saved(&r, "ok") > ok_before && newest >= version).then_some(())
    });

    // The resumed snapshot is a recovery point: a SIGKILL and restart load it.
    r.kill();
    r.start();
    let after = r.wait_learned(4000, LEARN_LIMIT);
    assert_eq!(after["weights_digest"], during["weights_digest"]);
    assert_eq!(watermark_sum(&after), 4000);
    let log = std::fs::read_to_string(&r.log).unwrap();
    assert!(log.contains("checkpoint failed") && log.contains("restored checkpoint"), "{}", r.log_tail(30));
}

#[test]
fn slow_broker_restart_on_durable_storage_resumes_where_it_stopped() {
    // A broker of its own: SIGKILLed, then started again on the same data.
    let mut cluster = Cluster::with_own_brokers("broker_restart", ModelKind::Logistic, 1);
    cluster.config.train.batch_size = 64;
    let r = cluster.spawn("r0");
    r.wait_ready();
    cluster.produce(2000, 1);
    let before = r.wait_learned(2000, LEARN_LIMIT);

    cluster.brokers[0].kill();
    // Serving goes on with the last weights while the broker is away.
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(2) {
        let info = r.info().expect("the replica answers while the broker is down");
        assert_eq!(info["weights_digest"], before["weights_digest"]);
    }
    cluster.brokers[0].restart().unwrap();
    cluster.produce(2000, 2);
    let after = r.wait_learned(4000, LEARN_LIMIT);
    assert_eq!(watermark_sum(&after), 4000, "{after}");
    // A replica started now replays the restored log to the same state.
    let fresh = cluster.spawn("r1");
    let replayed = fresh.wait_learned(4000, LEARN_LIMIT);
    assert_eq!(replayed["weights_digest"], after["weights_digest"]);
}

#[test]
fn slow_a_broker_slow_to_list_offsets_at_start_up_is_asked_again_not_taken_for_an_empty_log() {
    // Every request passes a proxy that can hold the broker's ListOffsets
    // (the watermark query the applier's start-up makes).
    let (cluster, proxy) = Cluster::behind_kafka_proxy("slow_list_offsets", ModelKind::Logistic);
    let mut r = cluster.spawn("r0");
    r.wait_ready();
    cluster.produce(1000, 1);
    r.wait_learned(1000, LEARN_LIMIT);
    assert!(r.terminate().success(), "{}", r.log_tail(20)); // a final checkpoint, position > 0

    // Longer than the 2 s the start-up waits for an answer.
    proxy.hold_list_offsets(Duration::from_secs(5));
    r.start();
    let asked_again = "did not say where the update log ends";
    wait_for("the replica to ask again for the log's end", LEARN_LIMIT, || {
        let log = r.log_tail(400);
        assert!(!log.contains("a role ended"), "the replica refused to start:\n{}", r.log_tail(20));
        log.contains(asked_again).then_some(())
    });
    proxy.hold_list_offsets(Duration::ZERO);
    r.wait_ready();
    cluster.produce(1000, 2);
    let info = r.wait_learned(2000, LEARN_LIMIT);
    assert_eq!(watermark_sum(&info), 2000, "{info}");
    assert!(!r.log_tail(400).contains("the checkpoint is at position"), "{}", r.log_tail(40));
}

#[test]
fn a_fleet_on_postgres_trims_its_update_log_and_a_new_replica_still_joins() {
    let db = fresh_database("trim");
    let mut cluster = Cluster::new("trim", ModelKind::Logistic);
    cluster.config.checkpoint.store = CheckpointStore::try_from(db.url.clone()).unwrap();
    let first = cluster.spawn("r0");
    first.wait_ready();
    cluster.produce(2000, 1);
    first.wait_learned(2000, LEARN_LIMIT);
    // After a checkpoint, the records below the oldest one kept are deleted.
    let start = wait_for("the update log to be trimmed", LEARN_LIMIT, || {
        let start = first.metrics().value("tributary_update_log_start", "");
        (start > 0.0).then_some(start as i64)
    });
    let (_, body) = first.get("/v1/models/default/checkpoints").unwrap();
    let listed: Value = serde_json::from_str(&body).unwrap();
    let oldest = listed["checkpoints"].as_array().unwrap().iter().filter_map(|s| s["position"].as_i64()).min();
    assert!(oldest.is_some_and(|o| start <= o), "the log starts at {start}, the oldest checkpoint is {oldest:?}");
    // A new replica restores a checkpoint from the shared store and agrees.
    let second = cluster.spawn("r1");
    assert_joins_alike(&cluster, &first, &second, 2300, "restored checkpoint");
}

#[test]
fn slow_a_replica_stopped_longer_than_the_fleet_keeps_its_log_catches_up_from_the_store() {
    let db = fresh_database("sigstop");
    let mut cluster = Cluster::new("sigstop", ModelKind::Logistic);
    cluster.config.checkpoint.store = CheckpointStore::try_from(db.url.clone()).unwrap();
    cluster.config.checkpoint.interval_secs = 1;
    let (steady, stopped) = (cluster.spawn("steady"), cluster.spawn("stopped"));
    steady.wait_ready();
    stopped.wait_ready();
    cluster.produce(500, 1);
    steady.wait_learned(500, LEARN_LIMIT);
    stopped.wait_learned(500, LEARN_LIMIT);
    stopped.process().signal(libc::SIGSTOP).unwrap();
    // Its applier may have read on until the signal: the log's end now
    // bounds its position (its served version did not).
    let position = update_log_end(&cluster);
    // The fleet learns on (the stopped one's partitions move once its
    // session times out) and trims its log past the stopped one's position.
    let mut produced = 500;
    let deadline = Instant::now() + LEARN_LIMIT;
    while steady.metrics().value("tributary_update_log_start", "") <= position as f64 {
        assert!(Instant::now() < deadline, "the log was not trimmed past {position}\n{}", steady.log_tail(20));
        cluster.produce(200, produced);
        produced += 200;
        steady.wait_learned(produced, LEARN_LIMIT);
    }
    stopped.process().signal(libc::SIGCONT).unwrap();
    wait_for("the stopped replica to catch up from the store", LEARN_LIMIT, || {
        let log = std::fs::read_to_string(&stopped.log).ok()?;
        log.contains("catching up from the fleet's newest checkpoint").then_some(())
    });
    stopped.wait_ready();
    cluster.produce(300, 99);
    produced += 300;
    for r in [&steady, &stopped] {
        let info = r.wait_learned(produced, LEARN_LIMIT);
        assert_eq!(watermark_sum(&info), produced, "{}: every event learned once: {info}", r.id);
    }
    let infos = wait_at_one_version(&[&steady, &stopped], LEARN_LIMIT);
    assert_eq!(infos[0]["weights_digest"], infos[1]["weights_digest"], "{infos:?}");
    assert_eq!(stopped.metrics().value("tributary_update_log_stalled", ""), 0.0);
}
