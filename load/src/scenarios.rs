//! The scenarios of the load report, each on its own Apache Kafka broker with real
//! replica processes. Figures that depend on the machine are reported as
//! ratios against a baseline measured in the same run where one exists.

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
use crate::procs::{free_port, histogram_quantile, try_wait_for, Broker, EventStream, Proc, Replica, StreamSpec};
use crate::report::{Goal, Report};

/// One prediction of the default model's schema, as every scenario sends it.
pub const PREDICT_BODY: &str =
    r#"{"instances":[{"dense":[0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8],"sparse":{"f0":"v1","f1":"v7","f2":"v3","f3":"v9"}}]}"#;
pub const PREDICT_PATH: &str = "/v1/models/default:predict";
/// The same instance as an Open Inference Protocol (KServe V2) request.
const INFER_BODY: &str = r#"{"inputs":[{"name":"dense","shape":[1,8],"datatype":"FP32","data":[0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8]},{"name":"f0","shape":[1],"datatype":"BYTES","data":["v1"]},{"name":"f1","shape":[1],"datatype":"BYTES","data":["v7"]},{"name":"f2","shape":[1],"datatype":"BYTES","data":["v3"]},{"name":"f3","shape":[1],"datatype":"BYTES","data":["v9"]}]}"#;
const INFER_PATH: &str = "/v2/models/default/infer";
/// Events per `POST /v1/events` request in the protocols scenario.
const EVENTS_PER_POST: usize = 100;
/// Keep-alive connections of the load driver.
const CONNECTIONS: usize = 32;
const READY_LIMIT: Duration = Duration::from_secs(120);

pub const ALL: [&str; 12] = [
    "baseline",
    "predict",
    "protocols",
    "learn_rate",
    "event_formats",
    "quality",
    "shapes",
    "guard",
    "freshness",
    "chaos",
    "failover",
    "recovery",
];
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
        match name {
            "baseline" => self.baseline(),
            "predict" => self.predict(),
            "protocols" => self.protocols(),
            "learn_rate" => self.learn_rate(),
            "event_formats" => self.event_formats(),
            "quality" => self.quality(),
            "shapes" => self.shapes(),
            "guard" => self.guard(),
            "freshness" => self.freshness(),
            "chaos" => self.chaos(),
            "failover" => self.failover(),
            "recovery" => self.recovery(),
            other => anyhow::bail!("no scenario {other:?}; there are {}", ALL.join(", ")),
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

    /// An axum hello-world that reads the same body: what HTTP on this machine can do.
    fn baseline(&mut self) -> anyhow::Result<()> {
        let dir = self.dir("baseline")?;
        let port = free_port();
        let hello = Proc::spawn(
            Command::new(&self.hello).args(["hello", "--port", &port.to_string()]),
            &dir.join("hello.log"),
        )?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        try_wait_for("the hello-world server", Duration::from_secs(10), || TcpStream::connect(addr).ok())?;
        self.hello_server = Some((hello, addr));
        let out = self.drive(vec![addr], None, self.secs(10.0, 1.0));
        let s = out.summary();
        self.report.add("baseline", "hello-world requests/s, as fast as answered", s.requests_per_sec, Goal::None);
        self.report.add("baseline", "failed requests", out.error_count() as f64, Goal::AtMost(0.0));
        self.baseline_rps = Some(s.requests_per_sec);
        self.report.detail("baseline", s);
        Ok(())
    }

    /// One replica of the default model, training on a steady stream:
    /// throughput against the baseline, then p99 at half that rate with 20
    /// swaps/s, interleaved with a twin replica whose swaps are off.
    fn predict(&mut self) -> anyhow::Result<()> {
        let dir = self.dir("predict")?;
        let broker = Broker::start(&dir)?;
        let a = self.ready_replica(&dir, "swapping", &broker, &[])?;
        let stream = self.stream(&dir, &broker, Some(if self.smoke { 300.0 } else { 2000.0 }), None)?;
        wait_learning(&a)?;

        let max = self.drive(vec![a.http], None, self.secs(10.0, 1.0));
        let rps = max.summary().requests_per_sec;
        self.predict_max_rps = Some(rps);
        self.report.add("predict", "requests/s, as fast as answered, training on", rps, Goal::None);
        if let Some(base) = self.baseline_rps {
            self.report.add("predict", "requests/s as a share of hello-world's", rps / base, Goal::AtLeast(0.5));
        }
        let mut errors = max.error_count();

        // The twin: same stream, its own update log and group, swaps off.
        let mut b = self.replica(
            &dir,
            "frozen",
            &broker,
            &[
                ("APPLY__MAX_SWAPS_PER_SEC", "0".into()),
                ("KAFKA__UPDATES_TOPIC", "updates-frozen".into()),
                ("KAFKA__GROUP_ID", "frozen".into()),
            ],
        );
        let rounds = if self.smoke { 1 } else { 5 };
        if !self.smoke {
            b.start_ready(READY_LIMIT)?;
            wait_learning(&b)?;
        }
        let window = self.secs(3.0, 1.0);
        let before = a.metrics().ok_or_else(|| anyhow::anyhow!("no metrics from {}", a.id))?;
        let measuring = Instant::now();
        let (mut swapping, mut frozen): (Option<Outcome>, Option<Outcome>) = (None, None);
        for _ in 0..rounds {
            merge(&mut swapping, self.drive(vec![a.http], Some(rps / 2.0), window));
            if b.is_running() {
                merge(&mut frozen, self.drive(vec![b.http], Some(rps / 2.0), window));
            }
        }
        let after = a.metrics().ok_or_else(|| anyhow::anyhow!("no metrics from {}", a.id))?;
        let swapping = swapping.expect("at least one round");
        // What the machine gives any axum server at that rate, for context.
        let hello = self.hello_server.as_ref().map(|(_, addr)| self.drive(vec![*addr], Some(rps / 2.0), window));
        if let Some(hello) = &hello {
            self.report.add("predict", "hello-world p99 (ms) at the same rate", hello.quantile_ms(0.99), Goal::None);
        }
        let swaps_per_sec = (after.value("tributary_swaps_total", "") - before.value("tributary_swaps_total", ""))
            / measuring.elapsed().as_secs_f64();
        self.report.add("predict", "swaps/s of the swapping replica while measuring", swaps_per_sec, Goal::None);
        self.report.add(
            "predict",
            "p99 (ms) at half the max rate, 20 swaps/s",
            swapping.quantile_ms(0.99),
            Goal::AtMost(2.0),
        );
        errors += swapping.error_count();
        if let Some(frozen) = &frozen {
            self.report.add(
                "predict",
                "p99 (ms) at half the max rate, swaps off",
                frozen.quantile_ms(0.99),
                Goal::None,
            );
            self.report.add(
                "predict",
                "p99 with 20 swaps/s over p99 with swaps off",
                swapping.quantile_ms(0.99) / frozen.quantile_ms(0.99),
                Goal::AtMost(1.2),
            );
            errors += frozen.error_count();
        }
        self.report.add("predict", "failed requests", errors as f64, Goal::AtMost(0.0));
        self.report.detail(
            "predict",
            json!({
                "max": max.summary(),
                "half_rate_swapping": swapping.summary(),
                "half_rate_frozen": frozen.map(|f| f.summary()),
                "half_rate_hello": hello.map(|h| h.summary()),
            }),
        );
        stream.stop();
        Ok(())
    }

    /// The other ways in, against KServe V1 predict on the same replica in
    /// the same run: the same instance through KServe V2 infer, and
    /// training events posted to `/v1/events` (then every accepted event
    /// must be learned, once).
    fn protocols(&mut self) -> anyhow::Result<()> {
        let dir = self.dir("protocols")?;
        let broker = Broker::start(&dir)?;
        let grpc_addr = format!("127.0.0.1:{}", free_port());
        let env = [("MODEL__KIND", "logistic".into()), ("GRPC__ADDR", grpc_addr.clone())];
        let r = self.ready_replica(&dir, "r0", &broker, &env)?;
        let window = self.secs(5.0, 1.0);
        let run = |path: &str, body: String| {
            let plan = Plan { path: path.into(), body: Bytes::from(body), ..plan(vec![r.http], None, window) };
            self.rt.block_on(driver::run(plan))
        };
        let v1 = run(PREDICT_PATH, PREDICT_BODY.into());
        let v2 = run(INFER_PATH, INFER_BODY.into());
        let grpc_plan = GrpcPlan {
            target: format!("http://{grpc_addr}"),
            request: infer_request(),
            connections: CONNECTIONS,
            duration: window,
        };
        let grpc = self.rt.block_on(driver::run_grpc(grpc_plan));
        let (v1s, v2s, grpcs) = (v1.summary(), v2.summary(), grpc.summary());
        self.report.add("protocols", "V1 predict requests/s, as fast as answered", v1s.requests_per_sec, Goal::None);
        self.report.add(
            "protocols",
            "V2 infer requests/s over V1 predict's",
            v2s.requests_per_sec / v1s.requests_per_sec,
            Goal::AtLeast(0.8),
        );
        self.report.add(
            "protocols",
            "V2 gRPC ModelInfer requests/s over V2 HTTP infer's (raw tensors, 32 HTTP/2 connections)",
            grpcs.requests_per_sec / v2s.requests_per_sec,
            Goal::None,
        );
        self.report.add("protocols", "V2 HTTP infer p99 (ms)", v2s.p99_ms, Goal::None);
        self.report.add("protocols", "V2 gRPC ModelInfer p99 (ms)", grpcs.p99_ms, Goal::None);
        let event = r#"{"dense":[0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8],"sparse":{"f0":"v1","f1":["v7","v8"]},"label":1}"#;
        let batch = format!(r#"{{"events":[{}]}}"#, vec![event; EVENTS_PER_POST].join(","));
        let before = examples(&r).unwrap_or(0);
        let posted = run("/v1/events", batch);
        let ps = posted.summary();
        let accepted = posted.ok * EVENTS_PER_POST as u64;
        self.report.add(
            "protocols",
            "events/s accepted by POST /v1/events (100 a request, acks=all)",
            accepted as f64 / posted.elapsed.as_secs_f64(),
            Goal::None,
        );
        self.report.add("protocols", "POST /v1/events p99 (ms)", ps.p99_ms, Goal::None);
        wait_examples(&r, before + accepted, Duration::from_secs(300))?;
        let learned = examples(&r).unwrap_or(0) - before;
        self.report.add(
            "protocols",
            "events learned over events accepted",
            learned as f64 / accepted.max(1) as f64,
            Goal::AtMost(1.0),
        );
        let errors = v1.error_count() + v2.error_count() + grpc.error_count() + posted.error_count();
        self.report.add("protocols", "failed requests", errors as f64, Goal::AtMost(0.0));
        self.report.detail(
            "protocols",
            json!({"v1_predict": v1s, "v2_infer": v2s, "v2_grpc_infer": grpcs, "post_events": ps}),
        );
        Ok(())
    }

    /// `logistic` learning a pre-filled topic, alone and then with
    /// predictions at half the measured max rate; then `wide_deep` alone.
    fn learn_rate(&mut self) -> anyhow::Result<()> {
        let dir = self.dir("learn_rate")?;
        let broker = Broker::start(&dir)?;
        let n: u64 = if self.smoke { 20_000 } else { 1_000_000 };
        let fill = Instant::now();
        self.stream(&dir, &broker, None, Some(n))?.finish(Duration::from_secs(900))?;
        let fill_rate = n as f64 / fill.elapsed().as_secs_f64();
        self.report.add("learn_rate", "pre-fill: events/s produced by tributary produce", fill_rate, Goal::None);

        let half = self.predict_max_rps.unwrap_or(2000.0) / 2.0;
        let mut rates = Vec::new();
        let runs = [
            ("logistic-alone", "logistic", false),
            ("logistic-with-predictions", "logistic", true),
            ("wide_deep-alone", "wide_deep", false),
        ];
        for (id, kind, predict) in runs {
            // What the speed costs in quality is the progressive log-loss
            // reported beside the rate.
            let mut r = self.ready_replica(&dir, id, &broker, &counted_learner(kind, id))?;
            let stop = Arc::new(AtomicBool::new(false));
            let load = predict.then(|| {
                let mut plan = plan(vec![r.http], Some(half), Duration::from_secs(900));
                plan.stop = Some(stop.clone());
                self.rt.spawn(driver::run(plan))
            });
            let rate = learned_rate(&r, n, Duration::from_secs(900))?;
            stop.store(true, Ordering::Relaxed);
            let loss = r.info().and_then(|i| i["progressive_logloss"].as_f64()).unwrap_or(f64::NAN);
            self.report.add("learn_rate", &format!("{id}: progressive log-loss over the {n} events"), loss, Goal::None);
            if let Some(m) = r.metrics() {
                let q = |q| m.quantile("tributary_record_round_trip_seconds", q).map_or(f64::NAN, |s| s * 1000.0);
                self.report.add(
                    "learn_rate",
                    &format!("{id}: record sent to applied p50 (ms, bucket bound)"),
                    q(0.5),
                    Goal::None,
                );
                self.report.add(
                    "learn_rate",
                    &format!("{id}: record sent to applied p99 (ms, bucket bound)"),
                    q(0.99),
                    Goal::None,
                );
                // Where a record's cycle goes: the mean of each stage.
                for stage in ["merge", "gradient", "send", "applied", "served", "starved"] {
                    let label = format!("stage=\"{stage}\"");
                    let sum = m.value("tributary_trainer_stage_seconds_sum", &label);
                    let count = m.value("tributary_trainer_stage_seconds_count", &label);
                    let name = format!("{id}: trainer stage {stage}, mean per record (ms)");
                    self.report.add("learn_rate", &name, 1000.0 * sum / count.max(1.0), Goal::None);
                }
                let swaps = m.value("tributary_swap_duration_seconds_count", "").max(1.0);
                let swap_ms = 1000.0 * m.value("tributary_swap_duration_seconds_sum", "") / swaps;
                self.report.add("learn_rate", &format!("{id}: swap, mean (ms)"), swap_ms, Goal::None);
                let full = m.value("tributary_swap_full_copies_total", "");
                self.report.add("learn_rate", &format!("{id}: swaps that copied the whole model"), full, Goal::None);
            }
            if let Some(load) = load {
                let out = self.rt.block_on(load)?;
                self.report.add("learn_rate", "failed requests", out.error_count() as f64, Goal::AtMost(0.0));
            }
            r.kill();
            rates.push(rate);
        }
        self.report.add(
            "learn_rate",
            "events learned/s, logistic, pre-filled topic",
            rates[0],
            Goal::AtLeast(300_000.0),
        );
        self.report.add(
            "learn_rate",
            "with predictions at half load / without",
            rates[1] / rates[0],
            Goal::AtLeast(0.7),
        );
        self.report.add("learn_rate", "events learned/s, wide_deep, pre-filled topic", rates[2], Goal::None);
        self.report.detail(
            "learn_rate",
            json!({"events": n, "fill_rate": fill_rate, "logistic": rates[0], "logistic_with_predictions": rates[1], "wide_deep": rates[2], "predict_rate": half}),
        );
        Ok(())
    }

    /// The same synthetic events pre-filled twice, as JSON and as Avro in the
    /// Confluent wire format (`tributary produce --format avro` with
    /// config/event.avsc), each learned by a `logistic` replica of its own:
    /// what decoding Avro costs or saves in events learned per second.
    fn event_formats(&mut self) -> anyhow::Result<()> {
        let dir = self.dir("event_formats")?;
        let broker = Broker::start(&dir)?;
        let n: u64 = if self.smoke { 20_000 } else { 300_000 };
        let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/event.avsc").display().to_string();
        let mut rates = Vec::new();
        for format in ["json", "avro"] {
            let topic = format!("events-{format}");
            let env = [
                ("TRIBUTARY_KAFKA__EVENT_FORMAT".to_string(), format.to_string()),
                ("TRIBUTARY_KAFKA__AVRO_SCHEMA".to_string(), schema.clone()),
            ];
            let log = dir.join(format!("produce-{format}.log"));
            let spec = StreamSpec { topic: &topic, count: Some(n), env: &env, ..StreamSpec::default() };
            EventStream::start(&self.tributary, &broker.addr, &spec, &log)?.finish(Duration::from_secs(900))?;
            let mut settings = counted_learner("logistic", format);
            settings.extend([
                ("KAFKA__EVENTS_TOPIC", topic),
                ("KAFKA__EVENT_FORMAT", format.into()),
                ("KAFKA__AVRO_SCHEMA", schema.clone()),
            ]);
            let mut r = self.ready_replica(&dir, format, &broker, &settings)?;
            let rate = learned_rate(&r, n, Duration::from_secs(900))?;
            let loss = r.info().and_then(|i| i["progressive_logloss"].as_f64()).unwrap_or(f64::NAN);
            let name = format!("{format}: progressive log-loss over the {n} events");
            self.report.add("event_formats", &name, loss, Goal::None);
            r.kill();
            rates.push(rate);
        }
        self.report.add("event_formats", "JSON events learned/s, logistic, pre-filled topic", rates[0], Goal::None);
        self.report.add("event_formats", "Avro events learned/s over JSON's", rates[1] / rates[0], Goal::AtLeast(0.9));
        self.report.detail("event_formats", json!({"events": n, "json": rates[0], "avro": rates[1]}));
        Ok(())
    }

    /// Learning quality at speed, on the held-out click-through
    /// stream (`tributary generate --stream ctr`: hot values, a hidden model
    /// that drifts half-way), pre-filled twice: into 8 partitions, and into
    /// one. Each model kind learns it with the defaults, with one and three
    /// replicas, and without staleness (1 partition, 1 record in flight,
    /// the gradient after each record's swap); Vowpal Wabbit
    /// (`--loss_function logistic -b 20`, from the project's virtualenv)
    /// learns the same events from their VW text. Progressive log-loss
    /// beside events/s for each, and the constant predictor's loss.
    fn quality(&mut self) -> anyhow::Result<()> {
        let dir = self.dir("quality")?;
        let broker = Broker::start(&dir)?;
        let n: u64 = if self.smoke { 20_000 } else { 1_000_000 };
        let vw_file = dir.join("events.vw");
        let ctr = |vw: bool| {
            let mut args: Vec<String> = ["--stream", "ctr", "--seed", "13"].map(String::from).to_vec();
            if vw {
                args.extend(["--vw".to_string(), vw_file.display().to_string()]);
            }
            args
        };
        let n_live: u64 = if self.smoke { 5_000 } else { 200_000 };
        for (topic, partitions, count, vw) in
            [("events", 8, n, true), ("events-1p", 1, n, false), ("events-live-1p", 1, n_live, false)]
        {
            let env = [("TRIBUTARY_KAFKA__EVENTS_PARTITIONS".to_string(), partitions.to_string())];
            let log = dir.join(format!("produce-{topic}.log"));
            let generate = ctr(vw);
            let spec =
                StreamSpec { topic, count: Some(count), env: &env, generate: &generate, ..StreamSpec::default() };
            EventStream::start(&self.tributary, &broker.addr, &spec, &log)?.finish(Duration::from_secs(900))?;
        }
        let mut rows = serde_json::Map::new();
        for run in quality_runs(self.smoke) {
            let id = format!("{}-{}", run.kind, run.label.replace([' ', ','], "-"));
            let count = if run.live.is_some() || run.topic == "events-live-1p" { n_live } else { n };
            let stream = run.live.map(|rate| (rate, ctr(false)));
            let outcome = self.quality_run(&dir, &broker, count, &id, &run, stream)?;
            let name = format!("{}, {}", run.kind, run.label);
            self.report.add("quality", &format!("{name}: events learned/s"), outcome.rate, Goal::None);
            self.report.add("quality", &format!("{name}: progressive log-loss"), outcome.loss, Goal::None);
            let staleness = format!("{name}: staleness p99 (records, bucket bound)");
            self.report.add("quality", &staleness, outcome.staleness_p99, Goal::None);
            if run.live.is_some() {
                let freshness = format!("{name}: freshness p99 (ms, bucket bound)");
                self.report.add("quality", &freshness, outcome.freshness_p99_ms, Goal::AtMost(100.0));
            }
            rows.insert(id, serde_json::to_value(&outcome)?);
        }
        let loss = |id: &str| rows.get(id).and_then(|r| r["loss"].as_f64()).unwrap_or(f64::NAN);
        for kind in ["logistic", "wide_deep"] {
            let comparisons = [
                ("from a backlog, 1 replica", "defaults", "no-staleness"),
                ("from a backlog, 3 replicas", "3-replicas", "no-staleness"),
                ("live, 1 replica", "live-1-replica", "live-no-staleness"),
                ("live, 3 replicas", "live-3-replicas", "live-no-staleness"),
            ];
            for (label, at_speed, sequential) in comparisons {
                let ratio = loss(&format!("{kind}-{at_speed}")) / loss(&format!("{kind}-{sequential}"));
                let name = format!("{kind}: log-loss {label}, over without staleness");
                self.report.add("quality", &name, ratio, Goal::AtMost(1.01));
            }
        }
        let vw = vowpal_wabbit(&vw_file)?;
        let get = |k: &str| vw[k].as_f64().unwrap_or(f64::NAN);
        self.report.add(
            "quality",
            "Vowpal Wabbit: events learned/s (one core, from a file)",
            get("events_per_sec"),
            Goal::None,
        );
        self.report.add("quality", "Vowpal Wabbit: progressive log-loss", get("progressive_logloss"), Goal::None);
        self.report.add("quality", "best constant prediction: log-loss", get("constant_logloss"), Goal::None);
        let vw_loss = get("progressive_logloss");
        self.report.add(
            "quality",
            "logistic at speed over VW: log-loss",
            loss("logistic-defaults") / vw_loss,
            Goal::AtMost(1.0),
        );
        self.report.add(
            "quality",
            "wide_deep at speed over VW: log-loss",
            loss("wide_deep-defaults") / vw_loss,
            Goal::AtMost(1.0),
        );
        rows.insert("vowpal_wabbit".into(), vw);
        self.report.detail("quality", json!({"events": n, "runs": rows}));
        Ok(())
    }

    /// Order on every stream: the `clicks` stream (Zipf users and
    /// ads, few hot values) and the `ctr` stream (many rare values), each
    /// drifting half-way, produced into 8 partitions as teams' producers do
    /// (keyless sticky, a partition per message, keyed by user), with and
    /// without `ts`. One replica at the defaults learns each; the baseline is
    /// the same events in production order in one partition, learned
    /// without staleness (a stream's events are the same with or without
    /// `ts`, which no model reads). Vowpal Wabbit learns the `clicks` events.
    fn shapes(&mut self) -> anyhow::Result<()> {
        let dir = self.dir("shapes")?;
        let broker = Broker::start(&dir)?;
        let n: u64 = if self.smoke { 20_000 } else { 1_000_000 };
        let vw_file = dir.join("clicks.vw");
        let produce = |topic: &str, partitions: u32, stream: &str, shape: &Shape, vw: bool| -> anyhow::Result<()> {
            let env = [("TRIBUTARY_KAFKA__EVENTS_PARTITIONS".to_string(), partitions.to_string())];
            let mut generate: Vec<String> = ["--stream", stream, "--seed", "17"].map(String::from).to_vec();
            if !shape.ts {
                generate.push("--no-ts".into());
            }
            if vw {
                generate.extend(["--vw".to_string(), vw_file.display().to_string()]);
            }
            let partitioning = ["--partitioning".to_string(), shape.partitioning.to_string()];
            let log = dir.join(format!("produce-{topic}.log"));
            let spec = StreamSpec {
                topic,
                count: Some(n),
                env: &env,
                generate: &generate,
                produce: &partitioning,
                rate: None,
            };
            EventStream::start(&self.tributary, &broker.addr, &spec, &log)?.finish(Duration::from_secs(900))
        };
        for stream in ["clicks", "ctr"] {
            let in_order = Shape { partitioning: "sticky", ts: true };
            produce(&format!("{stream}-1p"), 1, stream, &in_order, stream == "clicks")?;
        }
        // LOAD_SHAPES=keyed keeps the shapes whose topic names it (a probe).
        let only_shapes = std::env::var("LOAD_SHAPES").unwrap_or_default();
        let shapes: Vec<&StreamShape> = SHAPES.iter().filter(|s| s.topic().contains(&only_shapes)).collect();
        for shape in &shapes {
            produce(&shape.topic(), 8, shape.stream, &shape.shape, false)?;
        }
        let mut rows = serde_json::Map::new();
        for kind in quality_kinds(self.smoke) {
            let mut in_order = HashMap::new();
            for stream in ["clicks", "ctr"] {
                let run = QualityRun {
                    kind,
                    label: "in order",
                    topic: format!("{stream}-1p"),
                    replicas: 1,
                    live: None,
                    env: vec![("TRAIN__MAX_IN_FLIGHT", "1")],
                };
                let outcome = self.quality_run(&dir, &broker, n, &format!("{kind}-{stream}-1p"), &run, None)?;
                let name = format!("{kind}, {stream} in order in one partition");
                self.report.add("shapes", &format!("{name}: progressive log-loss"), outcome.loss, Goal::None);
                in_order.insert(stream, outcome.loss);
                rows.insert(format!("{kind}-{stream}-1p"), serde_json::to_value(&outcome)?);
            }
            for shape in &shapes {
                let topic = shape.topic();
                let run =
                    QualityRun { kind, label: "defaults", topic: topic.clone(), replicas: 1, live: None, env: vec![] };
                let outcome = self.quality_run(&dir, &broker, n, &format!("{kind}-{topic}"), &run, None)?;
                let name = format!("{kind}, {topic}");
                self.report.add("shapes", &format!("{name}: events learned/s"), outcome.rate, Goal::None);
                let ratio = outcome.loss / in_order[shape.stream];
                self.report.add("shapes", &format!("{name}: log-loss over in order"), ratio, Goal::AtMost(1.01));
                rows.insert(format!("{kind}-{topic}"), serde_json::to_value(&outcome)?);
            }
        }
        let vw = vowpal_wabbit(&vw_file)?;
        let loss = vw["progressive_logloss"].as_f64().unwrap_or(f64::NAN);
        self.report.add("shapes", "Vowpal Wabbit, clicks: progressive log-loss", loss, Goal::None);
        rows.insert("vowpal_wabbit_clicks".into(), vw);
        self.report.detail("shapes", json!({"events": n, "runs": rows}));
        Ok(())
    }

    /// One run of the quality scenario: `run.replicas` replicas learn the
    /// pre-filled topic from the start, or, with `live` (a rate and the
    /// generator's arguments), a stream of `n` events produced at that rate
    /// once they are ready. What the first replica reports once it has
    /// learned `n` events.
    fn quality_run(
        &self,
        dir: &Path,
        broker: &Broker,
        n: u64,
        id: &str,
        run: &QualityRun,
        live: Option<(f64, Vec<String>)>,
    ) -> anyhow::Result<QualityOutcome> {
        let mut env = counted_learner(run.kind, id);
        env.extend(run.env.iter().map(|(k, v)| (*k, v.to_string())));
        // LOAD_QUALITY_ENV="MODEL__OPTIMIZER=ftrl,TRAIN__BATCH_SIZE=1024"
        // tries other settings on every run.
        let extra = std::env::var("LOAD_QUALITY_ENV").unwrap_or_default();
        env.extend(extra.split(',').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k, v.to_string())));
        let topic = if live.is_some() { format!("live-{id}") } else { run.topic.to_string() };
        env.push(("KAFKA__EVENTS_TOPIC", topic.clone()));
        let mut fleet = Vec::new();
        for i in 0..run.replicas {
            fleet.push(self.ready_replica(dir, &format!("{id}-{i}"), broker, &env)?);
        }
        let stream = match &live {
            Some((rate, args)) => {
                let log = dir.join(format!("produce-{topic}.log"));
                let spec = StreamSpec {
                    topic: &topic,
                    rate: Some(*rate),
                    count: Some(n),
                    generate: args,
                    ..StreamSpec::default()
                };
                Some(EventStream::start(&self.tributary, &broker.addr, &spec, &log)?)
            }
            None => None,
        };
        let rate = learned_rate(&fleet[0], n, Duration::from_secs(1800))?;
        if let Some(stream) = stream {
            stream.finish(Duration::from_secs(60))?;
        }
        let metrics = fleet[0].metrics();
        let quantile = |name, q| metrics.as_ref().and_then(|m| m.quantile(name, q)).unwrap_or(f64::NAN);
        let total = |name| metrics.as_ref().map_or(f64::NAN, |m| m.value(name, ""));
        let outcome = QualityOutcome {
            rate,
            loss: fleet[0].info().and_then(|i| i["progressive_logloss"].as_f64()).unwrap_or(f64::NAN),
            staleness_p99: quantile("tributary_staleness_records", 0.99),
            freshness_p99_ms: quantile("tributary_freshness_seconds", 0.99) * 1000.0,
            mean_record_events: n as f64 / total("tributary_records_applied_total"),
            merge_holds_released: total("tributary_trainer_merge_holds_released_total"),
        };
        fleet.iter_mut().for_each(Replica::kill);
        Ok(outcome)
    }

    /// The divergence guard at full speed: three `wide_deep`
    /// replicas with the guard at its defaults learn the click-through
    /// stream (its drift included) from a backlog while two of them are
    /// SIGKILLed and restarted in turn; no rollback may be taken. Then a
    /// burst of poisoned events follows, and one must be.
    fn guard(&mut self) -> anyhow::Result<()> {
        let dir = self.dir("guard")?;
        let broker = Broker::start(&dir)?;
        let n: u64 = if self.smoke { 20_000 } else { 300_000 };
        let poison: u64 = 1_500;
        let generate = |seed: &str, poisoned: bool| -> Vec<String> {
            let mut args: Vec<String> = ["--stream", "ctr", "--seed", seed].map(String::from).to_vec();
            args.extend(poisoned.then(|| "--poison".to_string()));
            args
        };
        let log = dir.join("produce.log");
        let clean = generate("13", false);
        let spec = StreamSpec { topic: "events", count: Some(n), generate: &clean, ..StreamSpec::default() };
        EventStream::start(&self.tributary, &broker.addr, &spec, &log)?.finish(Duration::from_secs(900))?;
        let env = [("MODEL__KIND", "wide_deep".to_string())];
        let mut fleet = Vec::new();
        for i in 0..3 {
            fleet.push(self.ready_replica(&dir, &format!("r{i}"), &broker, &env)?);
        }
        let learned_limit = Duration::from_secs(600);
        for (victim, share) in [(1, 3), (2, 3 * 2)] {
            wait_watermarks(&fleet[0], n * share / 9, learned_limit)?;
            fleet[victim].kill();
            // Restarted at once, as an orchestrator would.
            fleet[victim].start()?;
        }
        wait_watermarks(&fleet[0], n, learned_limit)?;
        let rollbacks = |r: &Replica| r.metrics().map_or(f64::NAN, |m| m.value("tributary_rollbacks_total", ""));
        let clean_rollbacks = rollbacks(&fleet[0]);
        self.report.add(
            "guard",
            "rollbacks taken on the clean stream, 3 replicas, 2 SIGKILLed",
            clean_rollbacks,
            Goal::AtMost(0.0),
        );
        let poisoned = generate("14", true);
        let spec = StreamSpec { topic: "events", count: Some(poison), generate: &poisoned, ..StreamSpec::default() };
        EventStream::start(&self.tributary, &broker.addr, &spec, &log)?.finish(Duration::from_secs(120))?;
        let poisoned_rollbacks = try_wait_for("a rollback after the poison", learned_limit, || {
            let after = rollbacks(&fleet[0]);
            (after > clean_rollbacks).then_some(after - clean_rollbacks)
        })
        .unwrap_or(0.0);
        self.report.add("guard", "rollbacks taken after 1 500 poisoned events", poisoned_rollbacks, Goal::AtLeast(1.0));
        let agree = try_wait_for("the three replicas to agree", Duration::from_secs(120), || {
            let infos: Vec<serde_json::Value> = fleet.iter().map(Replica::info).collect::<Option<_>>()?;
            infos.windows(2).all(|w| w[0]["weights_digest"] == w[1]["weights_digest"]).then_some(())
        });
        let agree = f64::from(u8::from(agree.is_ok()));
        self.report.add("guard", "replicas agree on the digest afterwards (1 = yes)", agree, Goal::AtLeast(1.0));
        let loss = fleet[0].info().and_then(|i| i["progressive_logloss"].as_f64()).unwrap_or(f64::NAN);
        self.report.detail(
            "guard",
            json!({"events": n, "poison": poison, "clean_rollbacks": clean_rollbacks,
                   "poisoned_rollbacks": poisoned_rollbacks, "progressive_logloss": loss}),
        );
        fleet.iter_mut().for_each(Replica::kill);
        Ok(())
    }

    /// Event time to serving, at 10k events/s, from the replica's histogram.
    fn freshness(&mut self) -> anyhow::Result<()> {
        let dir = self.dir("freshness")?;
        let broker = Broker::start(&dir)?;
        let r = self.ready_replica(&dir, "r0", &broker, &[])?;
        let stream = self.stream(&dir, &broker, Some(10_000.0), None)?;
        wait_learning(&r)?;
        // Let the stream settle, then measure a window between two scrapes.
        std::thread::sleep(Duration::from_secs(3));
        let window = self.secs(20.0, 2.0);
        let before = r.metrics().ok_or_else(|| anyhow::anyhow!("no metrics"))?;
        std::thread::sleep(window);
        let after = r.metrics().ok_or_else(|| anyhow::anyhow!("no metrics"))?;
        stream.stop();
        let consumed = (after.value("tributary_events_consumed_total", "")
            - before.value("tributary_events_consumed_total", ""))
            / window.as_secs_f64();
        let q =
            |q| histogram_quantile(&before, &after, "tributary_freshness_seconds", q).map_or(f64::NAN, |s| s * 1000.0);
        self.report.add("freshness", "events/s consumed in the window", consumed, Goal::AtLeast(9_500.0));
        self.report.add("freshness", "freshness p50 (ms, bucket bound)", q(0.5), Goal::None);
        self.report.add("freshness", "freshness p99 (ms, bucket bound)", q(0.99), Goal::AtMost(100.0));
        self.report.detail(
            "freshness",
            json!({"consumed_per_sec": consumed, "p50_ms": q(0.5), "p90_ms": q(0.9), "p99_ms": q(0.99)}),
        );
        Ok(())
    }

    /// Three replicas; predictions to two while the third is killed with
    /// SIGKILL and restarted.
    fn chaos(&mut self) -> anyhow::Result<()> {
        let dir = self.dir("chaos")?;
        let broker = Broker::start(&dir)?;
        let mut fleet: Vec<Replica> = (0..3).map(|i| self.replica(&dir, &format!("r{i}"), &broker, &[])).collect();
        for r in &mut fleet {
            r.start()?;
        }
        for r in &fleet {
            r.wait_ready(READY_LIMIT)?;
        }
        let stream = self.stream(&dir, &broker, Some(2000.0), None)?;
        wait_learning(&fleet[0])?;
        let total = self.secs(20.0, 6.0);
        let survivors = vec![fleet[0].http, fleet[1].http];
        let load = self.rt.spawn(driver::run(plan(survivors, Some(1000.0), total)));
        std::thread::sleep(total / 4);
        fleet[2].kill();
        let killed = Instant::now();
        // Restarted at once, as an orchestrator would.
        fleet[2].start_ready(READY_LIMIT)?;
        let to_ready = killed.elapsed().as_secs_f64();
        let out = self.rt.block_on(load)?;
        stream.stop();
        let agree = try_wait_for("the three replicas to agree", Duration::from_secs(120), || {
            let infos: Vec<serde_json::Value> = fleet.iter().map(Replica::info).collect::<Option<_>>()?;
            let same = infos.windows(2).all(|w| {
                w[0]["weights_digest"] == w[1]["weights_digest"] && w[0]["examples_learned"] == w[1]["examples_learned"]
            });
            same.then_some(infos)
        });
        self.report.add("chaos", "failed requests at the survivors", out.error_count() as f64, Goal::AtMost(0.0));
        self.report.add("chaos", "SIGKILL to ready again (s)", to_ready, Goal::None);
        self.report.add(
            "chaos",
            "replicas agree on the digest afterwards (1 = yes)",
            f64::from(u8::from(agree.is_ok())),
            Goal::AtLeast(1.0),
        );
        self.report.detail(
            "chaos",
            json!({"load": out.summary(), "errors_by_target": out.errors_by_target, "to_ready_s": to_ready}),
        );
        Ok(())
    }

    /// SIGKILL of one replica of two, restarted at once as an orchestrator
    /// would, with and without static membership (`group.instance.id`):
    /// how long the partitions stop learning. Measured as the longest time
    /// any partition's applied watermark stands still after the kill, from
    /// the survivor's watermarks sampled every 50 ms under 4 000 events/s.
    fn failover(&mut self) -> anyhow::Result<()> {
        let mut rows = Vec::new();
        for static_membership in [false, true] {
            let label = if static_membership { "static" } else { "dynamic" };
            let dir = self.dir(&format!("failover-{label}"))?;
            let broker = Broker::start(&dir)?;
            let env = |id: &str| -> Vec<(&str, String)> {
                let instance = if static_membership { id.to_string() } else { String::new() };
                vec![("MODEL__KIND", "logistic".into()), ("KAFKA__GROUP_INSTANCE_ID", instance)]
            };
            let survivor = self.ready_replica(&dir, "r0", &broker, &env("r0"))?;
            let mut killed = self.ready_replica(&dir, "r1", &broker, &env("r1"))?;
            let stream = self.stream(&dir, &broker, Some(4000.0), None)?;
            wait_learning(&survivor)?;
            std::thread::sleep(self.secs(3.0, 1.0));
            let samples = sample_watermarks(&survivor, self.secs(25.0, 12.0), || {
                killed.kill();
                killed.start()
            })?;
            stream.stop();
            let stall = longest_stand_still(&samples);
            self.report.add(
                "failover",
                &format!("SIGKILL to every partition learning again (s), {label} membership"),
                stall,
                Goal::None,
            );
            rows.push(json!({"membership": label, "longest_stand_still_s": stall, "samples": samples.len()}));
        }
        self.report.detail("failover", rows);
        Ok(())
    }

    /// Restart to ready against the number of log records since the newest
    /// checkpoint: a checkpoint near the start, then K one-event records,
    /// then SIGKILL (so no later checkpoint) and a restart. `wide_deep` up
    /// to 100k records; 1M records of `wide_deep` would be 28 GB of dense
    /// gradients, so that size is `logistic`'s.
    fn recovery(&mut self) -> anyhow::Result<()> {
        let mut rows = Vec::new();
        for (k, kind) in recovery_sizes(self.smoke) {
            let dir = self.dir(&format!("recovery-{k}"))?;
            let broker = Broker::start(&dir)?;
            let mut r = self.ready_replica(
                &dir,
                "r0",
                &broker,
                &[
                    ("MODEL__KIND", kind.into()),
                    // One-event records 32 in flight are noisy steps the guard
                    // may take for a divergence; its rollback would skip events.
                    ("GUARD__ENABLED", "false".into()),
                    ("TRAIN__BATCH_SIZE", "1".into()),
                    ("TRAIN__MAX_IN_FLIGHT", "32".into()),
                    ("CHECKPOINT__INTERVAL_SECS", "86400".into()),
                ],
            )?;
            self.stream(&dir, &broker, None, Some(16))?.finish(Duration::from_secs(60))?;
            wait_examples(&r, 16, Duration::from_secs(60))?;
            r.terminate()?; // the final checkpoint
            r.start_ready(READY_LIMIT)?;
            let checkpoint = version(&r)?;
            self.stream(&dir, &broker, None, Some(k))?.finish(Duration::from_secs(1800))?;
            wait_examples(&r, 16 + k, Duration::from_secs(1800))?;
            let end = version(&r)?;
            r.kill();
            let restart = Instant::now();
            r.start_ready(READY_LIMIT)?;
            let secs = restart.elapsed().as_secs_f64();
            // Its trainer may append (rejected) records while it replays, so the
            // position can pass `end`; what it learned must be exactly the same.
            anyhow::ensure!(version(&r)? >= end, "the restarted replica is behind the position it was killed at");
            anyhow::ensure!(
                examples(&r) == Some(16 + k),
                "the restarted replica did not learn every event exactly once"
            );
            let records = end - checkpoint;
            let goal = if k == 10_000 { Goal::AtMost(2.0) } else { Goal::None };
            self.report.add(
                "recovery",
                &format!("restart to ready (s), {records} {kind} records since checkpoint"),
                secs,
                goal,
            );
            self.report.add(
                "recovery",
                &format!("replay rate (records/s, start-up included), {records} {kind} records"),
                records as f64 / secs,
                Goal::None,
            );
            // A trainer that learned before its applier caught up would append
            // records that every replica rejects; there is nothing new to learn.
            let produced = r.metrics().map_or(f64::NAN, |m| m.value("tributary_records_produced_total", ""));
            self.report.add(
                "recovery",
                &format!("records appended while replaying {records}"),
                produced,
                Goal::AtMost(0.0),
            );
            rows.push(
                json!({"model": kind, "records": records, "seconds": secs, "appended_while_replaying": produced}),
            );
        }
        self.report.detail("recovery", rows);
        Ok(())
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

/// Samples `r`'s watermarks every 50 ms for `window`, calling `act` once the
/// first sample is in: (seconds since `act`, watermark per partition).
fn sample_watermarks(
    r: &Replica,
    window: Duration,
    act: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Vec<(f64, Vec<u64>)>> {
    let watermarks = || -> Option<Vec<u64>> {
        let info = r.info()?;
        Some(info["watermarks"].as_object()?.values().filter_map(serde_json::Value::as_u64).collect())
    };
    let first = watermarks().ok_or_else(|| anyhow::anyhow!("no watermarks from {}", r.id))?;
    act()?;
    let acted = Instant::now();
    let mut samples = vec![(0.0, first)];
    while acted.elapsed() < window {
        std::thread::sleep(Duration::from_millis(50));
        if let Some(w) = watermarks() {
            samples.push((acted.elapsed().as_secs_f64(), w));
        }
    }
    Ok(samples)
}

/// The longest time, over every partition, between two samples at which
/// its watermark moved (from the first sample on).
fn longest_stand_still(samples: &[(f64, Vec<u64>)]) -> f64 {
    let partitions = samples.iter().map(|(_, w)| w.len()).max().unwrap_or(0);
    (0..partitions)
        .map(|p| {
            let (mut last_move, mut last, mut longest) = (0.0, None, 0.0f64);
            for (t, w) in samples {
                let v = w.get(p).copied();
                if v != last {
                    longest = longest.max(t - last_move);
                    (last_move, last) = (*t, v);
                }
            }
            // Still standing at the end of the window counts too.
            let end = samples.last().map_or(0.0, |s| s.0);
            longest.max(end - last_move)
        })
        .fold(0.0, f64::max)
}

/// What one run of the quality scenario measured, on its first replica.
#[derive(serde::Serialize)]
struct QualityOutcome {
    /// Events learned per second, from the first learned batch.
    rate: f64,
    /// Progressive log-loss over all the events.
    loss: f64,
    staleness_p99: f64,
    /// Event time to serving (live runs).
    freshness_p99_ms: f64,
    /// Events over the update-log records applied: the mean batch.
    mean_record_events: f64,
    /// Times the first replica's merge went on without a partition it
    /// waited for (events then learned out of event-time order).
    merge_holds_released: f64,
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

/// A configuration the quality scenario learns the stream with.
struct QualityRun {
    kind: &'static str,
    /// Names the run in the report: `defaults`, `no staleness`, ...
    label: &'static str,
    /// `events` (8 partitions), `events-1p` (one), `events-live-1p` (the
    /// live runs' events, in one partition); unused by live runs.
    topic: String,
    replicas: usize,
    /// Events per second produced while the replicas learn, into a topic of
    /// the run's own; `None`: the pre-filled topic.
    live: Option<f64>,
    /// Settings beyond the defaults, as `TRIBUTARY_` variables without the prefix.
    env: Vec<(&'static str, &'static str)>,
}

/// How a stream is produced into its partitions.
struct Shape {
    /// `tributary produce --partitioning`.
    partitioning: &'static str,
    /// Whether the events carry `ts`.
    ts: bool,
}

/// A stream produced one way, as the shapes scenario learns it.
struct StreamShape {
    stream: &'static str,
    shape: Shape,
}

impl StreamShape {
    /// Its topic: the stream, the partitioning, and whether it has `ts`.
    fn topic(&self) -> String {
        let partitioning = if self.shape.partitioning.starts_with("key:") { "keyed" } else { self.shape.partitioning };
        format!("{}-{partitioning}-{}", self.stream, if self.shape.ts { "ts" } else { "no-ts" })
    }
}

/// The shapes scenario's streams: `clicks` every way, `ctr` the ways the
/// quality scenario does not (it learns `ctr` sticky with `ts`).
const SHAPES: [StreamShape; 8] = {
    const fn shape(stream: &'static str, partitioning: &'static str, ts: bool) -> StreamShape {
        StreamShape { stream, shape: Shape { partitioning, ts } }
    }
    [
        shape("clicks", "sticky", true),
        shape("clicks", "sticky", false),
        shape("clicks", "per-message", true),
        shape("clicks", "per-message", false),
        shape("clicks", "key:/sparse/f0", true),
        shape("clicks", "key:/sparse/f0", false),
        shape("ctr", "sticky", false),
        shape("ctr", "key:/sparse/f0", false),
    ]
};

/// Events per second of the quality scenario's live runs.
const LIVE_RATE: f64 = 10_000.0;

/// The quality scenario's runs: per model kind, the defaults with one and
/// three replicas and the same without staleness; a smoke run keeps one
/// kind.
fn quality_runs(smoke: bool) -> Vec<QualityRun> {
    let mut runs = Vec::new();
    for kind in quality_kinds(smoke) {
        let run = |label, topic: &str, replicas, live, env| QualityRun {
            kind,
            label,
            topic: topic.to_string(),
            replicas,
            live,
            env,
        };
        let sequential = || vec![("TRAIN__MAX_IN_FLIGHT", "1")];
        runs.push(run("no staleness", "events-1p", 1, None, sequential()));
        runs.push(run("defaults", "events", 1, None, vec![]));
        runs.push(run("3 replicas", "events", 3, None, vec![]));
        runs.push(run("4 in flight", "events", 1, None, vec![("TRAIN__MAX_IN_FLIGHT", "4")]));
        runs.push(run("live no staleness", "events-live-1p", 1, None, sequential()));
        runs.push(run("live 1 replica", "", 1, Some(LIVE_RATE), vec![]));
        runs.push(run("live 3 replicas", "", 3, Some(LIVE_RATE), vec![]));
    }
    runs
}

/// The model kinds the quality and shapes scenarios learn with: both, or
/// `logistic` alone in a smoke run; `LOAD_QUALITY_KINDS=wide_deep` keeps
/// some of them (a probe of one).
fn quality_kinds(smoke: bool) -> Vec<&'static str> {
    let kinds: &[&'static str] = if smoke { &["logistic"] } else { &["logistic", "wide_deep"] };
    let only = std::env::var("LOAD_QUALITY_KINDS").unwrap_or_default();
    kinds.iter().copied().filter(|k| only.is_empty() || only.split(',').any(|o| o == *k)).collect()
}

/// The recovery scenario's logs: records since the checkpoint, and the
/// model kind. `LOAD_RECOVERY_RECORDS=100000` keeps the sizes named (a
/// probe of one).
fn recovery_sizes(smoke: bool) -> Vec<(u64, &'static str)> {
    let sizes: &[(u64, &'static str)] = if smoke {
        &[(1_000, "wide_deep")]
    } else {
        &[(1_000, "wide_deep"), (10_000, "wide_deep"), (100_000, "wide_deep"), (1_000_000, "logistic")]
    };
    let only = std::env::var("LOAD_RECOVERY_RECORDS").unwrap_or_default();
    sizes.iter().copied().filter(|(k, _)| only.is_empty() || only.split(',').any(|o| o == k.to_string())).collect()
}

/// Vowpal Wabbit (`--loss_function logistic -b 20`, PyPI `vowpalwabbit` in
/// the project's virtualenv) over the VW text file `events`: its rate, its
/// progressive log-loss (VW's average loss, in nats), and the best constant
/// prediction's log-loss on the same labels, as JSON.
fn vowpal_wabbit(events: &Path) -> anyhow::Result<serde_json::Value> {
    const SCRIPT: &str = r#"
import json, math, sys, time
import vowpalwabbit
path = sys.argv[1]
labels = [line[0] == "1" for line in open(path)]
p = sum(labels) / len(labels)
started = time.perf_counter()
vw = vowpalwabbit.Workspace(f"--loss_function logistic -b 20 --quiet -d {path}")
vw.run_parser()
took = time.perf_counter() - started
print(json.dumps({
    "events": len(labels),
    "events_per_sec": len(labels) / took,
    "progressive_logloss": vw.get_sum_loss() / vw.get_weighted_examples(),
    "constant_logloss": -(p * math.log(p) + (1 - p) * math.log(1 - p)),
}))
vw.finish()
"#;
    let out = Command::new(crate::procs::venv_python()?).args(["-c", SCRIPT]).arg(events).output()?;
    anyhow::ensure!(out.status.success(), "vowpal wabbit: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
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

/// `INFER_BODY` as a gRPC `ModelInfer` request with raw contents, as
/// tritonclient.grpc sends it.
fn infer_request() -> proto::ModelInferRequest {
    use proto::model_infer_request::InferInputTensor;
    let tensor = |name: &str, datatype: &str, shape: Vec<i64>| InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape,
        ..Default::default()
    };
    let bytes = |s: &str| [(s.len() as u32).to_le_bytes().to_vec(), s.as_bytes().to_vec()].concat();
    let dense: Vec<u8> = [0.1f32, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8].iter().flat_map(|v| v.to_le_bytes()).collect();
    let sparse = [("f0", "v1"), ("f1", "v7"), ("f2", "v3"), ("f3", "v9")];
    let mut inputs = vec![tensor("dense", "FP32", vec![1, 8])];
    inputs.extend(sparse.iter().map(|(f, _)| tensor(f, "BYTES", vec![1])));
    let mut raw = vec![dense];
    raw.extend(sparse.iter().map(|(_, v)| bytes(v)));
    proto::ModelInferRequest { model_name: "default".into(), inputs, raw_input_contents: raw, ..Default::default() }
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

#[cfg(test)]
mod tests {
    use super::longest_stand_still;

    #[test]
    fn the_longest_stand_still_is_the_worst_partitions_longest_gap() {
        let samples = vec![
            (0.0, vec![10, 10]),
            (0.5, vec![11, 12]),
            // Partition 0 stands still from 0.5 s to 3.0 s; partition 1 moves on.
            (1.0, vec![11, 14]),
            (3.0, vec![12, 15]),
            (3.5, vec![13, 16]),
        ];
        assert_eq!(longest_stand_still(&samples), 2.5);
        // One that never moves again counts to the end of the window.
        let stuck = vec![(0.0, vec![1]), (0.5, vec![2]), (4.0, vec![2])];
        assert_eq!(longest_stand_still(&stuck), 3.5);
    }
}
