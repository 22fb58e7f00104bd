//! Serving: the hello-world baseline, predict throughput and latency through
//! swaps, and the protocols (V2 REST, gRPC, POST /v1/events) against V1.

use super::*;

/// The same instance as an Open Inference Protocol (KServe V2) request.
const INFER_BODY: &str = r#"{"inputs":[{"name":"dense","shape":[1,8],"datatype":"FP32","data":[0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8]},{"name":"f0","shape":[1],"datatype":"BYTES","data":["v1"]},{"name":"f1","shape":[1],"datatype":"BYTES","data":["v7"]},{"name":"f2","shape":[1],"datatype":"BYTES","data":["v3"]},{"name":"f3","shape":[1],"datatype":"BYTES","data":["v9"]}]}"#;
const INFER_PATH: &str = "/v2/models/default/infer";
/// Events per `POST /v1/events` request in the protocols scenario.
const EVENTS_PER_POST: usize = 100;

impl Bench {
    /// An axum hello-world that reads the same body: what HTTP on this machine can do.
    pub(super) fn baseline(&mut self) -> anyhow::Result<()> {
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
    pub(super) fn predict(&mut self) -> anyhow::Result<()> {
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
    pub(super) fn protocols(&mut self) -> anyhow::Result<()> {
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
