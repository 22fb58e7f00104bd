//! The status page at `/`: model version, events/s, lag, freshness, the
//! staleness of applied gradients, the join's open predictions and the
//! progressive loss over the last minutes, as small charts that refresh
//! live. The page is one self-contained HTML file (no external scripts or
//! fonts: it works air-gapped); it polls `GET /v1/status`, whose history the
//! replica samples once a second and keeps for ten minutes, so the charts
//! have data the moment the page opens.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::Html;
use axum::Json;
use prometheus::core::Collector;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use crate::metrics::Metrics;
use crate::snapshot::Serving;

/// Samples kept: ten minutes at one a second.
const KEEP: usize = 600;
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    unix_ms: u64,
    model_version: i64,
    examples_learned: u64,
    lag: i64,
    /// Over the observations since the sample before; `None` without any.
    freshness_p99: Option<f64>,
    /// Records between an applied gradient's version and its offset, p99
    /// since the sample before; `None` without any.
    staleness_p99: Option<f64>,
    join_open: i64,
    progressive_logloss: Option<f64>,
}

/// The last minutes of the status series.
#[derive(Default)]
pub struct History {
    inner: Mutex<Recent>,
}

#[derive(Default)]
struct Recent {
    samples: VecDeque<Sample>,
    /// The freshness histogram's cumulative bucket counts at the last sample.
    freshness_buckets: Vec<(f64, u64)>,
    /// The same of the staleness histogram (records).
    staleness_buckets: Vec<(f64, u64)>,
}

/// A histogram's cumulative bucket counts, +Inf last (the exposition leaves
/// it implicit: it is the count).
fn cumulative_buckets(histogram: &prometheus::Histogram) -> Vec<(f64, u64)> {
    let mut buckets: Vec<(f64, u64)> = (histogram.collect().iter())
        .flat_map(|f| f.get_metric())
        .flat_map(|m| m.get_histogram().get_bucket())
        .map(|b| (b.upper_bound(), b.cumulative_count()))
        .collect();
    buckets.push((f64::INFINITY, histogram.get_sample_count()));
    buckets
}

impl History {
    /// Takes a sample every [`SAMPLE_EVERY`], for as long as the runtime runs.
    pub async fn run(self: Arc<Self>, serving: Serving, metrics: Arc<Metrics>) {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sample(&serving, &metrics);
        }
    }

    /// Records the state now.
    pub fn sample(&self, serving: &Serving, metrics: &Metrics) {
        let snap = serving.load();
        let lag = metrics
            .trainer
            .consumer_lag
            .collect()
            .iter()
            .flat_map(|f| f.get_metric())
            .map(|m| m.get_gauge().get_value() as i64)
            .sum();
        let (freshness, staleness) =
            (cumulative_buckets(&metrics.applier.freshness), cumulative_buckets(&metrics.applier.staleness_records));
        let unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let mut recent = self.inner.lock().expect("history lock");
        let freshness_p99 = quantile_of_increase(0.99, &recent.freshness_buckets, &freshness);
        let staleness_p99 = quantile_of_increase(0.99, &recent.staleness_buckets, &staleness);
        (recent.freshness_buckets, recent.staleness_buckets) = (freshness, staleness);
        if recent.samples.len() == KEEP {
            recent.samples.pop_front();
        }
        recent.samples.push_back(Sample {
            unix_ms,
            model_version: snap.position,
            examples_learned: snap.examples_learned,
            lag,
            freshness_p99,
            staleness_p99,
            join_open: metrics.join.open.get(),
            progressive_logloss: snap.progressive_loss,
        });
    }

    fn series(&self) -> Series {
        let recent = self.inner.lock().expect("history lock");
        let s = &recent.samples;
        let per_sec = s.iter().zip(s.iter().skip(1)).map(|(a, b)| {
            let secs = b.unix_ms.saturating_sub(a.unix_ms) as f64 / 1000.0;
            (secs > 0.0).then(|| b.examples_learned.saturating_sub(a.examples_learned) as f64 / secs)
        });
        Series {
            interval_ms: SAMPLE_EVERY.as_millis() as u64,
            unix_ms: s.iter().map(|x| x.unix_ms).collect(),
            model_version: s.iter().map(|x| x.model_version).collect(),
            events_per_sec: std::iter::once(None).chain(per_sec).take(s.len()).collect(),
            lag: s.iter().map(|x| x.lag).collect(),
            freshness_p99_seconds: s.iter().map(|x| x.freshness_p99).collect(),
            staleness_p99_records: s.iter().map(|x| x.staleness_p99).collect(),
            join_open_predictions: s.iter().map(|x| x.join_open).collect(),
            progressive_logloss: s.iter().map(|x| x.progressive_logloss).collect(),
        }
    }
}

/// The `q` quantile of the observations between two readings of a
/// cumulative histogram, interpolated inside its bucket as Prometheus'
/// `histogram_quantile` does; `None` without observations.
fn quantile_of_increase(q: f64, before: &[(f64, u64)], now: &[(f64, u64)]) -> Option<f64> {
    let count_before = |i: usize| before.get(i).map_or(0, |b| b.1);
    let increase: Vec<(f64, u64)> =
        now.iter().enumerate().map(|(i, &(le, c))| (le, c.saturating_sub(count_before(i)))).collect();
    // The last bucket is +Inf: its count is the total.
    let total = increase.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut lower = (0.0, 0u64);
    for &(le, c) in &increase {
        if c as f64 >= rank {
            if le.is_infinite() {
                return Some(lower.0); // past the last bound: that bound, as Prometheus
            }
            let in_bucket = (c - lower.1) as f64;
            let frac = if in_bucket > 0.0 { (rank - lower.1 as f64) / in_bucket } else { 1.0 };
            return Some(lower.0 + (le - lower.0) * frac.clamp(0.0, 1.0));
        }
        lower = (le, c);
    }
    Some(lower.0)
}

/// Parallel arrays, oldest first, one entry per sample.
#[derive(Serialize, ToSchema)]
pub struct Series {
    interval_ms: u64,
    unix_ms: Vec<u64>,
    model_version: Vec<i64>,
    /// Examples learned per second (the whole fleet's, from the update log).
    events_per_sec: Vec<Option<f64>>,
    /// Events on this replica's partitions not yet learned.
    lag: Vec<i64>,
    /// Event time to serving, p99 over each interval; null without events.
    freshness_p99_seconds: Vec<Option<f64>>,
    /// Update-log records between an applied gradient's version and its
    /// offset, p99 over each interval; null without records applied.
    staleness_p99_records: Vec<Option<f64>>,
    /// Predictions this replica's joiner holds waiting for their label.
    join_open_predictions: Vec<i64>,
    progressive_logloss: Vec<Option<f64>>,
}

#[derive(Serialize, ToSchema)]
pub struct Status {
    replica: String,
    model: String,
    #[schema(value_type = String)]
    kind: crate::config::ModelKind,
    ready: bool,
    model_version: i64,
    examples_learned: u64,
    progressive_logloss: Option<f64>,
    /// This replica's join (`feedback.join`), since it started.
    join: JoinStatus,
    history: Series,
}

/// The join's counts since the replica started.
#[derive(Serialize, ToSchema)]
pub struct JoinStatus {
    open_predictions: i64,
    /// Predictions by how they left the window: labeled, expired,
    /// expired_early.
    predictions: std::collections::BTreeMap<String, u64>,
    /// Records dead-lettered, by reason.
    dead_letters: std::collections::BTreeMap<String, u64>,
}

impl JoinStatus {
    fn of(metrics: &Metrics) -> JoinStatus {
        let by = |counter: &prometheus::IntCounterVec| {
            (counter.collect().iter())
                .flat_map(|f| f.get_metric())
                .map(|m| (m.get_label()[0].value().to_string(), m.get_counter().get_value() as u64))
                .collect()
        };
        let j = &metrics.join;
        JoinStatus {
            open_predictions: j.open.get(),
            predictions: by(&j.predictions),
            dead_letters: by(&j.dead_letters),
        }
    }
}

/// What the status page shows: now, and the last ten minutes.
#[utoipa::path(get, path = "/v1/status", tag = "operations", responses((status = 200, body = Status)))]
pub async fn status(State(state): State<AppState>) -> Json<Status> {
    let snap = state.predictor.serving.load();
    Json(Status {
        replica: state.replica_id.to_string(),
        model: state.predictor.model_name.to_string(),
        kind: snap.model.config().kind,
        ready: state.predictor.ready.load(Ordering::Acquire),
        model_version: snap.position,
        examples_learned: snap.examples_learned,
        progressive_logloss: snap.progressive_loss,
        join: JoinStatus::of(&state.metrics),
        history: state.history.series(),
    })
}

/// The status page (HTML).
#[utoipa::path(get, path = "/", tag = "operations", responses((status = 200, content_type = "text/html", body = String)))]
pub async fn page() -> Html<&'static str> {
    Html(include_str!("status.html"))
}

#[cfg(test)]
mod tests {
    use super::quantile_of_increase;

    #[test]
    fn quantile_of_the_interval_only() {
        let before = [(0.1, 5), (1.0, 5), (f64::INFINITY, 5)];
        // Since `before`: 10 observations, all between 0.1 and 1.0.
        let now = [(0.1, 5), (1.0, 15), (f64::INFINITY, 15)];
        let p50 = quantile_of_increase(0.5, &before, &now).unwrap();
        assert!((p50 - 0.55).abs() < 1e-9, "{p50}");
        assert_eq!(quantile_of_increase(0.5, &now, &now), None);
        assert_eq!(quantile_of_increase(0.99, &[], &[(0.1, 4), (f64::INFINITY, 4)]), Some(0.099));
    }
}
