//! Predict now, learn later (docs/design.md section 8b): what logging every
//! served instance to the predictions topic costs predictions, against the
//! same replica's twin with logging off, in the same run.

use super::*;

impl Bench {
    /// Two idle replicas of the default model, one logging its predictions
    /// (`feedback.enabled`): requests/s as fast as answered, then p50 and
    /// p99 at half the slower one's rate, interleaved.
    pub(super) fn feedback(&mut self) -> anyhow::Result<()> {
        let dir = self.dir("feedback")?;
        let broker = Broker::start(&dir)?;
        let logging = [("FEEDBACK__ENABLED", "true".to_string())];
        let on = self.ready_replica(&dir, "logging", &broker, &logging)?;
        let off = self.ready_replica(&dir, "not-logging", &broker, &[])?;
        let window = self.secs(10.0, 1.0);
        // Where the CPU goes, per request: the replica's and the broker's
        // (on the same cores here; on its own machine in a deployment).
        let cpu = |r: &Replica| (r.process().cpu_secs().unwrap_or(0.0), broker.process().cpu_secs().unwrap_or(0.0));
        let measured = |r: &Replica| {
            let before = cpu(r);
            let out = self.drive(vec![r.http], None, window);
            let after = cpu(r);
            let per_request = |cpu: f64| 1e6 * cpu / out.ok.max(1) as f64;
            (per_request(after.0 - before.0), per_request(after.1 - before.1), out)
        };
        let ((on_cpu, on_broker, on_max), (off_cpu, off_broker, off_max)) = (measured(&on), measured(&off));
        let (on_rps, off_rps) = (on_max.summary().requests_per_sec, off_max.summary().requests_per_sec);
        let s = "feedback";
        for (who, replica, broker) in [("on", on_cpu, on_broker), ("off", off_cpu, off_broker)] {
            self.report.add(s, &format!("logging {who}: replica CPU µs per request"), replica, Goal::None);
            self.report.add(s, &format!("logging {who}: broker CPU µs per request"), broker, Goal::None);
        }
        self.report.add(s, "predict requests/s, logging on, as fast as answered", on_rps, Goal::None);
        self.report.add(s, "predict requests/s, logging off, as fast as answered", off_rps, Goal::None);
        self.report.add(s, "predict requests/s, logging on over off", on_rps / off_rps, Goal::AtLeast(0.9));
        let rate = Some(on_rps.min(off_rps) / 2.0);
        let rounds = if self.smoke { 1 } else { 3 };
        let (mut on_half, mut off_half) = (None, None);
        for _ in 0..rounds {
            merge(&mut on_half, self.drive(vec![on.http], rate, self.secs(3.0, 1.0)));
            merge(&mut off_half, self.drive(vec![off.http], rate, self.secs(3.0, 1.0)));
        }
        let (on_half, off_half) = (on_half.expect("a round"), off_half.expect("a round"));
        for (who, out) in [("on", &on_half), ("off", &off_half)] {
            self.report.add(
                s,
                &format!("logging {who}: p50 (ms) at half the max rate"),
                out.quantile_ms(0.5),
                Goal::None,
            );
            self.report.add(
                s,
                &format!("logging {who}: p99 (ms) at half the max rate"),
                out.quantile_ms(0.99),
                Goal::None,
            );
        }
        let p99 = on_half.quantile_ms(0.99) / off_half.quantile_ms(0.99);
        self.report.add(s, "p99, logging on over off", p99, Goal::AtMost(1.2));
        let m = on.metrics().ok_or_else(|| anyhow::anyhow!("no metrics from {}", on.id))?;
        let logged = |r: &str| m.value("tributary_predictions_logged_total", &format!("result=\"{r}\""));
        self.report.add(s, "predictions logged (queued)", logged("queued"), Goal::None);
        self.report.add(
            s,
            "predictions not logged (unlogged or failed)",
            logged("unlogged") + logged("failed"),
            Goal::AtMost(0.0),
        );
        let errors = [&on_max, &off_max, &on_half, &off_half].iter().map(|o| o.error_count()).sum::<u64>();
        self.report.add(s, "failed requests", errors as f64, Goal::AtMost(0.0));
        self.report.detail(
            s,
            json!({"on_max": on_max.summary(), "off_max": off_max.summary(), "on_half": on_half.summary(), "off_half": off_half.summary()}),
        );
        Ok(())
    }
}
