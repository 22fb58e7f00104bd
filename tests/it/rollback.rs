//! Rollback through the update log, asked over the admin API or by the
//! divergence guard, on real replicas against a real broker.

use std::time::Duration;

use serde_json::Value;
use tributary::checkpoint::{LocalStore, Store};
use tributary::config::ModelKind;

use crate::helpers::*;

const LEARN_LIMIT: Duration = Duration::from_secs(120);
const TOKEN: &str = "test-admin-token-0123456789";

fn rollback_body(to: Value, events: &str) -> String {
    serde_json::json!({ "to_version": to, "events": events }).to_string()
}

#[test]
fn rollback_asked_on_one_replica_returns_all_three_to_the_same_state() {
    let mut cluster = Cluster::new("rollback", ModelKind::Logistic);
    cluster.config.http.admin_token = TOKEN.into();
    cluster.config.guard.enabled = false;
    let replicas = [cluster.spawn("r0"), cluster.spawn("r1"), cluster.spawn("r2")];
    replicas.iter().for_each(Replica::wait_ready);
    cluster.produce(3000, 1);
    let at_q: Vec<Value> = replicas.iter().map(|r| r.wait_learned(3000, LEARN_LIMIT)).collect();
    let q = at_q[0]["model_version"].as_i64().unwrap();
    assert!(at_q.iter().all(|i| i["weights_digest"] == at_q[0]["weights_digest"]), "{at_q:?}");
    cluster.produce(3000, 2);
    let before: Vec<Value> = replicas.iter().map(|r| r.wait_learned(6000, LEARN_LIMIT)).collect();
    let path = "/v1/models/default/rollback";

    // Without the token, or with a wrong one: 401, and nothing changes.
    let (status, body) = replicas[1].post(path, None, &rollback_body(q.into(), "skip"));
    assert_eq!(status, 401, "{body}");
    let (status, body) = replicas[1].post(path, Some("not-the-admin-token-at-all"), &rollback_body(q.into(), "skip"));
    assert_eq!(status, 401, "{body}");
    let (status, body) = replicas[1].post(path, Some(TOKEN), &rollback_body("yesterday".into(), "skip"));
    assert_eq!(status, 400, "{body}");
    let (status, body) = replicas[1].post(path, Some(TOKEN), r#"{"to_version": 1}"#);
    assert_eq!(status, 400, "events is required: {body}");
    // Refused requests append nothing. (The version may move meanwhile by a
    // checkpoint's attestation: the count of rollbacks read is the witness.)
    for r in &replicas {
        assert_eq!(r.metrics().value("tributary_rollbacks_total", ""), 0.0, "{}", r.id);
    }
    assert_eq!(replicas[1].info().unwrap()["examples_learned"], before[1]["examples_learned"]);
    assert_eq!(replicas[1].metrics().value("tributary_admin_denied_total", ""), 2.0);

    // Skip: back to the weights at q on all three; the events since stay consumed.
    let (status, body) = replicas[1].post(path, Some(TOKEN), &rollback_body(q.into(), "skip"));
    assert_eq!(status, 200, "{body}");
    assert_eq!((body["taken"].as_bool(), body["examples_undone"].as_u64()), (Some(true), Some(3000)), "{body}");
    let after_skip = body["model_version"].as_i64().unwrap();
    for r in &replicas {
        let info = wait_for(&format!("{} to take the rollback", r.id), LEARN_LIMIT, || {
            let info = r.info()?;
            (info["model_version"].as_i64()? >= after_skip).then_some(info)
        });
        assert_eq!(info["weights_digest"], at_q[0]["weights_digest"], "{}: {info}", r.id);
        assert_eq!(info["examples_learned"], 3000, "{}: {info}", r.id);
        assert_eq!(watermark_sum(&info), 6000, "{}: skipped events are not learned again", r.id);
        assert_eq!(r.metrics().value("tributary_rollbacks_total", "events=\"skip\""), 1.0, "{}", r.id);
        assert_replay_bounded_by_a_checkpoint(r, q);
    }

    // Relearn, asked on another replica: the watermarks return to q's too,
    // and every event since q is learned again, exactly once.
    cluster.produce(1000, 3);
    replicas.iter().for_each(|r| drop(r.wait_learned(4000, LEARN_LIMIT)));
    let (status, body) = replicas[2].post(path, Some(TOKEN), &rollback_body(q.into(), "relearn"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["taken"], true, "{body}");
    // Each has learned every event; then they are compared at one version
    // (a record that moves no watermark, an attestation, may still come
    // between one replica's answer and the next's).
    replicas.iter().for_each(|r| drop(r.wait_learned(7000, LEARN_LIMIT)));
    let infos = wait_at_one_version(&replicas.iter().collect::<Vec<_>>(), LEARN_LIMIT);
    for (r, info) in replicas.iter().zip(&infos) {
        assert_eq!(watermark_sum(info), 7000, "{}: {info}", r.id);
        assert_eq!(info["model_version"], infos[0]["model_version"], "{infos:?}");
        assert_eq!(info["weights_digest"], infos[0]["weights_digest"], "{infos:?}");
        assert_eq!(r.metrics().value("tributary_rollbacks_total", ""), 2.0, "{}", r.id);
        // Each trainer read again from the watermarks as soon as its applier
        // took a rollback, not after its record in flight went stale.
        let log = std::fs::read_to_string(&r.log).unwrap();
        assert!(log.contains("jumped=true"), "{}", r.log_tail(30));
    }
}

/// A rollback to `q` replays the log from the newest checkpoint at or
/// before `q` that the replica had, not from the seed: at most the distance
/// from the newest one it still lists (its store only thins out since).
fn assert_replay_bounded_by_a_checkpoint(r: &Replica, q: i64) {
    let replayed = r.metrics().value("tributary_rollback_replayed_records_sum", "");
    let listed = LocalStore::open(&r.state_dir, 3).unwrap().list().unwrap();
    let newest_at_or_before_q = listed.iter().map(|c| c.position).filter(|&p| p <= q).max().unwrap_or(0);
    eprintln!("{}: rollback to {q} replayed {replayed} records (newest checkpoint listed at or before it: {newest_at_or_before_q})", r.id);
    assert!(replayed <= (q - newest_at_or_before_q) as f64, "{}: replayed {replayed}, q {q}, {listed:?}", r.id);
}

#[test]
fn a_poisoned_stream_triggers_one_automatic_rollback() {
    let mut cluster = Cluster::new("guard", ModelKind::Logistic);
    cluster.config.guard.warmup_examples = 2000;
    let replicas = [cluster.spawn("r0"), cluster.spawn("r1")];
    replicas.iter().for_each(Replica::wait_ready);
    cluster.produce(4000, 1);
    replicas.iter().for_each(|r| drop(r.wait_learned(4000, LEARN_LIMIT)));
    // Poison: the same kind of events with inputs scaled up and labels
    // flipped, so the model's confident answers are wrong.
    let mut synthetic = tributary::synthetic::Synthetic::new(&cluster.config.model, 2);
    let poison: Vec<String> = (0..1500).map(|_| tributary::synthetic::poisoned(&synthetic.event(1)).unwrap()).collect();
    cluster.produce_payloads(&poison);
    // The rollback counter moves before the rolled-back state is served:
    // wait for served weights past the rollback's own log position.
    for r in &replicas {
        wait_for(&format!("{} to serve the rollback and consume the poison", r.id), LEARN_LIMIT, || {
            let at = rolled_back_at(&std::fs::read_to_string(&r.log).ok()?)?;
            let info = r.info()?;
            (info["model_version"].as_i64()? > at && watermark_sum(&info) == 5500).then_some(())
        });
    }
    // Both past the rollback; at one version, one state.
    let infos = wait_at_one_version(&[&replicas[0], &replicas[1]], LEARN_LIMIT);
    assert_eq!(infos[0]["weights_digest"], infos[1]["weights_digest"], "{infos:?}");
    // Each detection asks from a task of its own, which lists the store and
    // asks the broker before it appends: with several records of poison in
    // flight a replica detects more than once, and a request may land after
    // the rollback. Wait until every request asked so far has been read.
    let superseded = |r: &Replica| r.metrics().value("tributary_records_rejected_total", "reason=\"superseded\"");
    let detected = wait_for("every rollback request to be read", LEARN_LIMIT, || {
        let detected: f64 =
            replicas.iter().map(|r| r.metrics().value("tributary_divergences_detected_total", "")).sum();
        replicas.iter().all(|r| superseded(r) >= detected - 1.0).then_some(detected)
    });
    assert!(detected >= 1.0, "the guard fired");
    for r in &replicas {
        let m = r.metrics();
        assert_eq!(
            m.value("tributary_rollbacks_total", "events=\"skip\""),
            1.0,
            "{}: one rollback, however many asked",
            r.id
        );
        // Every request beyond the first was superseded by it.
        assert_eq!(m.value("tributary_records_rejected_total", "reason=\"superseded\""), detected - 1.0, "{}", r.id);
        let log = std::fs::read_to_string(&r.log).unwrap();
        let said: Vec<&str> = log.lines().filter(|l| l.contains("spiked") || l.contains("rolled back")).collect();
        eprintln!("{}: {said:#?}", r.id);
        assert!(log.contains("rolled back"), "{}", r.id);
    }
    let learned = infos[0]["examples_learned"].as_u64().unwrap();
    assert!(learned < 5500, "the poison learned before the rollback is undone: {learned}");
}

/// The update-log offset of the first rollback a replica's log says it took
/// (`rolled back ... at=N`).
fn rolled_back_at(log: &str) -> Option<i64> {
    let line = log.lines().find(|l| l.contains("rolled back"))?;
    let at = line.split_whitespace().find_map(|field| field.strip_prefix("at="))?;
    at.parse().ok()
}

#[test]
fn a_rollback_no_checkpoint_and_log_can_rebuild_is_refused_with_the_oldest_reachable() {
    let mut cluster = Cluster::new("unreachable", ModelKind::Logistic);
    cluster.config.http.admin_token = TOKEN.into();
    cluster.config.guard.enabled = false;
    // No checkpoint while the test runs: a checkpoint appends its
    // attestation, which would move the version the test holds still.
    cluster.config.checkpoint.interval_secs = 3600;
    let replica = cluster.spawn("r0");
    replica.wait_ready();
    cluster.produce(500, 1);
    let info = replica.wait_learned(500, LEARN_LIMIT);
    let end = info["model_version"].as_i64().unwrap();
    delete_update_log_records_before(&cluster, end);
    let (status, body) = replica.post("/v1/models/default/rollback", Some(TOKEN), &rollback_body(1.into(), "skip"));
    assert_eq!(status, 409, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains(&format!("the update log starts at {end}")), "{error}");
    assert!(error.contains("the oldest version that can be reached is"), "{error}");
    // Nothing was appended: the version did not move.
    assert_eq!(replica.info().unwrap()["model_version"], end);
}

#[test]
fn a_rollback_a_replica_cannot_rebuild_stops_it_saying_why_and_the_fleet_learns_on() {
    let mut cluster = Cluster::new("rollback-gone", ModelKind::Logistic);
    cluster.config.http.admin_token = TOKEN.into();
    cluster.config.guard.enabled = false;
    let (steady, mut away) = (cluster.spawn("steady"), cluster.spawn("away"));
    steady.wait_ready();
    away.wait_ready();
    cluster.produce(500, 1);
    steady.wait_learned(500, LEARN_LIMIT);
    away.wait_learned(500, LEARN_LIMIT);
    assert!(away.terminate().success(), "a final checkpoint at its position");
    // Its position is its final checkpoint's, read from its store: the
    // fleet's version moves on by the attestations checkpoints append.
    let newest = LocalStore::open(&away.state_dir, 3).unwrap().list().unwrap();
    let position = newest.first().expect("the final checkpoint").position;
    // A rollback to the first version, which the whole log rebuilds: taken
    // where the log is whole.
    let (status, body) = steady.post("/v1/models/default/rollback", Some(TOKEN), &rollback_body(1.into(), "skip"));
    assert_eq!(status, 200, "{body}");
    let rollback_offset = body["rollback_offset"].as_i64().unwrap();
    // Then the log below the stopped replica's position is deleted: it can
    // read on up to the rollback record, but no longer rebuild its target.
    delete_update_log_records_before(&cluster, position);
    away.start();
    wait_for("the replica to stop at the rollback", LEARN_LIMIT, || {
        (away.metrics().value("tributary_update_log_stalled", "") == 1.0).then_some(())
    });
    let said = std::fs::read_to_string(&away.log).unwrap();
    assert!(
        said.contains(&format!("cannot take the rollback at update-log offset {rollback_offset}")),
        "{}",
        away.log_tail(20)
    );
    assert!(said.contains(&format!("(it starts at {position})")), "{}", away.log_tail(20));
    assert!(!away.is_ready());
    // Its trainer left the group: the fleet learns every new event.
    let before = steady.info().unwrap()["examples_learned"].as_u64().unwrap();
    cluster.produce(300, 2);
    steady.wait_learned(before + 300, LEARN_LIMIT);
}
