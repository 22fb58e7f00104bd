//! The other shards of a sharded fleet, as one replica reaches them
//! (docs/design.md section 8a): each shard's replicas, and the gather of the
//! rows a batch reads from the shards that hold them, one request per
//! shard, hedged to the shard's next replica when the first is slow or
//! fails, so that one replica's death fails no request. What a gather asks
//! and answers, and the view it makes, are `model::gathered`'s; this module
//! owns only their travel.
//!
//! The wire: `POST {replica}/v1/models/{model}/rows` with the JSON body
//! `{"rows": [[param, bucket], ...], "at_least": position}` and the fleet's
//! peer token; the answer
//! is the rows' values, little-endian f32 one row after the other, and the
//! answering replica's served position in `X-Tributary-Position`.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::event::Features;
use crate::metrics::ShardMetrics;
use crate::model::gathered::{self, Gathered, RowKey};
use crate::model::Model;

/// A shard's answer: the rows' values and the position they were read at.
#[derive(Debug, PartialEq)]
pub struct Rows {
    pub position: i64,
    pub values: Vec<f32>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GatherError {
    /// No replica of the shard answered in time: a 503 naming it.
    #[error("shard {shard} of {count}: no replica answered ({why})")]
    Unavailable { shard: u32, count: u32, why: String },
}

/// Each shard's replicas (base URLs, `http://host:port`), and how to ask them.
#[derive(Clone)]
pub struct Shards {
    /// The model's name, in the rows endpoint's path.
    model: String,
    replicas: Vec<Vec<String>>,
    token: String,
    /// Asking the shard's next replica when none answered within this.
    hedge_after: Duration,
    /// Giving the shard up when none answered within this.
    deadline: Duration,
    client: Client<HttpConnector, Full<Bytes>>,
    metrics: Option<ShardMetrics>,
}

impl Shards {
    pub fn new(
        model: &str,
        replicas: Vec<Vec<String>>,
        token: &str,
        hedge_after: Duration,
        deadline: Duration,
    ) -> Shards {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(deadline));
        let client = Client::builder(TokioExecutor::new()).build(connector);
        let (model, token) = (model.to_string(), token.to_string());
        Shards { model, replicas, token, hedge_after, deadline, client, metrics: None }
    }

    /// The same, its asks and gathers counted in `metrics`.
    pub fn counted(self, metrics: &ShardMetrics) -> Shards {
        Shards { metrics: Some(metrics.clone()), ..self }
    }

    /// The other shards of a sharded replica's configuration; `None` for
    /// one that holds the whole model.
    pub fn of(config: &Config, metrics: &ShardMetrics) -> Option<Shards> {
        let c = &config.shard;
        c.is_sharded().then(|| {
            let ms = Duration::from_millis;
            let token = config.checkpoint.peer_token.expose();
            Shards::new(&config.model.name, c.replicas.clone(), token, ms(c.hedge_after_ms), ms(c.deadline_ms))
                .counted(metrics)
        })
    }

    /// A shard's weights `local` (at `own_position`) with the rows `batch`
    /// reads gathered from the other shards, each read at `at_least` or
    /// later if it gets there within the rows endpoint's wait: the view a
    /// forward pass or a gradient reads, and the position each shard read
    /// was at (this shard's included).
    pub async fn view<'a, B: AsRef<[f32]>>(
        &self,
        model: &Model,
        (local, own_position): (&'a [B], i64),
        at_least: i64,
        batch: &[&Features],
    ) -> Result<(Gathered<'a, B>, BTreeMap<u32, i64>), GatherError> {
        let layout = model.layout();
        let wanted = gathered::wanted(model, layout, batch);
        let cols = |&(param, _): &RowKey| model.params().get(param as usize).map_or(0, |p| p.cols);
        let started = std::time::Instant::now();
        let answers = self.gather(&wanted, cols, at_least).await;
        if let Some(m) = &self.metrics {
            m.gather_duration.observe(started.elapsed().as_secs_f64());
            if let Err(GatherError::Unavailable { shard, .. }) = &answers {
                m.unavailable.with_label_values(&[&shard.to_string()]).inc();
            }
        }
        let answers = answers?;
        let mut view = Gathered::new(local, layout);
        let mut positions = BTreeMap::from([(layout.index, own_position)]);
        for (shard, rows) in &wanted {
            // `gather` checked each answer's length: taking it cannot fail.
            if !view.take(model, rows, &answers[shard].values) {
                return Err(self.unavailable(*shard, "an answer of the wrong length".into()));
            }
            positions.insert(*shard, answers[shard].position);
        }
        Ok((view, positions))
    }

    /// The rows `wanted` of each shard (`model::gathered::wanted`), asked of
    /// all shards at once; each answer checked to carry `cols(row)` values
    /// per row.
    pub async fn gather(
        &self,
        wanted: &BTreeMap<u32, Vec<RowKey>>,
        cols: impl Fn(&RowKey) -> usize,
        at_least: i64,
    ) -> Result<BTreeMap<u32, Rows>, GatherError> {
        let mut asks = JoinSet::new();
        for (&shard, rows) in wanted {
            let (this, rows) = (self.clone(), rows.clone());
            let values = rows.iter().map(&cols).sum::<usize>();
            asks.spawn(async move { (shard, this.shard_rows(shard, &rows, values, at_least).await) });
        }
        let mut answers = BTreeMap::new();
        while let Some(joined) = asks.join_next().await {
            // A task that did not finish (it panicked) leaves its shard
            // unknown: named as the shard past the last.
            let (shard, answer) = joined.map_err(|e| self.unavailable(self.replicas.len() as u32, e.to_string()))?;
            answers.insert(shard, answer?);
        }
        Ok(answers)
    }

    /// One shard's rows: its first replica asked, the next one too each
    /// `hedge_after` without an answer (or at once after a failure), the
    /// first good answer taken.
    async fn shard_rows(&self, shard: u32, rows: &[RowKey], values: usize, at_least: i64) -> Result<Rows, GatherError> {
        let replicas = self.replicas.get(shard as usize).filter(|r| !r.is_empty());
        let replicas = replicas.ok_or_else(|| self.unavailable(shard, "no replica configured".into()))?;
        let body = Bytes::from(serde_json::json!({ "rows": rows, "at_least": at_least }).to_string());
        let give_up = tokio::time::Instant::now() + self.deadline;
        let mut tries = JoinSet::new();
        let (mut next, mut why) = (0, String::from("none asked"));
        loop {
            if next < replicas.len() {
                let (this, url, body) =
                    (self.clone(), format!("{}/v1/models/{}/rows", replicas[next], self.model), body.clone());
                tries.spawn(async move { this.ask(&url, body, values).await.map_err(|e| format!("{url}: {e}")) });
                next += 1;
            }
            let hedge = tokio::time::sleep(self.hedge_after);
            tokio::select! {
                Some(done) = tries.join_next() => match done.map_err(|e| e.to_string()).and_then(|r| r) {
                    Ok(rows) => {
                        self.count(shard, "answered");
                        return Ok(rows);
                    }
                    Err(e) => {
                        self.count(shard, "failed");
                        if tries.is_empty() && next >= replicas.len() {
                            return Err(self.unavailable(shard, e));
                        }
                        why = e;
                    }
                },
                () = hedge, if next < replicas.len() => self.count(shard, "hedged"),
                () = tokio::time::sleep_until(give_up) => return Err(self.unavailable(shard, format!("deadline; last: {why}"))),
            }
        }
    }

    /// One replica's answer, its length checked against `values`.
    async fn ask(&self, url: &str, body: Bytes, values: usize) -> Result<Rows, String> {
        let request = hyper::Request::post(url)
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {}", self.token))
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let response = self.client.request(request).await.map_err(|e| e.to_string())?;
        let status = response.status();
        let position = (response.headers().get("x-tributary-position"))
            .and_then(|v| v.to_str().ok()?.parse::<i64>().ok())
            .ok_or_else(|| format!("status {status}, no X-Tributary-Position"))?;
        // Never more bytes than the rows asked for: a peer cannot make this
        // replica hold more.
        let bytes = Limited::new(response.into_body(), values * 4).collect().await.map_err(|e| e.to_string())?;
        let bytes = bytes.to_bytes();
        if !status.is_success() || bytes.len() != values * 4 {
            return Err(format!("status {status}, {} bytes for {values} values", bytes.len()));
        }
        let values = bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
        Ok(Rows { position, values })
    }

    fn count(&self, shard: u32, outcome: &str) {
        if let Some(m) = &self.metrics {
            m.asks.with_label_values(&[&shard.to_string(), outcome]).inc();
        }
    }

    fn unavailable(&self, shard: u32, why: String) -> GatherError {
        GatherError::Unavailable { shard, count: self.replicas.len() as u32, why }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;

    use super::*;

    /// A replica's rows endpoint that answers `row * 10 + col` for each of
    /// two columns after `delay`, counting the requests it got.
    async fn replica(delay: Duration) -> (String, Arc<AtomicUsize>) {
        let asked = Arc::new(AtomicUsize::new(0));
        let handler = |State((delay, asked)): State<(Duration, Arc<AtomicUsize>)>, body: String| async move {
            asked.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            let rows: serde_json::Value = serde_json::from_str(&body).unwrap();
            let mut out = Vec::new();
            for row in rows["rows"].as_array().unwrap() {
                let id = row[1].as_u64().unwrap() as f32;
                out.extend([id * 10.0, id * 10.0 + 1.0].iter().flat_map(|v| v.to_le_bytes()));
            }
            let mut headers = HeaderMap::new();
            headers.insert("x-tributary-position", "42".parse().unwrap());
            (StatusCode::OK, headers, out).into_response()
        };
        let app = axum::Router::new()
            .route("/v1/models/m/rows", axum::routing::post(handler))
            .with_state((delay, asked.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, asked)
    }

    /// An address nothing listens on.
    async fn dead() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        url
    }

    fn wanted() -> BTreeMap<u32, Vec<RowKey>> {
        BTreeMap::from([(1, vec![(0, 1), (0, 4)])])
    }

    #[tokio::test]
    async fn a_slow_or_dead_replica_is_hedged_to_the_next_and_a_shard_with_none_is_named() {
        let (slow, slow_asked) = replica(Duration::from_secs(5)).await;
        let (fast, _) = replica(Duration::ZERO).await;
        let want = Rows { position: 42, values: vec![10.0, 11.0, 40.0, 41.0] };
        let shards = |second: Vec<String>| {
            Shards::new("m", vec![vec![], second], "t", Duration::from_millis(50), Duration::from_secs(2))
        };
        // The first replica slow: the hedge answers, long before it would.
        let started = std::time::Instant::now();
        let got = shards(vec![slow.clone(), fast.clone()]).gather(&wanted(), |_| 2, 0).await.unwrap();
        assert_eq!(got[&1], want);
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        assert_eq!(slow_asked.load(Ordering::SeqCst), 1);
        // The first replica dead: the next one at once.
        let got = shards(vec![dead().await, fast.clone()]).gather(&wanted(), |_| 2, 0).await.unwrap();
        assert_eq!(got[&1], want);
        // No live replica: the shard is named, within the deadline.
        let err = shards(vec![dead().await, dead().await]).gather(&wanted(), |_| 2, 0).await.unwrap_err();
        assert!(matches!(err, GatherError::Unavailable { shard: 1, count: 2, .. }), "{err}");
        let err = shards(vec![slow]).gather(&wanted(), |_| 2, 0).await.unwrap_err();
        assert!(err.to_string().contains("deadline"), "{err}");
        // An answer of the wrong length is no answer.
        let err = shards(vec![fast]).gather(&wanted(), |_| 3, 0).await.unwrap_err();
        assert!(err.to_string().contains("for 6 values"), "{err}");
    }
}
