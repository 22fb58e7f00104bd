//! Real parts for the fleet tests: a Tansu broker and tributary replicas as
//! child processes, each test with its own broker, topics, group and state
//! directories. Waiting is polling with a deadline, never a bare sleep.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tributary::config::{Config, ModelKind};

/// Polls `f` every 50 ms until it returns `Some`, or panics after `limit`
/// with `what` and the last value seen.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TANSU") {
        return p.into();
    }
    let home = PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo/bin/tansu");
    if home.exists() { home } else { "tansu".into() }
}

/// A Tansu broker on a free port, its topics in memory; killed on drop.
pub struct Broker {
    child: Child,
    pub addr: String,
}

impl Broker {
    pub fn start(dir: &std::path::Path) -> Broker {
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.join("tansu.log")).unwrap();
        let child = Command::new(tansu_bin())
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url, "--storage-engine", "memory://tansu/"])
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("tansu runs (scripts/setup installs it)");
        let addr = format!("127.0.0.1:{port}");
        wait_for("the broker to listen", Duration::from_secs(30), || TcpStream::connect(&addr).ok());
        Broker { child, addr }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One test's world: a broker, a configuration, and a scratch directory.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub broker: Broker,
    pub config: Config,
}

impl Cluster {
    /// A broker and a small model of `kind`; topics and group named after the test.
    pub fn new(test: &str, kind: ModelKind) -> Cluster {
        let dir = tempfile::Builder::new().prefix(&format!("tributary-{test}-")).tempdir().unwrap();
        let broker = Broker::start(dir.path());
        let mut config = Config::default();
        config.model.kind = kind;
        config.model.buckets = 4096;
        config.model.embedding_dim = 8;
        config.model.hidden = vec![16];
        config.kafka.brokers = broker.addr.clone();
        config.kafka.events_topic = format!("events-{test}");
        config.kafka.updates_topic = format!("updates-{test}");
        config.kafka.group_id = format!("group-{test}");
        config.checkpoint.interval_secs = 2;
        config.train.batch_size = 64;
        let cluster = Cluster { dir, broker, config };
        tokio::runtime::Runtime::new().unwrap().block_on(tributary::log::kafka::ensure_topics(&cluster.config.kafka)).unwrap();
        cluster
    }

    /// Produces `n` synthetic events (seed `seed`) spread over the partitions;
    /// returns their labels.
    pub fn produce(&self, n: usize, seed: u64) -> Vec<f32> {
        let mut synthetic = tributary::synthetic::Synthetic::new(&self.config.model, seed);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
        let lines: Vec<String> = (0..n).map(|_| synthetic.event(now)).collect();
        let model = tributary::model::Model::new(&self.config.model);
        let labels = lines.iter().map(|l| model.featurizer().event(l.as_bytes()).unwrap().label).collect();
        let report = tributary::ingest::produce(
            &self.config.kafka.brokers,
            &self.config.kafka.events_topic,
            model.featurizer(),
            Cursor::new(lines.join("\n")),
        )
        .unwrap();
        assert_eq!((report.produced, report.failed, report.invalid), (n as u64, 0, 0));
        labels
    }

    /// Environment that hands this cluster's configuration to a replica.
    fn env(&self) -> Vec<(String, String)> {
        let c = &self.config;
        let kind = serde_json::to_value(c.model.kind).unwrap().as_str().unwrap().to_string();
        vec![
            ("TRIBUTARY_MODEL__KIND".into(), kind),
            ("TRIBUTARY_MODEL__BUCKETS".into(), c.model.buckets.to_string()),
            ("TRIBUTARY_MODEL__EMBEDDING_DIM".into(), c.model.embedding_dim.to_string()),
            ("TRIBUTARY_MODEL__HIDDEN".into(), format!("{:?}", c.model.hidden)),
            ("TRIBUTARY_KAFKA__EVENTS_TOPIC".into(), c.kafka.events_topic.clone()),
            ("TRIBUTARY_KAFKA__UPDATES_TOPIC".into(), c.kafka.updates_topic.clone()),
            ("TRIBUTARY_KAFKA__GROUP_ID".into(), c.kafka.group_id.clone()),
            ("TRIBUTARY_CHECKPOINT__INTERVAL_SECS".into(), c.checkpoint.interval_secs.to_string()),
            ("TRIBUTARY_TRAIN__BATCH_SIZE".into(), c.train.batch_size.to_string()),
            ("TRIBUTARY_TRAIN__ENABLED".into(), c.train.enabled.to_string()),
            ("RUST_LOG".into(), std::env::var("TEST_RUST_LOG").unwrap_or_else(|_| "info,librdkafka=warn".into())),
        ]
    }

    /// Starts replica `id` with its own state directory and HTTP port.
    pub fn spawn(&self, id: &str) -> Replica {
        let mut r = Replica {
            child: None,
            id: id.into(),
            http: SocketAddr::from(([127, 0, 0, 1], free_port())),
            state_dir: self.dir.path().join(format!("state-{id}")),
            log: self.dir.path().join(format!("{id}.log")),
            env: self.env(),
            brokers: self.broker.addr.clone(),
            client: reqwest::blocking::Client::builder().timeout(Duration::from_secs(5)).build().unwrap(),
        };
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

/// A tributary replica process.
pub struct Replica {
    child: Option<Child>,
    pub id: String,
    pub http: SocketAddr,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    env: Vec<(String, String)>,
    brokers: String,
    client: reqwest::blocking::Client,
}

impl Replica {
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} already runs", self.id);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tributary"))
            .arg("serve")
            .args(["--replica-id", &self.id, "--brokers", &self.brokers])
            .args(["--http-addr", &self.http.to_string()])
            .arg("--state-dir")
            .arg(&self.state_dir)
            .envs(self.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }

    /// SIGTERM; returns once the process has exited.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        wait_for("the replica to exit after SIGTERM", Duration::from_secs(60), || child.try_wait().unwrap())
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        let response = self.client.get(self.url(path)).send().ok()?;
        response.json().ok()
    }

    pub fn info(&self) -> Option<Value> {
        self.get("/v1/models/default")
    }

    pub fn wait_ready(&self) {
        wait_for(&format!("{} to be ready (log: {})", self.id, self.log.display()), Duration::from_secs(60), || {
            let r = self.client.get(self.url("/readyz")).send().ok()?;
            r.status().is_success().then_some(())
        });
    }

    /// Waits until the replica reports `examples_learned == n`; returns its info.
    pub fn wait_learned(&self, n: u64, limit: Duration) -> Value {
        let mut last = Value::Null;
        let what = format!("{} to learn {n} examples", self.id);
        let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_for(&what, limit, || {
                let info = self.info()?;
                last = info.clone();
                (info["examples_learned"].as_u64()? == n).then_some(info)
            })
        }));
        found.unwrap_or_else(|_| {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: String = log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
            panic!("{what}: last info {last}\n--- log tail ---\n{tail}")
        })
    }

    pub fn metrics(&self) -> String {
        self.client.get(self.url("/metrics")).send().and_then(|r| r.text()).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A metric's value from Prometheus text, summed over label sets matching `labels`.
pub fn metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The log-loss of always predicting the mean label: what learning must beat.
pub fn constant_logloss(labels: &[f32]) -> f64 {
    let p = labels.iter().map(|&l| f64::from(l)).sum::<f64>() / labels.len() as f64;
    -(p * p.ln() + (1.0 - p) * (1.0 - p).ln())
}

pub fn watermark_sum(info: &Value) -> u64 {
    info["watermarks"].as_object().map_or(0, |m| m.values().filter_map(Value::as_u64).sum())
}

pub fn watermarks(info: &Value) -> BTreeMap<String, u64> {
    info["watermarks"].as_object().map_or_else(BTreeMap::new, |m| m.iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0))).collect())
}
