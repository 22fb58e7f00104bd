//! The load drivers. HTTP: keep-alive HTTP/1.1 connections that send one
//! request after another, either as fast as the server answers (closed loop)
//! or on a fixed schedule (open loop). gRPC: HTTP/2 connections sending
//! `ModelInfer` closed-loop. In the open loop a latency is measured
//! from when the request was due, not when it was sent, so a stalled server
//! is charged for the requests it held up (no coordinated omission).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::time::Instant;

use self::proto::grpc_inference_service_client::GrpcInferenceServiceClient;

/// The Open Inference Protocol's gRPC messages and client, generated from
/// tributary's `src/grpc/inference.proto` (see build.rs).
pub mod proto {
    tonic::include_proto!("inference");
}

/// A request is abandoned, and counted as a `timeout` error, after this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before reconnecting after a failed connection.
const RECONNECT_PAUSE: Duration = Duration::from_millis(10);

#[derive(Clone, Debug)]
pub struct Plan {
    /// Connections are spread over these servers round-robin.
    pub targets: Vec<SocketAddr>,
    pub path: String,
    /// POSTed; empty: GET.
    pub body: Bytes,
    pub connections: usize,
    /// Requests per second over all connections; `None`: as fast as answered.
    pub rate: Option<f64>,
    pub duration: Duration,
    /// Ends the run early when set.
    pub stop: Option<Arc<AtomicBool>>,
}

/// What one run saw.
#[derive(Clone)]
pub struct Outcome {
    /// Latencies of successful requests, microseconds.
    pub latency: Histogram<u64>,
    pub ok: u64,
    /// Failed requests by kind: `connect`, `io`, `timeout`, `status 503`, ...
    pub errors: BTreeMap<String, u64>,
    /// Failed requests per target, in the order of `Plan::targets`.
    pub errors_by_target: Vec<u64>,
    pub elapsed: Duration,
}

/// The summary that goes in a report.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub requests_per_sec: f64,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Outcome {
    fn new(targets: usize) -> Outcome {
        Outcome {
            latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"),
            ok: 0,
            errors: BTreeMap::new(),
            errors_by_target: vec![0; targets],
            elapsed: Duration::ZERO,
        }
    }

    fn error(&mut self, target: usize, kind: impl Into<String>) {
        *self.errors.entry(kind.into()).or_default() += 1;
        self.errors_by_target[target] += 1;
    }

    pub fn merge(&mut self, other: &Outcome) {
        self.latency.add(&other.latency).expect("same histogram bounds");
        self.ok += other.ok;
        for (kind, n) in &other.errors {
            *self.errors.entry(kind.clone()).or_default() += n;
        }
        for (mine, theirs) in self.errors_by_target.iter_mut().zip(&other.errors_by_target) {
            *mine += theirs;
        }
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn summary(&self) -> Summary {
        Summary {
            requests_per_sec: self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9),
            ok: self.ok,
            errors: self.errors.clone(),
            p50_ms: self.quantile_ms(0.5),
            p90_ms: self.quantile_ms(0.9),
            p99_ms: self.quantile_ms(0.99),
            p999_ms: self.quantile_ms(0.999),
            max_ms: self.latency.max() as f64 / 1000.0,
        }
    }
}

/// Runs `plan` to its end.
pub async fn run(plan: Plan) -> Outcome {
    let start = Instant::now();
    let end = start + plan.duration;
    let per_connection = plan.rate.map(|r| r / plan.connections as f64);
    let tasks: Vec<_> = (0..plan.connections)
        .map(|i| {
            let target = i % plan.targets.len();
            // Open-loop connections start staggered so their schedules interleave.
            let offset = per_connection
                .map_or(Duration::ZERO, |r| Duration::from_secs_f64(i as f64 / plan.connections as f64 / r));
            tokio::spawn(connection(plan.clone(), target, per_connection, start + offset, end))
        })
        .collect();
    let mut total = Outcome::new(plan.targets.len());
    for t in tasks {
        total.merge(&t.await.expect("load connection task"));
    }
    total.elapsed = start.elapsed().min(plan.duration).max(Duration::from_millis(1));
    // Merged over connections, `elapsed` covers the whole run, so rates add up.
    total
}

async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One keep-alive connection's loop; reconnects after errors.
async fn connection(plan: Plan, target: usize, rate: Option<f64>, start: Instant, end: Instant) -> Outcome {
    let addr = plan.targets[target];
    let mut out = Outcome::new(plan.targets.len());
    let mut sender: Option<SendRequest<Full<Bytes>>> = None;
    let mut sent = 0u64;
    loop {
        let due = match rate {
            Some(r) => start + Duration::from_secs_f64(sent as f64 / r),
            None => Instant::now(),
        };
        if due >= end || plan.stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed)) {
            break;
        }
        tokio::time::sleep_until(due).await;
        let alive = match sender.as_mut() {
            Some(s) => s.ready().await.is_ok(),
            None => false,
        };
        if !alive {
            match connect(addr).await {
                Ok(s) => sender = Some(s),
                Err(_) => {
                    out.error(target, "connect");
                    sender = None;
                    sent += 1;
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                    continue;
                }
            }
        }
        let s = sender.as_mut().expect("connected above");
        sent += 1;
        let method = if plan.body.is_empty() { "GET" } else { "POST" };
        let request = hyper::Request::builder()
            .method(method)
            .uri(plan.path.as_str())
            .header(hyper::header::HOST, addr.to_string())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(plan.body.clone()))
            .expect("valid request");
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, async {
            let response = s.send_request(request).await?;
            let status = response.status();
            response.into_body().collect().await?;
            anyhow::Ok(status)
        })
        .await;
        match answer {
            Ok(Ok(status)) if status.is_success() => {
                out.ok += 1;
                let micros = due.elapsed().as_micros().max(1) as u64;
                out.latency.saturating_record(micros);
            }
            Ok(Ok(status)) => out.error(target, format!("status {}", status.as_u16())),
            Ok(Err(_)) => {
                out.error(target, "io");
                sender = None;
            }
            Err(_) => {
                out.error(target, "timeout");
                sender = None;
            }
        }
    }
    out
}

/// What a gRPC run sends: one `ModelInfer` request, again and again.
#[derive(Clone, Debug)]
pub struct GrpcPlan {
    /// `http://host:port` of the replica's `grpc.addr`.
    pub target: String,
    pub request: proto::ModelInferRequest,
    /// HTTP/2 connections, each sending one request after another.
    pub connections: usize,
    pub duration: Duration,
}

/// Runs `plan` closed-loop (as fast as answered) to its end.
pub async fn run_grpc(plan: GrpcPlan) -> Outcome {
    let start = Instant::now();
    let end = start + plan.duration;
    let tasks: Vec<_> = (0..plan.connections).map(|_| tokio::spawn(grpc_connection(plan.clone(), end))).collect();
    let mut total = Outcome::new(1);
    for t in tasks {
        total.merge(&t.await.expect("load connection task"));
    }
    // As `run` measures it, so that the two rates compare.
    total.elapsed = start.elapsed().min(plan.duration).max(Duration::from_millis(1));
    total
}

/// One HTTP/2 connection's loop of `ModelInfer` calls until `end`.
async fn grpc_connection(plan: GrpcPlan, end: Instant) -> Outcome {
    let mut out = Outcome::new(1);
    let channel = match tonic::transport::Endpoint::from_shared(plan.target) {
        Ok(endpoint) => endpoint.tcp_nodelay(true).connect().await.ok(),
        Err(_) => None,
    };
    let Some(channel) = channel else {
        out.error(0, "connect");
        return out;
    };
    let mut client = GrpcInferenceServiceClient::new(channel);
    while Instant::now() < end {
        let sent = Instant::now();
        match tokio::time::timeout(REQUEST_TIMEOUT, client.model_infer(plan.request.clone())).await {
            Ok(Ok(_)) => {
                out.ok += 1;
                out.latency.saturating_record(sent.elapsed().as_micros().max(1) as u64);
            }
            Ok(Err(status)) => out.error(0, format!("grpc {:?}", status.code())),
            Err(_) => out.error(0, "timeout"),
        }
    }
    out
}
