//! Faults: the divergence guard at speed, SIGKILL chaos under load,
//! failover of a consumer-group member, recovery time from a checkpoint.

use super::*;

impl Bench {
    /// The divergence guard at full speed: three `wide_deep`
    /// replicas with the guard at its defaults learn the click-through
    /// stream (its drift included) from a backlog while two of them are
    /// SIGKILLed and restarted in turn; no rollback may be taken. Then a
    /// burst of poisoned events follows, and one must be.
    pub(super) fn guard(&mut self) -> anyhow::Result<()> {
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

    /// Three replicas; predictions to two while the third is killed with
    /// SIGKILL and restarted.
    pub(super) fn chaos(&mut self) -> anyhow::Result<()> {
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
    pub(super) fn failover(&mut self) -> anyhow::Result<()> {
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
    pub(super) fn recovery(&mut self) -> anyhow::Result<()> {
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
