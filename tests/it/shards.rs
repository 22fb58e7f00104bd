//! Shards (docs/design.md section 8a) across real processes: replicas of
//! two shards and a replica of the whole model read one update log on a
//! real broker; predictions are compared bit for bit at equal positions;
//! a shard's replica is killed with SIGKILL under prediction load; a fleet
//! grows from one shard to two.

use std::time::Duration;

use serde_json::Value;
use tributary::config::ModelKind;

use crate::helpers::*;

const LEARN_LIMIT: Duration = Duration::from_secs(180);
const PEER_TOKEN: &str = "test-peer-token-0123456789";

/// Configures `replica` as shard `index` of `fleet.len()`, whose replicas
/// (each shard's, in order) are `fleet`.
fn as_shard(replica: &mut Replica, index: usize, fleet: &[Vec<String>]) {
    let list =
        |urls: &Vec<String>| format!("[{}]", urls.iter().map(|u| format!("{u:?}")).collect::<Vec<_>>().join(", "));
    let lists: Vec<String> = fleet.iter().map(list).collect();
    replica.env.extend([
        ("TRIBUTARY_SHARD__COUNT".to_string(), fleet.len().to_string()),
        ("TRIBUTARY_SHARD__INDEX".to_string(), index.to_string()),
        ("TRIBUTARY_SHARD__REPLICAS".to_string(), format!("[{}]", lists.join(", "))),
    ]);
}

fn url(replica: &Replica) -> String {
    format!("http://{}", replica.http)
}

/// `n` instances of the cluster's fixed schema, from the synthetic stream
/// of seed `seed` (its events without label and time).
fn instances(cluster: &Cluster, n: usize, seed: u64) -> Vec<Value> {
    let mut synthetic = tributary::synthetic::Synthetic::new(&cluster.config.model, seed);
    (0..n)
        .map(|_| {
            let mut event: Value = serde_json::from_str(&synthetic.event(0)).unwrap();
            let fields = event.as_object_mut().unwrap();
            fields.remove("label");
            fields.remove("ts");
            event
        })
        .collect()
}

/// `replica`'s predictions for `instances` (V1) and the answer whole.
fn predict(cluster: &Cluster, replica: &Replica, instances: &[Value]) -> Value {
    let path = format!("/v1/models/{}:predict", cluster.config.model.name);
    let (status, body) = replica.post(&path, None, &serde_json::json!({ "instances": instances }).to_string());
    assert_eq!(status, 200, "{}: {body}\n{}", replica.id, replica.log_tail(20));
    body
}

/// A cluster whose replicas share the peer token the shards gather with.
fn cluster(test: &str) -> Cluster {
    let mut cluster = Cluster::new(test, ModelKind::WideDeep);
    cluster.config.checkpoint.peer_token = PEER_TOKEN.into();
    cluster
}

/// Two shards of two replicas each, and one replica of the whole model that
/// only applies the log: at equal positions, every prediction of every
/// shard's replica is the whole replica's, bit for bit; every event is
/// learned once; twins hold equal weights and the two shards do not. Then a
/// replica of shard 1 is killed with SIGKILL while shard 0's replicas
/// answer predictions (which gather from shard 1): none fails, the hedge
/// goes to its twin; it restarts from its checkpoint and agrees with its
/// twin again, and with the whole replica.
#[test]
fn slow_a_sharded_fleet_predicts_as_one_whole_replica_and_survives_a_sigkill() {
    let cluster = cluster("shards_oracle");
    let mut whole = cluster.replica("whole");
    whole.env.push(("TRIBUTARY_TRAIN__ENABLED".into(), "false".into()));
    let mut fleet: Vec<Replica> = ["a0", "a1", "b0", "b1"].iter().map(|id| cluster.replica(id)).collect();
    let urls: Vec<Vec<String>> = vec![vec![url(&fleet[0]), url(&fleet[1])], vec![url(&fleet[2]), url(&fleet[3])]];
    for (i, replica) in fleet.iter_mut().enumerate() {
        as_shard(replica, i / 2, &urls);
        replica.start();
    }
    whole.start();
    fleet.iter().chain([&whole]).for_each(Replica::wait_ready);

    let labels = cluster.produce(3000, 1);
    let everyone = |fleet: &[Replica]| -> Vec<Value> {
        let all: Vec<&Replica> = fleet.iter().chain([&whole]).collect();
        wait_at_one_version(&all, LEARN_LIMIT)
    };
    fleet.iter().chain([&whole]).for_each(|r| drop(r.wait_learned(3000, LEARN_LIMIT)));
    let infos = everyone(&fleet);
    for info in &infos {
        assert_eq!(watermark_sum(info), 3000, "every event learned once: {info}");
    }
    let digest = |i: usize| infos[i]["weights_digest"].as_str().unwrap().to_string();
    assert_eq!((digest(0), digest(2)), (digest(1), digest(3)), "twins hold the same rows");
    assert_ne!(digest(0), digest(2), "the shards hold different rows");
    let loss = infos[4]["progressive_logloss"].as_f64().unwrap();
    assert!(loss < constant_logloss(&labels), "the sharded fleet learned: {loss}");
    assert_predicts_as_whole(&cluster, &fleet, &whole);

    // Shard 0's replicas answer predictions the whole time; each gathers
    // shard 1's rows from b0 first, from b1 when b0 fails.
    let body = serde_json::json!({ "instances": instances(&cluster, 8, 7) }).to_string();
    let path = format!("/v1/models/{}:predict", cluster.config.model.name);
    let load = PredictionLoad::start(&[fleet[0].http, fleet[1].http], &path, &body);
    wait_for_checkpoint(&fleet[2]);
    let before_kill = load.ok();
    fleet[2].kill();
    cluster.produce(2000, 2);
    for r in [&fleet[0], &fleet[1], &fleet[3], &whole] {
        r.wait_learned(5000, LEARN_LIMIT);
    }
    wait_for("predictions while b0 is dead", Duration::from_secs(30), || (load.ok() > before_kill + 50).then_some(()));
    fleet[2].start();
    fleet[2].wait_learned(5000, LEARN_LIMIT);
    let infos = everyone(&fleet);
    let (ok, errors) = load.stop();
    assert!(errors.is_empty(), "failed predictions at shard 0: {errors:?}");
    let failed_over: f64 =
        (fleet[..2].iter()).map(|r| r.metrics().value("tributary_shard_asks_total", r#"outcome="failed""#)).sum();
    assert!(failed_over > 0.0, "shard 0 asked the dead b0 (its only other shard is 1), and its twin answered");
    assert!(ok > before_kill + 50, "the prediction load ran");
    assert_eq!(infos[2]["weights_digest"], infos[3]["weights_digest"], "b0 agrees with its twin again");
    infos.iter().for_each(|info| assert_eq!(watermark_sum(info), 5000, "{info}"));
    let log = std::fs::read_to_string(&fleet[2].log).unwrap();
    assert!(log.contains("restored checkpoint"), "b0 restarts from its shard's checkpoint");
    assert_predicts_as_whole(&cluster, &fleet, &whole);
}

/// Every replica of `fleet` predicts as `whole` does, bit for bit, over V1
/// and V2 REST.
fn assert_predicts_as_whole(cluster: &Cluster, fleet: &[Replica], whole: &Replica) {
    let instances = instances(cluster, 64, 99);
    let v1 = |r: &Replica| {
        let answer = predict(cluster, r, &instances);
        // A shard's answer is at one version when every shard's rows were.
        let shards = answer["shard_versions"].as_object().map(|s| s.values().cloned().collect::<Vec<_>>());
        let at_one = shards.is_none_or(|s| s.len() == 2 && s.iter().all(|v| *v == answer["model_version"]));
        (if at_one { answer["model_version"].clone() } else { Value::Null }, answer["predictions"].clone())
    };
    assert_alike_at_one_version(fleet, whole, "V1", v1);
    let body = v2_body(&instances).to_string();
    let v2 = |r: &Replica| {
        let (status, answer) = r.post(&format!("/v2/models/{}/infer", cluster.config.model.name), None, &body);
        assert_eq!(status, 200, "{}: {answer}", r.id);
        let version: i64 = answer["model_version"].as_str().unwrap().parse().unwrap();
        (Value::from(version), answer["outputs"][0]["data"].clone())
    };
    assert_alike_at_one_version(fleet, whole, "V2", v2);
}

/// Asks every replica with `ask` (its version and predictions) until all
/// answer at one version (an attestation moves the version without
/// changing a weight), then compares the predictions bit for bit.
fn assert_alike_at_one_version(
    fleet: &[Replica],
    whole: &Replica,
    protocol: &str,
    ask: impl Fn(&Replica) -> (Value, Value),
) {
    let what = format!("every replica to answer {protocol} at one version");
    let (theirs, ours) = wait_for(&what, Duration::from_secs(60), || {
        let theirs = ask(whole);
        let ours: Vec<(Value, Value)> = fleet.iter().map(&ask).collect();
        ours.iter().all(|(version, _)| *version == theirs.0).then_some((theirs, ours))
    });
    for (replica, (_, predictions)) in fleet.iter().zip(&ours) {
        assert_eq!(*predictions, theirs.1, "{protocol}, {}: bit for bit", replica.id);
    }
}

/// The V2 REST request of `instances` of the fixed schema: `dense` FP32
/// [N, dense_dim] and one BYTES [N] input per sparse field.
fn v2_body(instances: &[Value]) -> Value {
    let dense: Vec<Value> = instances.iter().flat_map(|i| i["dense"].as_array().unwrap().clone()).collect();
    let dim = instances[0]["dense"].as_array().unwrap().len();
    let mut inputs =
        vec![serde_json::json!({"name": "dense", "datatype": "FP32", "shape": [instances.len(), dim], "data": dense})];
    for field in instances[0]["sparse"].as_object().unwrap().keys() {
        let values: Vec<Value> = instances.iter().map(|i| i["sparse"][field].clone()).collect();
        inputs
            .push(serde_json::json!({"name": field, "datatype": "BYTES", "shape": [instances.len()], "data": values}));
    }
    serde_json::json!({ "inputs": inputs })
}

/// A fleet of the whole model grows to two shards without stopping: the
/// new replicas start from the old replica's checkpoint (each keeping its
/// rows), apply the same log while events keep coming and the old replica
/// keeps answering, and then predict as it does, bit for bit.
#[test]
fn slow_a_fleet_grows_from_one_shard_to_two_under_load() {
    let cluster = cluster("shards_growth");
    let old = cluster.spawn("old");
    old.wait_ready();
    cluster.produce(2000, 1);
    old.wait_learned(2000, LEARN_LIMIT);
    wait_for_checkpoint(&old);

    let mut new: Vec<Replica> = ["s0", "s1"].iter().map(|id| cluster.replica(id)).collect();
    let urls = vec![vec![url(&new[0])], vec![url(&new[1])]];
    for (i, replica) in new.iter_mut().enumerate() {
        as_shard(replica, i, &urls);
        replica.env.push(("TRIBUTARY_CHECKPOINT__BOOTSTRAP_FROM".into(), url(&old)));
        replica.start();
    }
    // Events keep coming while they join; the old replica keeps learning.
    cluster.produce(1000, 2);
    new.iter().for_each(Replica::wait_ready);
    cluster.produce(1000, 3);
    let everyone: Vec<&Replica> = new.iter().chain([&old]).collect();
    everyone.iter().for_each(|r| drop(r.wait_learned(4000, LEARN_LIMIT)));
    let infos = wait_at_one_version(&everyone, LEARN_LIMIT);
    infos.iter().for_each(|info| assert_eq!(watermark_sum(info), 4000, "{info}"));
    for replica in &new {
        let log = std::fs::read_to_string(&replica.log).unwrap();
        assert!(log.contains("bootstrapped from a peer's checkpoint"), "{}", replica.log_tail(20));
    }
    assert_predicts_as_whole(&cluster, &new, &old);
}
