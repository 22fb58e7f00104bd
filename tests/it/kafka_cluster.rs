//! A three-broker Apache Kafka cluster (KRaft) under a three-replica fleet:
//! the broker that leads the update log is SIGKILLed mid-stream and later
//! restarted, then a broker that leads events partitions is killed. Topics
//! have three copies and `min.insync.replicas` 2, unclean leader election
//! off; tributary's idempotent producers (`acks=all`) and its consumers ride
//! through the leader elections. What must hold: every event learned exactly
//! once, equal digests, no failed prediction; the stall of training at each
//! kill is printed (run with `--no-capture` to read it).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use tributary::config::{Config, ModelKind};
use tributary::produce::{Counting, Delivered};
use tributary::update_log::kafka;

use crate::helpers::*;

const LEARN_LIMIT: Duration = Duration::from_secs(180);

#[test]
fn slow_kafka_cluster_survives_the_death_of_the_update_log_leader_and_of_an_events_leader() {
    let mut cluster = Cluster::with_own_brokers("kafka3", ModelKind::Logistic, 3);
    let replicas = [cluster.spawn("r0"), cluster.spawn("r1"), cluster.spawn("r2")];
    replicas.iter().for_each(Replica::wait_ready);
    let predictions = Predictions::start(replicas.iter().map(|r| r.http).collect(), &cluster.config.model.name);
    let progress = Progress::watch(&replicas[0]);
    let events = EventSource::start(&cluster.config, 1500.0);

    progress.wait_beyond(3000, "learning before the first kill");
    let updates_leader = leader_of(&cluster.config, &cluster.config.kafka.updates_topic)[0];
    let first_kill = Instant::now();
    cluster.brokers[updates_leader].kill();
    let learned_at_kill = progress.latest();
    progress.wait_beyond(learned_at_kill + 3000, "learning after the update log's leader died");
    cluster.brokers[updates_leader].restart().unwrap();
    progress.wait_beyond(progress.latest() + 2000, "learning after the broker came back");

    // The broker that leads the most events partitions now.
    let leaders = leader_of(&cluster.config, &cluster.config.kafka.events_topic);
    let events_leader = (0..cluster.brokers.len()).max_by_key(|b| leaders.iter().filter(|l| *l == b).count()).unwrap();
    let second_kill = Instant::now();
    cluster.brokers[events_leader].kill();
    let learned_at_kill = progress.latest();
    progress.wait_beyond(learned_at_kill + 3000, "learning after an events leader died");

    let (produced, failed) = events.stop();
    assert_eq!(failed, 0, "events the producer saw fail");
    let infos: Vec<_> = replicas.iter().map(|r| r.wait_learned(produced, LEARN_LIMIT)).collect();
    let (ok, errors) = predictions.stop();
    for info in &infos {
        assert_eq!(info["weights_digest"], infos[0]["weights_digest"], "{infos:?}");
        assert_eq!(watermark_sum(info), produced, "examples learned = events produced = sum of watermarks: {info}");
    }
    assert!(ok > 100, "the prediction load ran ({ok} answered)");
    assert!(errors.is_empty(), "failed predictions: {errors:?}");
    let stalls = [("update log leader", first_kill), ("events leader", second_kill)]
        .map(|(what, at)| (what, progress.stall_after(at)));
    eprintln!("kafka cluster: {produced} events learned once by 3 replicas, {ok} predictions, 0 failed; training stalled {stalls:?}");
}

/// The broker (index into the cluster's brokers: node id - 1) that leads
/// each partition of `topic`.
fn leader_of(config: &Config, topic: &str) -> Vec<usize> {
    let consumer: BaseConsumer =
        kafka::base_config(&kafka::Connection::of(&config.kafka).unwrap(), "test-leaders").create().unwrap();
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    metadata.topics()[0].partitions().iter().map(|p| (p.leader() - 1) as usize).collect()
}

/// Synthetic events produced at a steady rate by an idempotent producer,
/// counting what the brokers acknowledged.
struct EventSource {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(u64, u64)>,
}

impl EventSource {
    fn start(config: &Config, per_sec: f64) -> EventSource {
        let stop = Arc::new(AtomicBool::new(false));
        let (k, model) = (config.kafka.clone(), config.model.clone());
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let acks = Arc::new(Delivered::default());
            let producer: ThreadedProducer<Counting> =
                kafka::producer_config(&kafka::Connection::of(&k).unwrap(), "test-events")
                    .create_with_context(Counting(acks.clone()))
                    .unwrap();
            let mut synthetic = tributary::synthetic::Synthetic::new(&model, 7);
            let started = Instant::now();
            let mut sent = 0u64;
            while !stopping.load(Ordering::Relaxed) {
                let due = (started.elapsed().as_secs_f64() * per_sec) as u64;
                while sent < due {
                    let now =
                        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
                    let line = synthetic.event(now);
                    let partition = (sent % k.events_partitions as u64) as i32;
                    let record = BaseRecord::<(), _>::to(&k.events_topic).partition(partition).payload(&line);
                    match producer.send(record) {
                        Ok(()) => sent += 1,
                        Err((e, _)) => panic!("cannot queue an event: {e}"),
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            producer.flush(Duration::from_secs(120)).unwrap();
            (acks.ok.load(Ordering::Relaxed), acks.failed.load(Ordering::Relaxed))
        });
        EventSource { stop, thread }
    }

    /// Stops producing and waits for every acknowledgement: (delivered, failed).
    fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// `examples_learned` of one replica, sampled every 50 ms.
struct Progress {
    samples: Arc<Mutex<Vec<(Instant, u64)>>>,
    stop: Arc<AtomicBool>,
}

impl Progress {
    fn watch(replica: &Replica) -> Progress {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (into, stopping, addr) = (samples.clone(), stop.clone(), replica.http);
        let info_path = format!("/v1/models/{}", replica.model_name);
        std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                let info = procs::http_get(addr, &info_path)
                    .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok());
                if let Some(learned) = info.and_then(|i| i["examples_learned"].as_u64()) {
                    into.lock().unwrap().push((Instant::now(), learned));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Progress { samples, stop }
    }

    fn latest(&self) -> u64 {
        self.samples.lock().unwrap().last().map_or(0, |s| s.1)
    }

    fn wait_beyond(&self, n: u64, what: &str) {
        wait_for(what, LEARN_LIMIT, || (self.latest() >= n).then_some(()));
    }

    /// The longest time without progress among the samples after `at`.
    fn stall_after(&self, at: Instant) -> Duration {
        let samples = self.samples.lock().unwrap();
        let mut last_move = at;
        let mut longest = Duration::ZERO;
        let mut last_value = samples.iter().rev().find(|s| s.0 <= at).map_or(0, |s| s.1);
        for &(t, v) in samples.iter().filter(|s| s.0 > at) {
            if v > last_value {
                longest = longest.max(t - last_move);
                (last_move, last_value) = (t, v);
            }
        }
        longest
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Predictions sent to every replica without pause, one client each.
struct Predictions {
    stop: Arc<AtomicBool>,
    clients: Vec<std::thread::JoinHandle<(u64, Vec<String>)>>,
}

impl Predictions {
    fn start(targets: Vec<std::net::SocketAddr>, model_name: &str) -> Predictions {
        let stop = Arc::new(AtomicBool::new(false));
        let predict_path = format!("/v1/models/{model_name}:predict");
        let clients = targets
            .into_iter()
            .map(|addr| {
                let (stop, predict_path) = (stop.clone(), predict_path.clone());
                std::thread::spawn(move || {
                    let body =
                        r#"{"instances": [{"dense": [0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8], "sparse": {"f0": "v1"}}]}"#;
                    let (mut ok, mut errors) = (0, Vec::new());
                    while !stop.load(Ordering::Relaxed) {
                        match procs::http_post(addr, &predict_path, None, body) {
                            Some((200, _)) => ok += 1,
                            other => errors.push(format!("{addr}: {other:?}")),
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    (ok, errors)
                })
            })
            .collect();
        Predictions { stop, clients }
    }

    /// (answered, failures)
    fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.clients.into_iter().map(|c| c.join().unwrap()).fold((0, Vec::new()), |(n, mut e), (ok, errors)| {
            e.extend(errors);
            (n + ok, e)
        })
    }
}
