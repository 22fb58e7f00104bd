//! Shards (docs/design.md section 8a): a fleet of two shards against one
//! replica of the whole model on the same events, in the same run: how fast
//! each learns and how well, what the gather costs a prediction; then the
//! resident memory of one replica as the tables split over 1, 2 and 4
//! shards.

use super::*;

/// The peer token the shards gather with.
const PEER_TOKEN: &str = "load-peer-token-0123456789";
/// The memory phase's tables: 4 fields of 2^21 buckets, each row a wide
/// weight and a 16-wide embedding (about 570 MB of weights, whole).
const LARGE_BUCKETS: u32 = 1 << 21;

impl Bench {
    pub(super) fn shards(&mut self) -> anyhow::Result<()> {
        let dir = self.dir("shards")?;
        let broker = Broker::start(&dir)?;
        let n: u64 = if self.smoke { 20_000 } else { 300_000 };
        let mut last = None;
        for stream in ["demo", "clicks"] {
            last = Some(self.shards_learn(&dir, &broker, stream, n)?);
        }
        let (mut whole, mut fleet) = last.expect("a stream learned");
        self.gather_cost(&whole, &fleet[0]);
        whole.kill();
        fleet.iter_mut().for_each(Replica::kill);
        if !self.smoke {
            self.memory_per_shard(&dir, &broker)?;
        }
        Ok(())
    }

    /// The `n` events of `stream`, pre-filled, learned by a whole replica,
    /// by two whole replicas (as many trainers as the sharded fleet), and
    /// by two shards of one replica each, one after the other: how fast and
    /// how well. Vowpal Wabbit learns the `clicks` events too. Returns the
    /// whole replica and the shards, idle.
    fn shards_learn(
        &mut self,
        dir: &Path,
        broker: &Broker,
        stream: &str,
        n: u64,
    ) -> anyhow::Result<(Replica, Vec<Replica>)> {
        let topic = format!("events-{stream}");
        let vw_file = dir.join(format!("{stream}.vw"));
        let mut generate: Vec<String> = ["--stream", stream, "--seed", "23"].map(String::from).to_vec();
        if stream != "demo" {
            generate.extend(["--vw".to_string(), vw_file.display().to_string()]);
        }
        let spec = StreamSpec { topic: &topic, count: Some(n), generate: &generate, ..StreamSpec::default() };
        let log = dir.join(format!("produce-{stream}.log"));
        EventStream::start(&self.tributary, &broker.addr, &spec, &log)?.finish(Duration::from_secs(900))?;
        let learner = |id: &str| {
            let mut env = counted_learner("wide_deep", &format!("{id}-{stream}"));
            env.push(("KAFKA__EVENTS_TOPIC", topic.clone()));
            env
        };
        let loss = |r: &Replica| r.info().and_then(|i| i["progressive_logloss"].as_f64()).unwrap_or(f64::NAN);
        let limit = Duration::from_secs(900);
        let whole = self.ready_replica(dir, &format!("whole-{stream}"), broker, &learner("whole"))?;
        let whole_rate = learned_rate(&whole, n, limit)?;
        let mut twins: Vec<Replica> =
            (0..2).map(|i| self.replica(dir, &format!("twin{i}-{stream}"), broker, &learner("twins"))).collect();
        twins.iter_mut().try_for_each(|r| r.start())?;
        twins.iter().try_for_each(|r| r.wait_ready(READY_LIMIT))?;
        let twins_rate = learned_rate(&twins[0], n, limit)?;
        let twins_loss = loss(&twins[0]);
        twins.iter_mut().for_each(Replica::kill);
        let fleet = self.sharded_fleet(dir, broker, 2, &learner("sharded"))?;
        let sharded_rate = learned_rate(&fleet[0], n, limit)?;
        wait_examples(&fleet[1], n, Duration::from_secs(300))?;
        let s = "shards";
        let add = |report: &mut Report, what: &str, value: f64, goal: Goal| {
            report.add(s, &format!("{stream}, wide_deep, pre-filled: {what}"), value, goal);
        };
        add(&mut self.report, "whole replica, events learned/s", whole_rate, Goal::None);
        add(&mut self.report, "2 whole replicas, events learned/s", twins_rate, Goal::None);
        add(&mut self.report, "2 shards x 1 replica, events learned/s", sharded_rate, Goal::None);
        add(&mut self.report, "learn rate, 2 shards over whole", sharded_rate / whole_rate, Goal::None);
        add(&mut self.report, "whole replica, progressive log-loss", loss(&whole), Goal::None);
        add(&mut self.report, "2 whole replicas, progressive log-loss", twins_loss, Goal::None);
        add(&mut self.report, "2 shards, progressive log-loss", loss(&fleet[0]), Goal::None);
        let over_whole = loss(&fleet[0]) / loss(&whole);
        add(&mut self.report, "progressive log-loss, 2 shards over whole", over_whole, Goal::AtMost(1.01));
        let over_twins = loss(&fleet[0]) / twins_loss;
        add(&mut self.report, "progressive log-loss, 2 shards over 2 whole replicas", over_twins, Goal::AtMost(1.01));
        if stream != "demo" {
            let vw = super::quality::vowpal_wabbit(&vw_file)?["progressive_logloss"].as_f64().unwrap_or(f64::NAN);
            add(&mut self.report, "Vowpal Wabbit, progressive log-loss", vw, Goal::None);
            add(
                &mut self.report,
                "progressive log-loss, 2 shards over Vowpal Wabbit",
                loss(&fleet[0]) / vw,
                Goal::None,
            );
        }
        Ok((whole, fleet))
    }

    /// `count` replicas, shard `i` of `count` each, ready: each knows the
    /// others' addresses before any starts.
    fn sharded_fleet(
        &self,
        dir: &Path,
        broker: &Broker,
        count: usize,
        env: &[(&str, String)],
    ) -> anyhow::Result<Vec<Replica>> {
        let mut fleet: Vec<Replica> =
            (0..count).map(|i| self.replica(dir, &format!("shard{i}"), broker, env)).collect();
        let urls: Vec<String> = fleet.iter().map(|r| format!("[\"http://{}\"]", r.http)).collect();
        let urls = format!("[{}]", urls.join(", "));
        for (i, r) in fleet.iter_mut().enumerate() {
            r.env.extend(sharded_env(i, count, &urls));
            r.start()?;
        }
        for r in &fleet {
            r.wait_ready(READY_LIMIT)?;
        }
        Ok(fleet)
    }

    /// Predictions of one instance at the whole replica and at a shard
    /// (which gathers the other shard's rows for each), both idle: as fast
    /// as answered, then p50 and p99 at half the shard's rate.
    fn gather_cost(&mut self, whole: &Replica, shard: &Replica) {
        let s = "shards";
        let window = self.secs(10.0, 1.0);
        let (w, g) = (self.drive(vec![whole.http], None, window), self.drive(vec![shard.http], None, window));
        let (wrps, grps) = (w.summary().requests_per_sec, g.summary().requests_per_sec);
        self.report.add(s, "whole replica: predict requests/s, as fast as answered", wrps, Goal::None);
        self.report.add(s, "shard: predict requests/s, as fast as answered (a gather each)", grps, Goal::None);
        self.report.add(s, "predict requests/s, shard over whole", grps / wrps, Goal::None);
        let rate = Some(grps / 2.0);
        let (wh, gh) = (self.drive(vec![whole.http], rate, window), self.drive(vec![shard.http], rate, window));
        for (who, out) in [("whole replica", &wh), ("shard", &gh)] {
            self.report.add(
                s,
                &format!("{who}: predict p50 (ms) at half the shard's rate"),
                out.quantile_ms(0.5),
                Goal::None,
            );
            self.report.add(
                s,
                &format!("{who}: predict p99 (ms) at half the shard's rate"),
                out.quantile_ms(0.99),
                Goal::None,
            );
        }
        self.report.add(s, "predict p99, shard over whole", gh.quantile_ms(0.99) / wh.quantile_ms(0.99), Goal::None);
        let errors = [&w, &g, &wh, &gh].iter().map(|o| o.error_count()).sum::<u64>();
        self.report.add(s, "failed requests", errors as f64, Goal::AtMost(0.0));
        self.report.detail(
            s,
            json!({"whole_max": w.summary(), "shard_max": g.summary(), "whole_half": wh.summary(), "shard_half": gh.summary()}),
        );
    }

    /// The resident memory of shard 0 of 1, 2 and 4 with tables of
    /// `LARGE_BUCKETS` buckets, ready and idle (the others need not run: a
    /// replica starts from its own rows), and what that says of the largest
    /// tables one machine can hold.
    fn memory_per_shard(&mut self, dir: &Path, broker: &Broker) -> anyhow::Result<()> {
        let s = "shards";
        let mut resident = Vec::new();
        for count in [1usize, 2, 4] {
            let id = format!("memory-{count}");
            let mut env = counted_learner("wide_deep", &id);
            env.extend([("MODEL__BUCKETS", LARGE_BUCKETS.to_string()), ("TRAIN__ENABLED", "false".into())]);
            let mut r = self.replica(dir, &id, broker, &env);
            if count > 1 {
                // The other shards' addresses: never asked while idle.
                let others: Vec<&str> = (0..count).map(|_| "[\"http://127.0.0.1:9\"]").collect();
                r.env.extend(sharded_env(0, count, &format!("[{}]", others.join(", "))));
            }
            r.start_ready(READY_LIMIT)?;
            let bytes = r.process().peak_rss_bytes().unwrap_or(0) as f64;
            r.kill();
            let name =
                format!("peak resident MB of one replica, {} buckets per field, shard 0 of {count}", LARGE_BUCKETS);
            self.report.add(s, &name, bytes / 1e6, Goal::None);
            resident.push(bytes);
        }
        self.report.add(s, "peak resident, shard 0 of 2 over whole", resident[1] / resident[0], Goal::AtMost(0.6));
        self.report.add(s, "peak resident, shard 0 of 4 over whole", resident[2] / resident[0], Goal::AtMost(0.35));
        // Scaled from each peak as measured (its fixed part scaled too: a
        // bound from below): what fits a replica of 16 GiB.
        let fits = |peak: f64| f64::from(LARGE_BUCKETS) * (16u64 << 30) as f64 / peak;
        self.report.add(s, "model.buckets whose whole model peaks at 16 GiB (scaled)", fits(resident[0]), Goal::None);
        self.report.add(s, "model.buckets whose shard of 4 peaks at 16 GiB (scaled)", fits(resident[2]), Goal::None);
        Ok(())
    }
}

/// A replica's settings as shard `index` of `count`, whose fleet is `urls`
/// (TOML: a list of base URLs per shard).
fn sharded_env(index: usize, count: usize, urls: &str) -> Vec<(String, String)> {
    [
        ("SHARD__COUNT", count.to_string()),
        ("SHARD__INDEX", index.to_string()),
        ("SHARD__REPLICAS", urls.to_string()),
        ("CHECKPOINT__PEER_TOKEN", PEER_TOKEN.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (format!("TRIBUTARY_{k}"), v))
    .collect()
}
