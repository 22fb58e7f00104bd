//! The scenarios of the load report, each on its own Apache Kafka broker with real
//! replica processes. Figures that depend on the machine are reported as
//! ratios against a baseline measured in the same run where one exists.
//!
//! One table names them ([`SCENARIOS`]); each theme has its file:
//! `serving` (baseline, predict, protocols), `learning` (learn_rate,
//! event_formats, freshness), `quality` (quality against a sequential
//! learner and Vowpal Wabbit, stream shapes), `faults` (the guard, chaos,
//! failover, recovery), `shards` (a sharded fleet against a whole replica),
//! `feedback` (predictions logged for the join with late labels), `join`
//! (learning from late labels: quality, join rate, freshness, memory).
//! Here: the bench they share and its helpers.

mod faults;
mod feedback;
mod join;
mod learning;
mod quality;
mod serving;
mod shards;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;

use crate::driver::{self, proto, GrpcPlan, Outcome, Plan};
use crate::report::{Goal, Report};
use tributary_testkit::{free_port, histogram_quantile, try_wait_for, Broker, EventStream, Proc, Replica, StreamSpec};

/// One prediction of the default model's schema, as every scenario sends it.
pub const PREDICT_BODY: &str =
    r#"{"instances":[{"dense":[0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8],"sparse":{"f0":"v1","f1":"v7","f2":"v3","f3":"v9"}}]}"#;
pub const PREDICT_PATH: &str = "/v1/models/default:predict";
/// Keep-alive connections of the load driver.
const CONNECTIONS: usize = 32;
const READY_LIMIT: Duration = Duration::from_secs(120);

/// A scenario: its name (for `--only`) and what runs it.
pub struct Scenario {
    pub name: &'static str,
    run: fn(&mut Bench) -> anyhow::Result<()>,
}

/// Every scenario, in the order a full run takes them.
pub const SCENARIOS: [Scenario; 15] = [
    Scenario { name: "baseline", run: Bench::baseline },
    Scenario { name: "predict", run: Bench::predict },
    Scenario { name: "protocols", run: Bench::protocols },
    Scenario { name: "learn_rate", run: Bench::learn_rate },
    Scenario { name: "event_formats", run: Bench::event_formats },
    Scenario { name: "quality", run: Bench::quality },
    Scenario { name: "shapes", run: Bench::shapes },
    Scenario { name: "guard", run: Bench::guard },
    Scenario { name: "freshness", run: Bench::freshness },
    Scenario { name: "chaos", run: Bench::chaos },
    Scenario { name: "failover", run: Bench::failover },
    Scenario { name: "recovery", run: Bench::recovery },
    Scenario { name: "shards", run: Bench::shards },
    Scenario { name: "feedback", run: Bench::feedback },
    Scenario { name: "join", run: Bench::join },
];

/// The scenarios' names, in order.
pub fn all() -> Vec<&'static str> {
    SCENARIOS.iter().map(|s| s.name).collect()
}
/// The CI smoke run: a few seconds each, asserting no errors.
pub const SMOKE: [&str; 2] = ["baseline", "predict"];

pub struct Bench {
    pub tributary: PathBuf,
    /// This program, which serves the hello-world baseline (`load hello`).
    pub hello: PathBuf,
    /// Logs and state of every process, one directory per scenario.
    pub work: PathBuf,
    pub smoke: bool,
    pub report: Report,
    rt: tokio::runtime::Runtime,
    baseline_rps: Option<f64>,
    predict_max_rps: Option<f64>,
    /// The hello-world server, kept for later comparisons at equal rates.
    hello_server: Option<(Proc, SocketAddr)>,
}

impl Bench {
    pub fn new(
        tributary: PathBuf,
        hello: PathBuf,
        work: PathBuf,
        smoke: bool,
        report: Report,
    ) -> anyhow::Result<Bench> {
        anyhow::ensure!(tributary.exists(), "no tributary binary at {} (cargo build --release)", tributary.display());
        Ok(Bench {
            tributary,
            hello,
            work,
            smoke,
            report,
            rt: tokio::runtime::Runtime::new()?,
            baseline_rps: None,
            predict_max_rps: None,
            hello_server: None,
        })
    }

    pub fn run(&mut self, name: &str) -> anyhow::Result<()> {
        match SCENARIOS.iter().find(|s| s.name == name) {
            Some(scenario) => (scenario.run)(self),
            None => anyhow::bail!("no scenario {name:?}; there are {}", all().join(", ")),
        }
    }

    /// Every request that failed, over all scenarios run so far.
    pub fn errors(&self) -> Vec<String> {
        self.report
            .findings
            .iter()
            .filter(|f| f.measure.starts_with("failed requests") && f.value > 0.0)
            .map(|f| format!("{}: {}", f.scenario, f.value))
            .collect()
    }

    /// Full run or smoke run: the seconds a measurement lasts.
    fn secs(&self, full: f64, smoke: f64) -> Duration {
        Duration::from_secs_f64(if self.smoke { smoke } else { full })
    }

    fn dir(&self, scenario: &str) -> anyhow::Result<PathBuf> {
        let dir = self.work.join(scenario);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    fn drive(&self, targets: Vec<SocketAddr>, rate: Option<f64>, duration: Duration) -> Outcome {
        self.rt.block_on(driver::run(plan(targets, rate, duration)))
    }

    /// A replica started and ready.
    fn ready_replica(&self, dir: &Path, id: &str, broker: &Broker, env: &[(&str, String)]) -> anyhow::Result<Replica> {
        let mut r = self.replica(dir, id, broker, env);
        r.start_ready(READY_LIMIT)?;
        Ok(r)
    }

    fn replica(&self, dir: &Path, id: &str, broker: &Broker, env: &[(&str, String)]) -> Replica {
        // LOAD_REPLICA_LOG overrides the replicas' log filter, for a post-mortem.
        let filter = std::env::var("LOAD_REPLICA_LOG").unwrap_or_else(|_| "info,librdkafka=warn".into());
        let mut vars: Vec<(String, String)> = vec![("RUST_LOG".into(), filter)];
        vars.extend(env.iter().map(|(k, v)| (format!("TRIBUTARY_{k}"), v.clone())));
        Replica::new(&self.tributary, dir, id, &broker.addr, vars)
    }

    fn stream(
        &self,
        dir: &Path,
        broker: &Broker,
        rate: Option<f64>,
        count: Option<u64>,
    ) -> anyhow::Result<EventStream> {
        let spec = StreamSpec { topic: "events", rate, count, ..StreamSpec::default() };
        EventStream::start(&self.tributary, &broker.addr, &spec, &dir.join("produce.log"))
    }
}

fn plan(targets: Vec<SocketAddr>, rate: Option<f64>, duration: Duration) -> Plan {
    Plan {
        targets,
        path: PREDICT_PATH.into(),
        body: Bytes::from_static(PREDICT_BODY.as_bytes()),
        connections: CONNECTIONS,
        rate,
        duration,
        stop: None,
    }
}

fn merge(acc: &mut Option<Outcome>, out: Outcome) {
    match acc {
        Some(a) => a.merge(&out),
        None => *acc = Some(out),
    }
}

fn examples(r: &Replica) -> Option<u64> {
    r.info()?["examples_learned"].as_u64()
}

fn version(r: &Replica) -> anyhow::Result<i64> {
    r.info().and_then(|i| i["model_version"].as_i64()).ok_or_else(|| anyhow::anyhow!("no model info from {}", r.id))
}

/// Waits for the first applied record. Read from the metrics, not the model
/// info, which describes the served snapshot (frozen when swaps are off).
fn wait_learning(r: &Replica) -> anyhow::Result<()> {
    try_wait_for(&format!("{} to learn (log: {})", r.id, r.log.display()), Duration::from_secs(120), || {
        (r.metrics()?.value("tributary_examples_learned_total", "") > 0.0).then_some(())
    })
}

/// Waits until `r` has applied `n` events over all partitions (its
/// watermarks' sum): unlike the example count, a rollback that skips events
/// does not take it back.
fn wait_watermarks(r: &Replica, n: u64, limit: Duration) -> anyhow::Result<()> {
    try_wait_for(&format!("{} to apply {n} events (log: {})", r.id, r.log.display()), limit, || {
        let info = r.info()?;
        let sum: u64 = info["watermarks"].as_object()?.values().filter_map(serde_json::Value::as_u64).sum();
        (sum >= n).then_some(())
    })
}

fn wait_examples(r: &Replica, n: u64, limit: Duration) -> anyhow::Result<()> {
    try_wait_for(&format!("{} to learn {n} examples (log: {})", r.id, r.log.display()), limit, || {
        (examples(r)? >= n).then_some(())
    })
}

/// Examples learned per second from the first learned batch to the `n`th
/// example: start-up and the group join are not counted.
fn learned_rate(r: &Replica, n: u64, limit: Duration) -> anyhow::Result<f64> {
    let mut first: Option<(Instant, u64)> = None;
    try_wait_for(&format!("{} to learn {n} examples", r.id), limit, || {
        let learned = examples(r)?;
        if learned > 0 && first.is_none() {
            first = Some((Instant::now(), learned));
        }
        (learned >= n).then_some(())
    })?;
    let (t0, l0) = first.expect("set before the end");
    Ok((n - l0) as f64 / t0.elapsed().as_secs_f64().max(1e-3))
}

/// Settings of a replica of `kind` that learns a counted stream on an update
/// log and consumer group of its own (named `id`), guard off: a rollback
/// that skips events would leave the count short.
fn counted_learner(kind: &str, id: &str) -> Vec<(&'static str, String)> {
    vec![
        ("MODEL__KIND", kind.into()),
        ("KAFKA__UPDATES_TOPIC", format!("updates-{id}")),
        ("KAFKA__GROUP_ID", id.into()),
        ("GUARD__ENABLED", "false".into()),
    ]
}
