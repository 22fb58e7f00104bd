//! Learning from late labels (docs/design.md section 8b), measured end to
//! end through the API: a held-out stream replayed as predictions with ids
//! and, for its clicks, labels posted after a delay, against the same
//! events given whole at the same rate, in the same run (and Vowpal
//! Wabbit); how fast one replica joins a backlog; how long a label takes to
//! be learned; what an open prediction costs in memory.

use super::*;

/// The join's window in the replay: every label (at most `LABEL_DELAY_MS`
/// late) comes within it.
const WINDOW_MS: u64 = 3000;
const LABEL_DELAY_MS: u64 = 2000;
/// Events replayed a second, and per predict request.
const REPLAY_RATE: f64 = 4000.0;
const REPLAY_BATCH: usize = 50;

impl Bench {
    pub(super) fn join(&mut self) -> anyhow::Result<()> {
        let dir = self.dir("join")?;
        let broker = Broker::start(&dir)?;
        let n = if self.smoke { 5_000 } else { 100_000 };
        for stream in ["clicks", "ctr"] {
            self.join_replay(&dir, &broker, stream, n)?;
        }
        self.join_backlog(&dir, &broker, if self.smoke { 10_000 } else { 200_000 })?;
        Ok(())
    }

    /// `n` events of `stream` replayed as predictions and late labels to a
    /// joining replica while the same events stream whole to another, at
    /// the same rate: progressive log-loss of both, and of Vowpal Wabbit;
    /// then label-to-learned freshness on the joining fleet.
    fn join_replay(&mut self, dir: &Path, broker: &Broker, stream: &str, n: u64) -> anyhow::Result<()> {
        let (events_file, vw_file) = (dir.join(format!("{stream}.jsonl")), dir.join(format!("{stream}.vw")));
        let generate = ["--stream", stream, "--seed", "23"].map(String::from);
        let out = Command::new(&self.tributary)
            .arg("generate")
            .args(&generate)
            .args(["--count", &n.to_string(), "--vw"])
            .arg(&vw_file)
            .stdout(std::fs::File::create(&events_file)?)
            .status()?;
        anyhow::ensure!(out.success(), "tributary generate failed");
        let events: Vec<serde_json::Value> =
            std::fs::read_to_string(&events_file)?.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;

        let mut whole_env = counted_learner("wide_deep", &format!("whole-{stream}"));
        whole_env.push(("KAFKA__EVENTS_TOPIC", format!("events-whole-{stream}")));
        let mut joined_env = counted_learner("wide_deep", &format!("joined-{stream}"));
        joined_env.extend(feedback_env(stream, WINDOW_MS));
        let mut whole = self.ready_replica(dir, &format!("whole-{stream}"), broker, &whole_env)?;
        let joined = self.ready_replica(dir, &format!("joined-{stream}"), broker, &joined_env)?;
        let topic = format!("events-whole-{stream}");
        let spec = StreamSpec {
            topic: &topic,
            rate: Some(REPLAY_RATE),
            count: Some(n),
            generate: &generate,
            ..StreamSpec::default()
        };
        let whole_stream =
            EventStream::start(&self.tributary, &broker.addr, &spec, &dir.join(format!("whole-{stream}.log")))?;
        let delay = |i: usize| Duration::from_millis((i as u64 * 7919) % LABEL_DELAY_MS);
        replay(&joined, &events, REPLAY_RATE, delay)?;
        whole_stream.finish(Duration::from_secs(600))?;
        wait_examples(&whole, n, Duration::from_secs(600))?;
        wait_examples(&joined, n, Duration::from_secs(600))?;
        let loss = |r: &Replica| r.info().and_then(|i| i["progressive_logloss"].as_f64()).unwrap_or(f64::NAN);
        let (whole_loss, joined_loss) = (loss(&whole), loss(&joined));
        let vw = super::quality::vowpal_wabbit(&vw_file)?;
        let vw_loss = vw["progressive_logloss"].as_f64().unwrap_or(f64::NAN);
        let m = joined.metrics().ok_or_else(|| anyhow::anyhow!("no metrics"))?;
        let s = "join";
        let what = |w: &str| format!("{stream}, {n} events at {REPLAY_RATE} a second: {w}");
        self.report.add(s, &what("log-loss, events given whole"), whole_loss, Goal::None);
        self.report.add(s, &what("log-loss, predictions + late labels joined"), joined_loss, Goal::None);
        self.report.add(s, &what("log-loss joined over whole"), joined_loss / whole_loss, Goal::AtMost(1.01));
        self.report.add(s, &what("log-loss joined over Vowpal Wabbit's"), joined_loss / vw_loss, Goal::None);
        let ms = |name: &str, q| m.quantile(name, q).map_or(f64::NAN, |s| s * 1000.0);
        let latency = ms("tributary_join_latency_seconds", 0.99);
        self.report.add(s, &what("label to joined event committed, p99 (ms, bucket bound)"), latency, Goal::None);
        let commit = ms("tributary_join_commit_duration_seconds", 0.99);
        self.report.add(s, &what("a join transaction, p99 (ms, bucket bound)"), commit, Goal::None);
        let labeled = m.value("tributary_join_predictions_total", r#"ending="labeled""#);
        let expired = m.value("tributary_join_predictions_total", r#"ending="expired""#);
        self.report.detail(
            s,
            json!({"stream": stream, "events": n, "whole": whole_loss, "joined": joined_loss,
            "vw": vw, "labeled": labeled, "expired": expired}),
        );
        whole.kill();
        self.label_to_learned(dir, broker, stream, joined, &joined_env)
    }

    /// Label to learned: a prediction with an id, its label posted, and the
    /// time until a replica of the fleet that logs nothing serves changed
    /// weights; one probe at a time, the fleet otherwise idle.
    fn label_to_learned(
        &mut self,
        dir: &Path,
        broker: &Broker,
        stream: &str,
        mut joined: Replica,
        joined_env: &[(&'static str, String)],
    ) -> anyhow::Result<()> {
        let mut env = joined_env.to_vec();
        env.push(("FEEDBACK__ENABLED", "false".into()));
        let mut watcher = self.ready_replica(dir, &format!("watcher-{stream}"), broker, &env)?;
        let watch = json!({"instances": [{"dense": vec![0.0; 8], "sparse": {"f0": "watched"}}]}).to_string();
        let served = |r: &Replica| -> anyhow::Result<f64> {
            let (status, body) = tributary_testkit::http_post(r.http, "/v1/models/default:predict", None, &watch)
                .ok_or_else(|| anyhow::anyhow!("no answer"))?;
            anyhow::ensure!(status == 200, "{status} {body}");
            Ok(serde_json::from_str::<serde_json::Value>(&body)?["predictions"][0].as_f64().unwrap_or(f64::NAN))
        };
        let probes = if self.smoke { 5 } else { 60 };
        let mut took = Vec::new();
        for k in 0..probes {
            // Quiet first: the last probe's weights served by the watcher.
            std::thread::sleep(Duration::from_millis(300));
            let before = served(&watcher)?;
            let id = format!("probe-{stream}-{k}");
            let probe = json!({"instances": [{"dense": vec![0.5; 8], "sparse": {"f0": id}}], "ids": [id]}).to_string();
            post_ok(&joined, "/v1/models/default:predict", &probe)?;
            // The outcome comes later than the logged prediction (whose
            // producer lingers up to 50 ms): measured from the label on.
            std::thread::sleep(Duration::from_millis(200));
            let label = json!({"labels": [{"id": id, "label": 1}]}).to_string();
            post_ok(&joined, "/v1/models/default/feedback", &label)?;
            let posted = Instant::now();
            try_wait_for("the probe learned", Duration::from_secs(10), || {
                (served(&watcher).ok()? != before).then_some(())
            })?;
            took.push(posted.elapsed().as_secs_f64() * 1000.0);
        }
        took.sort_by(f64::total_cmp);
        let q = |q: f64| took[((took.len() - 1) as f64 * q).round() as usize];
        let s = "join";
        self.report.add(s, &format!("{stream}: label posted to learned and served, p50 (ms)"), q(0.5), Goal::None);
        self.report.add(
            s,
            &format!("{stream}: label posted to learned and served, p99 (ms)"),
            q(0.99),
            Goal::AtMost(200.0),
        );
        watcher.kill();
        joined.kill();
        Ok(())
    }

    /// A backlog of `n` logged predictions and labels for half of them,
    /// joined by one replica that does nothing else: predictions joined a
    /// second, and the memory the open half holds.
    fn join_backlog(&mut self, dir: &Path, broker: &Broker, n: u64) -> anyhow::Result<()> {
        let mut env = feedback_env("backlog", 3_600_000);
        env.extend([
            ("TRAIN__ENABLED", "false".to_string()),
            ("FEEDBACK__JOIN", "false".to_string()),
            ("KAFKA__GROUP_ID", "backlog".to_string()),
        ]);
        let mut server = self.ready_replica(dir, "backlog-server", broker, &env)?;
        let events: Vec<serde_json::Value> = (0..n)
            .map(|i| json!({"dense": vec![(i % 97) as f64 / 97.0; 8], "sparse": {"f0": format!("u{}", i % 5000)}, "label": i % 2}))
            .collect();
        replay(&server, &events, f64::INFINITY, |_| Duration::ZERO)?;
        // A graceful stop sends what it logged.
        server.terminate()?;
        // The same replica's memory with nothing to join, as the baseline.
        let mut idle_env = feedback_env("backlog-idle", 3_600_000);
        idle_env.extend([("TRAIN__ENABLED", "false".to_string()), ("KAFKA__GROUP_ID", "backlog-idle".to_string())]);
        let mut idle = self.ready_replica(dir, "backlog-idle", broker, &idle_env)?;
        env.retain(|(k, _)| *k != "FEEDBACK__JOIN");
        let mut joiner = self.ready_replica(dir, "backlog-joiner", broker, &env)?;
        let handled = |r: &Replica| {
            let m = r.metrics()?;
            Some(
                m.value("tributary_join_predictions_total", r#"ending="labeled""#)
                    + m.value("tributary_join_open_predictions", ""),
            )
        };
        let mut first: Option<(Instant, f64)> = None;
        try_wait_for("the backlog joined", Duration::from_secs(600), || {
            let done = handled(&joiner)?;
            if done > 0.0 && first.is_none() {
                first = Some((Instant::now(), done));
            }
            (done >= n as f64).then_some(())
        })?;
        let (t0, d0) = first.expect("set before the end");
        let rate = (n as f64 - d0) / t0.elapsed().as_secs_f64().max(1e-3);
        let open = joiner.metrics().map_or(0.0, |m| m.value("tributary_join_open_predictions", ""));
        let rss = |r: &Replica| r.process().rss_bytes().unwrap_or(0) as f64;
        let per_open = (rss(&joiner) - rss(&idle)) / open.max(1.0);
        let s = "join";
        self.report.add(s, "backlog: logged predictions joined a second, one replica (train off)", rate, Goal::None);
        self.report.add(s, "backlog: resident bytes per open prediction (over an idle joiner)", per_open, Goal::None);
        self.report.detail(s, json!({"backlog": n, "open": open, "joined_per_sec": rate, "bytes_per_open": per_open}));
        joiner.kill();
        idle.kill();
        Ok(())
    }
}

/// Feedback on, on topics named after `name`, with the join's `window_ms`.
fn feedback_env(name: &str, window_ms: u64) -> Vec<(&'static str, String)> {
    vec![
        ("FEEDBACK__ENABLED", "true".into()),
        ("FEEDBACK__PREDICTIONS_TOPIC", format!("predictions-{name}")),
        ("FEEDBACK__LABELS_TOPIC", format!("labels-{name}")),
        ("FEEDBACK__WINDOW_MS", window_ms.to_string()),
        ("KAFKA__EVENTS_TOPIC", format!("events-joined-{name}")),
    ]
}

fn post_ok(r: &Replica, path: &str, body: &str) -> anyhow::Result<String> {
    let (status, answer) =
        tributary_testkit::http_post(r.http, path, None, body).ok_or_else(|| anyhow::anyhow!("{path}: no answer"))?;
    anyhow::ensure!(status / 100 == 2, "{path}: {status} {answer}");
    Ok(answer)
}

/// Replays `events` to `r` at `rate` a second: each as a prediction (its
/// instance, id `e{i}`), and those labeled 1 as a label `delay(i)` later;
/// the others expire to the default label, 0.
fn replay(
    r: &Replica,
    events: &[serde_json::Value],
    rate: f64,
    delay: impl Fn(usize) -> Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut due: Vec<(Instant, String)> = Vec::new();
    let post_labels = |ids: &[String]| -> anyhow::Result<()> {
        let labels: Vec<serde_json::Value> = ids.iter().map(|id| json!({"id": id, "label": 1})).collect();
        for chunk in labels.chunks(1000) {
            post_ok(r, "/v1/models/default/feedback", &json!({"labels": chunk}).to_string())?;
        }
        Ok(())
    };
    for (b, chunk) in events.chunks(REPLAY_BATCH).enumerate() {
        let at = started + Duration::from_secs_f64((b * REPLAY_BATCH) as f64 / rate).min(Duration::from_secs(86_400));
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        let first = b * REPLAY_BATCH;
        let ids: Vec<String> = (first..first + chunk.len()).map(|i| format!("e{i}")).collect();
        let instances: Vec<serde_json::Value> =
            chunk.iter().map(|e| json!({"dense": e["dense"], "sparse": e["sparse"]})).collect();
        post_ok(r, "/v1/models/default:predict", &json!({"instances": instances, "ids": ids}).to_string())?;
        let now = Instant::now();
        for (k, e) in chunk.iter().enumerate() {
            if e["label"].as_f64() == Some(1.0) {
                due.push((now + delay(first + k), ids[k].clone()));
            }
        }
        let (ready, waiting): (Vec<_>, Vec<_>) = due.into_iter().partition(|(at, _)| *at <= now);
        due = waiting;
        post_labels(&ready.into_iter().map(|(_, id)| id).collect::<Vec<_>>())?;
    }
    due.sort();
    for (at, id) in due {
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        post_labels(&[id])?;
    }
    Ok(())
}
