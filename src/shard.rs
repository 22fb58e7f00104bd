//! The other shards of a sharded fleet, as one replica reaches them
//! (docs/design.md section 8a): each shard's replicas, and the gather of the
//! rows a batch reads from the shards that hold them, one request per
//! shard, hedged to the shard's next replica when the first is slow or
//! fails, so that one replica's death fails no request. What a gather asks
//! and answers, and the view it makes, are `model::gathered`'s; this module
//! owns only their travel.
//!
//! The wire: `POST {replica}/v1/models/{model}/rows` with the JSON body
//! `{"rows": [[param, bucket], ...], "at_least": position, "slots": bool}`
//! and the fleet's peer token; the answer is the rows' values, little-endian
//! f32 one row after the other, then as many values again for each
//! optimizer slot when asked for (`X-Tributary-Slots` says how many), with
//! the answering replica's served position in `X-Tributary-Position` and
//! its watermarks in `X-Tributary-Watermarks` (`partition:offset,...`).

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
use crate::model::gathered::{self, Answer, Gathered, RowKey};
use crate::model::Model;

/// The most optimizer slots an answer may carry (Adam's and FTRL's two).
const MOST_SLOTS: usize = 2;
/// The longest watermarks header read: 64 KiB (thousands of partitions).
const MOST_WATERMARK_BYTES: usize = 1 << 16;

/// What a gather asks of every shard beside the rows.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ask {
    /// Rows read at this update-log position or later, if the shard gets
    /// there within the rows endpoint's wait.
    pub at_least: i64,
    /// With the optimizer slots' values of the rows (a trainer's overlay).
    pub slots: bool,
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
        ask: Ask,
        batch: &[&Features],
    ) -> Result<(Gathered<'a, B>, BTreeMap<u32, i64>), GatherError> {
        let layout = model.layout();
        let wanted = gathered::wanted(model, layout, batch);
        let cols = |&(param, _): &RowKey| model.params().get(param as usize).map_or(0, |p| p.cols);
        let started = std::time::Instant::now();
        let answers = self.gather(&wanted, cols, ask).await;
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
            if !view.take(model, *shard, rows, &answers[shard]) {
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
        ask: Ask,
    ) -> Result<BTreeMap<u32, Answer>, GatherError> {
        let mut asks = JoinSet::new();
        for (&shard, rows) in wanted {
            let (this, rows) = (self.clone(), rows.clone());
            let values = rows.iter().map(&cols).sum::<usize>();
            asks.spawn(async move { (shard, this.shard_rows(shard, &rows, values, ask).await) });
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
    async fn shard_rows(&self, shard: u32, rows: &[RowKey], values: usize, ask: Ask) -> Result<Answer, GatherError> {
        let replicas = self.replicas.get(shard as usize).filter(|r| !r.is_empty());
        let replicas = replicas.ok_or_else(|| self.unavailable(shard, "no replica configured".into()))?;
        let body = serde_json::json!({ "rows": rows, "at_least": ask.at_least, "slots": ask.slots });
        let body = Bytes::from(body.to_string());
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

    /// One replica's answer, its length checked against `values` (and as
    /// many again per slot it says it sent).
    async fn ask(&self, url: &str, body: Bytes, values: usize) -> Result<Answer, String> {
        let request = hyper::Request::post(url)
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {}", self.token))
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let response = self.client.request(request).await.map_err(|e| e.to_string())?;
        let status = response.status();
        let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok());
        let position = header("x-tributary-position")
            .and_then(|v| v.parse::<i64>().ok())
            .ok_or_else(|| format!("status {status}, no X-Tributary-Position"))?;
        let slots =
            header("x-tributary-slots").map_or(Some(0), |v| v.parse::<usize>().ok()).filter(|&n| n <= MOST_SLOTS);
        let slots = slots.ok_or_else(|| format!("status {status}, a wrong X-Tributary-Slots"))?;
        let watermarks = watermarks(header("x-tributary-watermarks").unwrap_or(""))
            .ok_or_else(|| format!("status {status}, a wrong X-Tributary-Watermarks"))?;
        // Never more bytes than the rows asked for: a peer cannot make this
        // replica hold more.
        let expected = values * (1 + slots) * 4;
        let bytes = Limited::new(response.into_body(), expected).collect().await.map_err(|e| e.to_string())?;
        let bytes = bytes.to_bytes();
        if !status.is_success() || bytes.len() != expected {
            return Err(format!("status {status}, {} bytes for {values} values and {slots} slots", bytes.len()));
        }
        let mut floats = bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")));
        let values_read: Vec<f32> = floats.by_ref().take(values).collect();
        let slots = (0..slots).map(|_| floats.by_ref().take(values).collect()).collect();
        Ok(Answer { position, watermarks, values: values_read, slots })
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

/// `partition:offset,...` as a map; `None` if it is not that, or longer
/// than `MOST_WATERMARK_BYTES`.
fn watermarks(text: &str) -> Option<BTreeMap<i32, i64>> {
    if text.len() > MOST_WATERMARK_BYTES {
        return None;
    }
    (text.split(',').filter(|pair| !pair.is_empty()))
        .map(|pair| {
            let (p, o) = pair.split_once(':')?;
            Some((p.parse().ok()?, o.parse().ok()?))
        })
        .collect()
}

/// The `X-Tributary-Watermarks` value of `watermarks`.
pub fn watermarks_header(watermarks: &BTreeMap<i32, i64>) -> String {
    watermarks.iter().map(|(p, o)| format!("{p}:{o}")).collect::<Vec<_>>().join(",")
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
        let want = Answer { position: 42, values: vec![10.0, 11.0, 40.0, 41.0], ..Answer::default() };
        let shards = |second: Vec<String>| {
            Shards::new("m", vec![vec![], second], "t", Duration::from_millis(50), Duration::from_secs(2))
        };
        // The first replica slow: the hedge answers, long before it would.
        let started = std::time::Instant::now();
        let got = shards(vec![slow.clone(), fast.clone()]).gather(&wanted(), |_| 2, Ask::default()).await.unwrap();
        assert_eq!(got[&1], want);
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        assert_eq!(slow_asked.load(Ordering::SeqCst), 1);
        // The first replica dead: the next one at once.
        let got = shards(vec![dead().await, fast.clone()]).gather(&wanted(), |_| 2, Ask::default()).await.unwrap();
        assert_eq!(got[&1], want);
        // No live replica: the shard is named, within the deadline.
        let err = shards(vec![dead().await, dead().await]).gather(&wanted(), |_| 2, Ask::default()).await.unwrap_err();
        assert!(matches!(err, GatherError::Unavailable { shard: 1, count: 2, .. }), "{err}");
        let err = shards(vec![slow]).gather(&wanted(), |_| 2, Ask::default()).await.unwrap_err();
        assert!(err.to_string().contains("deadline"), "{err}");
        // An answer of the wrong length is no answer.
        let err = shards(vec![fast]).gather(&wanted(), |_| 3, Ask::default()).await.unwrap_err();
        assert!(err.to_string().contains("for 6 values"), "{err}");
        assert_eq!(
            watermarks(&watermarks_header(&BTreeMap::from([(0, 5), (3, 9)]))),
            Some(BTreeMap::from([(0, 5), (3, 9)]))
        );
        assert_eq!(watermarks(""), Some(BTreeMap::new()));
        assert_eq!(watermarks("0:5,x"), None);
    }
}
