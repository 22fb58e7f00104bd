//! Real parts for the fleet tests: Apache Kafka brokers and tributary
//! replicas as child processes (started by `tributary-testkit`, which the
//! load tool shares). Tests share the run's broker (`scripts/test` starts one) unless
//! they kill or restart it; each has its own topics, group and state
//! directories. Waiting is polling with a deadline, never a bare sleep.

use std::collections::BTreeMap;
use std::io::{Cursor, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tributary::config::{Config, ModelKind};
pub use tributary_testkit as procs;
pub use tributary_testkit::{try_wait_for, wait_for, Broker, KafkaCluster, Scrape};

/// The status page's charts, each a series of `history` in `GET /v1/status`.
pub const STATUS_SERIES: [&str; 6] =
    ["model_version", "events_per_sec", "lag", "freshness_p99_seconds", "staleness_p99_records", "progressive_logloss"];

/// The SCRAM users of [`Cluster::secured`]'s broker: the super user, the
/// fleet's principal, and a producer's.
pub const SECURE_USERS: [(&str, &str); 3] =
    [("admin", "admin-secret"), ("fleet", "fleet-secret"), ("producer", "producer-secret")];

/// Grants ACLs on a secured broker as its super user (`scripts/kafka-acls`
/// grants: `User:NAME:OPERATION:RESOURCE:NAME`).
pub fn grant_acls(broker: &Broker, grants: &[String]) {
    let (admin, admin_password) = SECURE_USERS[0];
    let granted = std::process::Command::new(procs::venv_python().expect("the project's virtualenv"))
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kafka-acls"))
        .args(["--bootstrap", &broker.addr, "--ca", &broker.ca().display().to_string()])
        .args(["--user", admin, "--password", admin_password])
        .args(grants)
        .output()
        .unwrap();
    assert!(granted.status.success(), "{}", String::from_utf8_lossy(&granted.stderr));
}

/// The `kafka.client` properties of a client of a secured broker that logs
/// in as `user` with `password` (a value or a `${file:...}` reference).
pub fn secure_client(broker: &Broker, user: &str, password: &str) -> BTreeMap<String, String> {
    [
        ("security.protocol", "SASL_SSL".to_string()),
        ("sasl.mechanisms", "SCRAM-SHA-512".to_string()),
        ("sasl.username", user.to_string()),
        ("sasl.password", password.to_string()),
        ("ssl.ca.location", broker.ca().display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// One test's world: Kafka brokers, a configuration, and a scratch directory.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    /// The run's shared broker, or the test's own (one, or a KRaft cluster).
    pub brokers: Vec<Broker>,
    pub config: Config,
}

impl Cluster {
    /// The run's shared broker and a small model of `kind`; topics and group
    /// named after the test.
    pub fn new(test: &str, kind: ModelKind) -> Cluster {
        let dir = Cluster::scratch(test);
        let broker = Broker::shared_or_start(dir.path()).expect("a Kafka broker (scripts/setup fetches it)");
        Cluster::on(test, kind, dir, vec![broker], BTreeMap::new())
    }

    /// The same on `n` Kafka brokers of its own (one KRaft quorum), for a
    /// test that kills or restarts them. Topics get `min(n, 3)` replicas.
    pub fn with_own_brokers(test: &str, kind: ModelKind, n: u32) -> Cluster {
        let dir = Cluster::scratch(test);
        let brokers = match n {
            1 => vec![Broker::start(dir.path()).expect("a Kafka broker (scripts/setup fetches it)")],
            n => KafkaCluster::start(dir.path(), n).expect("a Kafka cluster (scripts/setup fetches it)").brokers,
        };
        Cluster::on(test, kind, dir, brokers, BTreeMap::new())
    }

    /// One Kafka broker of its own that its clients reach only through a
    /// [`Proxy::kafka`] (the broker advertises the proxy's port), so the
    /// test can slow down the broker's answers.
    pub fn behind_kafka_proxy(test: &str, kind: ModelKind) -> (Cluster, Proxy) {
        let dir = Cluster::scratch(test);
        let listen_port = procs::free_port();
        let proxy = Proxy::kafka(&format!("127.0.0.1:{listen_port}"));
        let broker = Broker::start_advertised(dir.path(), listen_port, proxy.port)
            .expect("a Kafka broker (scripts/setup fetches it)");
        (Cluster::on(test, kind, dir, vec![broker], BTreeMap::new()), proxy)
    }

    /// One Kafka broker of its own whose only client listener is SASL_SSL
    /// (SCRAM-SHA-512, a CA of its own) with ACLs enforced; the fleet's
    /// principal `fleet` may do anything with this test's topics and any
    /// group, and no more; `producer` and `admin` (the super user) exist
    /// too ([`SECURE_USERS`]). The fleet's password is read from a file
    /// (`${file:...}`), as a deployment would keep it.
    pub fn secured(test: &str, kind: ModelKind) -> Cluster {
        let dir = Cluster::scratch(test);
        let broker =
            Broker::start_secure(dir.path(), &SECURE_USERS).expect("a Kafka broker (scripts/setup fetches it)");
        let grants: Vec<String> = ["events", "updates", "dlq"]
            .iter()
            .map(|topic| format!("User:fleet:ALL:topic:{topic}-{test}*"))
            .chain(["User:fleet:ALL:group:*".to_string()])
            .collect();
        grant_acls(&broker, &grants);
        let password = dir.path().join("fleet.password");
        std::fs::write(&password, format!("{}\n", SECURE_USERS[1].1)).unwrap();
        let client = secure_client(&broker, "fleet", &format!("${{file:{}}}", password.display()));
        Cluster::on(test, kind, dir, vec![broker], client)
    }

    fn scratch(test: &str) -> tempfile::TempDir {
        tempfile::Builder::new().prefix(&format!("tributary-{test}-")).tempdir().unwrap()
    }

    fn on(
        test: &str,
        kind: ModelKind,
        dir: tempfile::TempDir,
        brokers: Vec<Broker>,
        client: BTreeMap<String, String>,
    ) -> Cluster {
        // Unique per run too: a shared broker may outlive one run of the suite.
        let test = format!("{test}-{}", std::process::id());
        let mut config = Config::default();
        config.model.kind = kind;
        config.model.buckets = 4096;
        config.model.embedding_dim = 8;
        config.model.hidden = vec![16];
        config.kafka.brokers = brokers.iter().map(|b| b.addr.as_str()).collect::<Vec<_>>().join(",");
        config.kafka.replication_factor = brokers.len().min(3) as i32;
        config.kafka.events_topic = format!("events-{test}");
        config.kafka.dlq_topic = format!("dlq-{test}");
        config.kafka.updates_topic = format!("updates-{test}");
        config.kafka.group_id = format!("group-{test}");
        config.checkpoint.interval_secs = 2;
        config.train.batch_size = 64;
        config.kafka.client = client;
        let cluster = Cluster { dir, brokers, config };
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(tributary::update_log::kafka::ensure_topics(&cluster.config.kafka))
            .unwrap();
        cluster
    }

    /// Moves the cluster to an events topic of its own with `n` partitions.
    pub fn with_events_partitions(&mut self, n: i32) {
        let k = &mut self.config.kafka;
        k.events_partitions = n;
        k.events_topic = format!("{}-{n}p", k.events_topic);
        tokio::runtime::Runtime::new().unwrap().block_on(tributary::update_log::kafka::ensure_topics(k)).unwrap();
    }

    /// Produces `n` synthetic events (seed `seed`) spread over the partitions;
    /// returns their labels.
    pub fn produce(&self, n: usize, seed: u64) -> Vec<f32> {
        let mut synthetic = tributary::synthetic::Synthetic::new(&self.config.model, seed);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
        let lines: Vec<String> = (0..n).map(|_| synthetic.event(now)).collect();
        let model = tributary::model::Model::new(&self.config.model).expect("a built-in model");
        let labels = lines.iter().map(|l| model.featurizer().event(l.as_bytes()).unwrap().label).collect();
        let k = &self.config.kafka;
        let report = tributary::produce::produce(
            k,
            &k.events_topic,
            model.featurizer(),
            Cursor::new(lines.join("\n")),
            &Default::default(),
        )
        .unwrap();
        assert_eq!((report.produced, report.failed, report.invalid), (n as u64, 0, 0));
        labels
    }

    /// Produces JSON `lines` as `tributary produce` does, spread over the
    /// partitions as `partitioning` says (as teams' producers do).
    pub fn produce_lines(&self, lines: &[String], partitioning: &tributary::produce::Partitioning) {
        let model = tributary::model::Model::new(&self.config.model).expect("a built-in model");
        let k = &self.config.kafka;
        let input = Cursor::new(lines.join("\n"));
        let report = tributary::produce::produce(k, &k.events_topic, model.featurizer(), input, partitioning).unwrap();
        assert_eq!((report.produced, report.failed, report.invalid), (lines.len() as u64, 0, 0));
    }

    /// Produces `events` (JSON lines, or any bytes) as they are,
    /// round-robin over the partitions.
    pub fn produce_payloads(&self, events: &[impl AsRef<[u8]>]) {
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        let k = &self.config.kafka;
        let producer: BaseProducer = tributary::update_log::kafka::producer_config(
            &tributary::update_log::kafka::Connection::of(k).unwrap(),
            "test-lines",
        )
        .create()
        .unwrap();
        for (i, payload) in events.iter().enumerate() {
            let record = BaseRecord::<(), _>::to(&k.events_topic)
                .partition(i as i32 % k.events_partitions)
                .payload(payload.as_ref());
            producer.send(record).map_err(|(e, _)| e).unwrap();
            producer.poll(Duration::ZERO);
        }
        producer.flush(Duration::from_secs(30)).unwrap();
    }

    /// The first `n` dead letters: (payload, reason kind, reason), each
    /// checked to name the events topic, partition and offset it came from.
    pub fn dead_letters(&self, n: usize) -> Vec<(Vec<u8>, String, String)> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::message::{Headers, Message};
        use rdkafka::{Offset, TopicPartitionList};
        let k = &self.config.kafka;
        let consumer: BaseConsumer = tributary::update_log::kafka::log_reader_config(
            &tributary::update_log::kafka::Connection::of(k).unwrap(),
            "dlq-reader",
        )
        .create()
        .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&k.dlq_topic, 0, Offset::Beginning).unwrap();
        consumer.assign(&tpl).unwrap();
        let mut letters = Vec::new();
        wait_for("the dead letters", Duration::from_secs(30), || {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                let headers = m.headers().expect("dead letters carry headers");
                let header = |name: &str| {
                    let h = headers.iter().find(|h| h.key == name).unwrap_or_else(|| panic!("no header {name}"));
                    String::from_utf8(h.value.unwrap().to_vec()).unwrap()
                };
                assert_eq!(header("tributary.topic"), k.events_topic);
                assert_eq!(
                    m.key(),
                    Some(format!("{}:{}", header("tributary.partition"), header("tributary.offset")).as_bytes())
                );
                letters.push((
                    m.payload().unwrap().to_vec(),
                    header("tributary.reason_kind"),
                    header("tributary.reason"),
                ));
            }
            (letters.len() >= n).then_some(())
        });
        letters
    }

    /// Environment that hands this cluster's configuration to a replica or
    /// an event stream: the whole `Config`, written out as a file, so every
    /// field a test sets reaches the process. (Per-replica values, such as
    /// its id, HTTP address and state directory, are flags, which win.)
    fn env(&self, id: &str) -> Vec<(String, String)> {
        let path = self.dir.path().join(format!("config-{id}.toml"));
        std::fs::write(&path, toml::to_string(&self.config).expect("a Config serializes")).unwrap();
        vec![
            ("TRIBUTARY_CONFIG".into(), path.display().to_string()),
            ("RUST_LOG".into(), std::env::var("TEST_RUST_LOG").unwrap_or_else(|_| "info,librdkafka=warn".into())),
        ]
    }

    /// Replica `id` with its own state directory and HTTP port, not started.
    pub fn replica(&self, id: &str) -> Replica {
        let bin = Path::new(env!("CARGO_BIN_EXE_tributary"));
        let mut replica = procs::Replica::new(bin, self.dir.path(), id, &self.config.kafka.brokers, self.env(id));
        replica.model_name.clone_from(&self.config.model.name);
        Replica(replica)
    }

    /// Starts replica `id` with its own state directory and HTTP port.
    pub fn spawn(&self, id: &str) -> Replica {
        let mut r = self.replica(id);
        r.start();
        r
    }

    /// Replica `id`, started under [`MEMORY_CAP`]: for tests that send it
    /// input it must refuse, so that a runaway allocation fails the test
    /// instead of taking the machine.
    pub fn spawn_capped(&self, id: &str) -> Replica {
        let mut r = self.replica(id);
        r.memory_cap_bytes = Some(MEMORY_CAP);
        r.start();
        r
    }
}

impl Drop for Cluster {
    /// A failed test keeps its directory (logs, checkpoints) for a post-mortem.
    fn drop(&mut self) {
        if std::thread::panicking() {
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
            eprintln!("test files kept in {}", dir.keep().display());
        }
    }
}

/// A replica process (the load tool's), with conveniences that panic with
/// the replica's log when something does not happen.
pub struct Replica(procs::Replica);

impl Deref for Replica {
    type Target = procs::Replica;
    fn deref(&self) -> &procs::Replica {
        &self.0
    }
}

impl DerefMut for Replica {
    fn deref_mut(&mut self) -> &mut procs::Replica {
        &mut self.0
    }
}

impl Replica {
    pub fn start(&mut self) {
        self.0.start().unwrap();
    }

    /// SIGTERM; returns once the process has exited.
    pub fn terminate(&mut self) -> ExitStatus {
        self.0.terminate().unwrap()
    }

    pub fn wait_ready(&self) {
        if let Err(e) = self.0.wait_ready(Duration::from_secs(60)) {
            panic!("{e}\n--- log tail ---\n{}", self.log_tail(40));
        }
    }

    /// Waits until the replica reports `examples_learned == n`; returns its info.
    pub fn wait_learned(&self, n: u64, limit: Duration) -> Value {
        let mut last = Value::Null;
        let what = format!("{} to learn {n} examples", self.id);
        let found = try_wait_for(&what, limit, || {
            let info = self.info()?;
            last = info.clone();
            (info["examples_learned"].as_u64()? == n).then_some(info)
        });
        found.unwrap_or_else(|e| {
            panic!(
                "{e}: last info {last}\nevents per partition: {:?}\n--- log tail ---\n{}",
                self.event_ends(),
                self.log_tail(40)
            )
        })
    }

    /// The end (high watermark) of every partition of the events topic:
    /// where the watermarks should get to.
    pub fn event_ends(&self) -> Vec<(i32, i64)> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let Some(config) = self.config() else { return Vec::new() };
        let topic = config.kafka.events_topic;
        let consumer: BaseConsumer = tributary::update_log::kafka::log_reader_config(
            &tributary::update_log::kafka::Connection::plain(&self.brokers),
            "test-ends",
        )
        .create()
        .unwrap();
        let Ok(metadata) = consumer.fetch_metadata(Some(&topic), Duration::from_secs(5)) else { return Vec::new() };
        let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len() as i32);
        (0..partitions)
            .filter_map(|p| Some((p, consumer.fetch_watermarks(&topic, p, Duration::from_secs(5)).ok()?.1)))
            .collect()
    }

    /// The configuration the replica was started with.
    pub fn config(&self) -> Option<Config> {
        let (_, path) = self.env.iter().find(|(k, _)| k == "TRIBUTARY_CONFIG")?;
        toml::from_str(&std::fs::read_to_string(path).ok()?).ok()
    }

    /// The replica's metrics. A scrape that fails is tried again rather
    /// than read as an empty scrape, whose zeros would satisfy an assertion
    /// that a counter is 0 without reading it. Panics, with the log's tail,
    /// if the replica does not answer for `SCRAPE_LIMIT`.
    pub fn metrics(&self) -> Scrape {
        try_wait_for(&format!("{} to answer GET /metrics", self.id), SCRAPE_LIMIT, || self.0.metrics())
            .unwrap_or_else(|e| panic!("{e}\n--- log tail ---\n{}", self.log_tail(40)))
    }

    /// `POST path` with a JSON `body` and the bearer `token` (if any):
    /// status and JSON (`Null` if the body is not JSON).
    pub fn post(&self, path: &str, token: Option<&str>, body: &str) -> (u16, Value) {
        let (status, text) = procs::http_post(self.http, path, token, body)
            .unwrap_or_else(|| panic!("{} does not answer POST {path}\n{}", self.id, self.log_tail(20)));
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

/// The address space a replica under hostile input may take: a small
/// model's replica maps about 2.5 GiB (libtorch, the allocator's arenas,
/// thread stacks) and holds a few hundred MiB resident.
pub const MEMORY_CAP: u64 = 6 << 30;

/// A database of its own on the machine's PostgreSQL (`TRIBUTARY_TEST_PG`,
/// default postgres://postgres@127.0.0.1:5432), created afresh, dropped
/// when the test passes (kept for a post-mortem when it fails).
pub struct TestDatabase {
    pub url: String,
    /// The server's `host:port`.
    pub addr: String,
    server: String,
    name: String,
}

impl TestDatabase {
    fn sql(server: &str, sql: &str) -> Result<(), String> {
        let out = std::process::Command::new("psql")
            .args([&format!("{server}/postgres"), "-qc", sql])
            .output()
            .expect("psql");
        out.status.success().then_some(()).ok_or_else(|| format!("{sql}: {}", String::from_utf8_lossy(&out.stderr)))
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test database kept: {}", self.url);
        } else if let Err(e) =
            TestDatabase::sql(&self.server, &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name))
        {
            eprintln!("could not drop the test database: {e}");
        }
    }
}

pub fn fresh_database(name: &str) -> TestDatabase {
    let server = std::env::var("TRIBUTARY_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let db = format!("tributary_it_{name}_{}", std::process::id());
    for sql in [format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"), format!("CREATE DATABASE {db}")] {
        TestDatabase::sql(&server, &sql).unwrap_or_else(|e| panic!("{e}"));
    }
    let addr = server.rsplit('@').next().unwrap_or(&server).trim_end_matches('/').to_string();
    TestDatabase { url: format!("{server}/{db}"), addr, server, name: db }
}

/// The log-loss of always predicting the mean label: what learning must beat.
pub fn constant_logloss(labels: &[f32]) -> f64 {
    let p = labels.iter().map(|&l| f64::from(l)).sum::<f64>() / labels.len() as f64;
    -(p * p.ln() + (1.0 - p) * (1.0 - p).ln())
}

/// Waits until `replicas` report the same model version (a restart appends
/// its settings record, which the others read a moment later); their infos.
pub fn wait_at_one_version(replicas: &[&Replica], limit: Duration) -> Vec<Value> {
    wait_for("the replicas at one version", limit, || {
        let infos: Vec<Value> = replicas.iter().map(|r| r.info()).collect::<Option<_>>()?;
        infos.iter().all(|i| i["model_version"] == infos[0]["model_version"]).then_some(infos)
    })
}

/// A replica that just joined (`new`, started) catches up, learns 300 more
/// events beside `old` until both hold `learned` examples, ends with the
/// same weights, and said `start_line` when it started.
pub fn assert_joins_alike(cluster: &Cluster, old: &Replica, new: &Replica, learned: u64, start_line: &str) {
    const LIMIT: Duration = Duration::from_secs(120);
    new.wait_ready();
    cluster.produce(300, 2);
    old.wait_learned(learned, LIMIT);
    new.wait_learned(learned, LIMIT);
    let infos = wait_at_one_version(&[old, new], LIMIT);
    assert_eq!(infos[0]["weights_digest"], infos[1]["weights_digest"], "{infos:?}");
    let said = std::fs::read_to_string(&new.log).unwrap();
    assert!(said.contains(start_line), "{}", new.log_tail(20));
}

pub fn watermark_sum(info: &Value) -> u64 {
    info["watermarks"].as_object().map_or(0, |m| m.values().filter_map(Value::as_u64).sum())
}

pub fn watermarks(info: &Value) -> BTreeMap<String, u64> {
    info["watermarks"]
        .as_object()
        .map_or_else(BTreeMap::new, |m| m.iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0))).collect())
}

/// A TCP proxy on 127.0.0.1 in front of `target`: a way to make a real
/// server unreachable, or slow, for one test without stopping it for the
/// others. While cut, live connections are shut and new ones closed at once.
pub struct Proxy {
    pub port: u16,
    cut: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<TcpStream>>>,
    /// How long a Kafka ListOffsets request is held before it is passed on
    /// (0: not held); only for [`Proxy::kafka`].
    list_offsets_delay_ms: Arc<AtomicU64>,
}

/// Kafka's API key of ListOffsets (the watermark query).
const LIST_OFFSETS: i16 = 2;

/// How long [`Replica::metrics`] tries to scrape a replica before it fails.
const SCRAPE_LIMIT: Duration = Duration::from_secs(10);

impl Proxy {
    /// Passes bytes through as they are.
    pub fn start(target: &str) -> Proxy {
        Proxy::listen(target, false)
    }

    /// Reads the client's side as Kafka requests (a 4-byte size, then the
    /// request, whose first two bytes are its API key), so that ListOffsets
    /// can be held ([`Proxy::hold_list_offsets`]).
    pub fn kafka(target: &str) -> Proxy {
        Proxy::listen(target, true)
    }

    fn listen(target: &str, kafka_requests: bool) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let proxy = Proxy {
            port,
            cut: Default::default(),
            live: Default::default(),
            list_offsets_delay_ms: Default::default(),
        };
        let (cut, live, delay, target) =
            (proxy.cut.clone(), proxy.live.clone(), proxy.list_offsets_delay_ms.clone(), target.to_string());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if cut.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let Ok(server) = TcpStream::connect(&target) else { continue };
                let mut streams = live.lock().unwrap();
                streams.push(client.try_clone().unwrap());
                streams.push(server.try_clone().unwrap());
                let (mut from_client, mut to_server) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let delay = delay.clone();
                std::thread::spawn(move || {
                    let _ = match kafka_requests {
                        true => copy_kafka_requests(&mut from_client, &mut to_server, &delay),
                        false => std::io::copy(&mut from_client, &mut to_server).map(drop),
                    };
                    let _ = to_server.shutdown(Shutdown::Both);
                });
                let (mut from_server, mut to_client) = (server, client);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from_server, &mut to_client);
                    let _ = to_client.shutdown(Shutdown::Both);
                });
            }
        });
        proxy
    }

    /// Unreachable from now on, until [`Proxy::restore`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in self.live.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    /// Holds every ListOffsets request `delay` before passing it on (and the
    /// requests behind it on its connection); `Duration::ZERO` stops that.
    pub fn hold_list_offsets(&self, delay: Duration) {
        self.list_offsets_delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }
}

/// Copies Kafka requests from `from` to `to` one whole request at a time,
/// holding each ListOffsets for the delay `delay_ms` says at that moment.
fn copy_kafka_requests(from: &mut TcpStream, to: &mut TcpStream, delay_ms: &AtomicU64) -> std::io::Result<()> {
    let mut size = [0u8; 4];
    loop {
        from.read_exact(&mut size)?;
        let mut request = vec![0u8; i32::from_be_bytes(size).max(0) as usize];
        from.read_exact(&mut request)?;
        let api_key = request.get(..2).map(|k| i16::from_be_bytes([k[0], k[1]]));
        let delay = delay_ms.load(Ordering::SeqCst);
        if api_key == Some(LIST_OFFSETS) && delay > 0 {
            std::thread::sleep(Duration::from_millis(delay)); // the fault itself, not a wait on a condition
        }
        to.write_all(&size)?;
        to.write_all(&request)?;
    }
}

/// The update log's end (its high watermark): no replica can have applied
/// beyond it.
pub fn update_log_end(cluster: &Cluster) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let k = &cluster.config.kafka;
    let connection = tributary::update_log::kafka::Connection::of(k).unwrap();
    let consumer: BaseConsumer =
        tributary::update_log::kafka::log_reader_config(&connection, "test-log-end").create().unwrap();
    consumer.fetch_watermarks(&k.updates_topic, 0, Duration::from_secs(5)).unwrap().1
}

/// Deletes the update log's records before `offset` (Kafka DeleteRecords):
/// what retention or trimming does to a log.
pub fn delete_update_log_records_before(cluster: &Cluster, offset: i64) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::{Offset, TopicPartitionList};
    let k = &cluster.config.kafka;
    let admin: AdminClient<DefaultClientContext> = tributary::update_log::kafka::base_config(
        &tributary::update_log::kafka::Connection::of(k).unwrap(),
        "test-admin",
    )
    .create()
    .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&k.updates_topic, 0, Offset::Offset(offset)).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let deleted = runtime.block_on(admin.delete_records(&tpl, &AdminOptions::new())).unwrap();
    assert!(deleted.elements().iter().all(|e| e.error().is_ok()), "{deleted:?}");
}

/// Predictions sent to each of some replicas, one after the other on a
/// thread per replica, until stopped: how many were answered 200, and how
/// the others failed.
pub struct PredictionLoad {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    clients: Vec<std::thread::JoinHandle<Vec<String>>>,
}

impl PredictionLoad {
    /// `POST path` with `body` to every address of `targets`, each in a loop.
    pub fn start(targets: &[std::net::SocketAddr], path: &str, body: &str) -> PredictionLoad {
        let (stop, ok, failed) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::default());
        let clients = (targets.iter())
            .map(|&addr| {
                let (stop, ok, failed): (_, _, Arc<AtomicU64>) = (stop.clone(), ok.clone(), Arc::clone(&failed));
                let (path, body) = (path.to_string(), body.to_string());
                std::thread::spawn(move || {
                    let mut errors = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        match procs::http_post(addr, &path, None, &body) {
                            Some((200, _)) => ok.fetch_add(1, Ordering::Relaxed),
                            other => {
                                errors.push(format!("{other:?}"));
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                    errors
                })
            })
            .collect();
        PredictionLoad { stop, ok, failed, clients }
    }

    /// Predictions answered 200 so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops the clients: predictions answered 200, and every failure.
    pub fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let errors: Vec<String> = self.clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
        assert_eq!(errors.len() as u64, self.failed.load(Ordering::Relaxed));
        (self.ok.load(Ordering::Relaxed), errors)
    }
}

/// Waits until `replica` has written a checkpoint to its state directory.
pub fn wait_for_checkpoint(replica: &Replica) {
    wait_for(&format!("a checkpoint of {}", replica.id), Duration::from_secs(60), || {
        let saved = std::fs::read_dir(&replica.state_dir).ok()?.flatten();
        saved.into_iter().any(|e| e.file_name().to_string_lossy().ends_with(".bin")).then_some(())
    });
}
