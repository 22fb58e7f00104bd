//! Learning at speed: the learning rate from a backlog (with and without
//! predictions), Avro events against JSON, freshness of a live stream.

use super::*;

impl Bench {
    /// `logistic` learning a pre-filled topic, alone and then with
    /// predictions at half the measured max rate; then `wide_deep` alone.
    pub(super) fn learn_rate(&mut self) -> anyhow::Result<()> {
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
    pub(super) fn event_formats(&mut self) -> anyhow::Result<()> {
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

    /// Event time to serving, at 10k events/s, from the replica's histogram.
    pub(super) fn freshness(&mut self) -> anyhow::Result<()> {
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
}
