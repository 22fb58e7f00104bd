//! Learning quality: a fleet at speed against the same events learned
//! without staleness and against Vowpal Wabbit, on the stream shapes users
//! produce.

use super::*;

impl Bench {
    /// Learning quality at speed, on the held-out click-through
    /// stream (`tributary generate --stream ctr`: hot values, a hidden model
    /// that drifts half-way), pre-filled twice: into 8 partitions, and into
    /// one. Each model kind learns it with the defaults, with one and three
    /// replicas, and without staleness (1 partition, 1 record in flight,
    /// the gradient after each record's swap); Vowpal Wabbit
    /// (`--loss_function logistic -b 20`, from the project's virtualenv)
    /// learns the same events from their VW text. Progressive log-loss
    /// beside events/s for each, and the constant predictor's loss.
    pub(super) fn quality(&mut self) -> anyhow::Result<()> {
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
        // The kinds this run learned (`LOAD_QUALITY_KINDS` may leave one out).
        let kinds = quality_kinds(self.smoke);
        for kind in &kinds {
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
        for kind in &kinds {
            let name = format!("{kind} at speed over VW: log-loss");
            self.report.add("quality", &name, loss(&format!("{kind}-defaults")) / vw_loss, Goal::AtMost(1.0));
        }
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
    pub(super) fn shapes(&mut self) -> anyhow::Result<()> {
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

/// Vowpal Wabbit (`--loss_function logistic -b 20`, PyPI `vowpalwabbit` in
/// the project's virtualenv) over the VW text file `events`: its rate, its
/// progressive log-loss (VW's average loss, in nats), and the best constant
/// prediction's log-loss on the same labels, as JSON.
pub(super) fn vowpal_wabbit(events: &Path) -> anyhow::Result<serde_json::Value> {
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
    let out = Command::new(tributary_testkit::venv_python()?).args(["-c", SCRIPT]).arg(events).output()?;
    anyhow::ensure!(out.status.success(), "vowpal wabbit: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
}
