//! Learning at speed learns as well as learning without staleness (issue
//! 13): the bound the load report's quality scenario measures on 1M events,
//! kept here on a small stream so that a change that lets staleness back in
//! (more records in flight, gradients against old weights, one record per
//! partition) fails the suite rather than a report nobody reads.

use std::time::Duration;

use tributary::config::ModelKind;
use tributary::synthetic::CtrStream;

use crate::helpers::{constant_logloss, Cluster};

/// Events of the stream: enough for the loss to settle well below the
/// constant's, few enough to learn in seconds.
const EVENTS: usize = 30_000;

/// The click-through stream of the load report (hot values, a hidden model
/// that drifts half-way), as JSON lines, and its labels.
fn ctr_events(cluster: &Cluster) -> (Vec<String>, Vec<f32>) {
    let mut stream = CtrStream::new(&cluster.config.model, 13, EVENTS as u64 / 2);
    // Event times a millisecond apart: the trainer merges partitions by them.
    let lines: Vec<String> = (0..EVENTS).map(|i| stream.next_event(1_764_000_000_000 + i as i64).json).collect();
    // The labels as the replica reads them.
    let model = tributary::model::Model::new(&cluster.config.model).expect("a built-in model");
    let labels = lines.iter().map(|l| model.featurizer().event(l.as_bytes()).unwrap().label).collect();
    (lines, labels)
}

/// A replica learns `events` from the start of the cluster's topic; its
/// progressive log-loss once it has learned them all.
fn learned_loss(cluster: &Cluster, id: &str) -> f64 {
    let mut r = cluster.spawn(id);
    let info = r.wait_learned(EVENTS as u64, Duration::from_secs(120));
    r.kill();
    info["progressive_logloss"].as_f64().expect("a progressive loss")
}

#[test]
fn learning_at_speed_is_within_one_percent_of_learning_without_staleness() {
    for kind in [ModelKind::Logistic, ModelKind::WideDeep] {
        let name = format!("{kind:?}").to_lowercase();
        // At speed: the defaults, 8 partitions, a pre-filled backlog.
        let mut at_speed = Cluster::new(&format!("quality-{name}"), kind);
        at_speed.config.train = tributary::config::Config::default().train;
        let (lines, labels) = ctr_events(&at_speed);
        at_speed.produce_payloads(&lines);
        // Without staleness: the same events in order in one partition, one
        // record in flight, each gradient at the weights of the one before.
        let mut sequential = Cluster::new(&format!("quality-{name}-1p"), kind);
        sequential.config.train = at_speed.config.train.clone();
        sequential.config.train.max_in_flight = 1;
        sequential.with_events_partitions(1);
        sequential.produce_payloads(&lines);

        let (fast, slow) = (learned_loss(&at_speed, "at-speed"), learned_loss(&sequential, "sequential"));
        let constant = constant_logloss(&labels);
        eprintln!("{name}: at speed {fast:.4}, without staleness {slow:.4}, constant {constant:.4}");
        assert!(slow < 0.95 * constant, "{name} learns nothing: {slow} against the constant's {constant}");
        assert!(fast <= 1.01 * slow, "{name}: {fast} at speed against {slow} without staleness (bound 1 %)");
    }
}
