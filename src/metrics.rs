//! Every metric the replica exports, named in one place. Labels have few
//! values (routes, statuses, reject reasons, partitions); counters move by
//! batch, never per event in a hot loop.

use prometheus::core::Collector;
use prometheus::proto::MetricType;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::state::Reject;

/// Every series name starts with this and an underscore.
pub const NAMESPACE: &str = "tributary";

pub struct Metrics {
    registry: Registry,
    /// Each metric's name (without the namespace) and type, empty or not.
    families: Vec<(String, MetricType)>,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub model_version: IntGauge,
    pub events_consumed: IntCounter,
    pub events_invalid: IntCounter,
    pub events_refused: IntCounterVec,
    pub dead_letters: IntCounterVec,
    pub examples_learned: IntCounter,
    pub records_produced: IntCounter,
    pub record_round_trip: Histogram,
    /// Where a trainer's record cycle goes, by stage (see `train::Stage`).
    pub trainer_stage: HistogramVec,
    pub merge_holds_released: IntCounter,
    pub records_applied: IntCounter,
    pub records_too_large: IntCounter,
    pub records_rejected: IntCounterVec,
    pub consumer_lag: IntGaugeVec,
    pub events_below_watermark: IntCounter,
    pub freshness: Histogram,
    pub staleness_records: Histogram,
    pub staleness_examples: Histogram,
    pub swaps: IntCounter,
    pub swap_duration: Histogram,
    pub swap_full_copies: IntCounter,
    pub checkpoints: IntCounterVec,
    pub checkpoint_age: Gauge,
    pub progressive_logloss: Gauge,
    pub ready: IntGauge,
    pub update_log_stalled: IntGauge,
    pub update_log_start: IntGauge,
    pub rollbacks: IntCounterVec,
    pub rollback_replayed_records: Histogram,
    pub divergences: IntCounter,
    pub admin_denied: IntCounter,
    pub events_ingested: IntCounterVec,
}

fn buckets_seconds() -> Vec<f64> {
    vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
}

/// Fine where the goal is (p99 under 100 ms), coarse beyond.
fn buckets_freshness() -> Vec<f64> {
    vec![0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
}

/// Records between a gradient's version and its offset: the trainer's
/// records in flight times the trainers, and what the backlog adds.
fn buckets_staleness_records() -> Vec<f64> {
    vec![0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0]
}

/// Examples those records taught: batches of 64 to 1024 events.
fn buckets_staleness_examples() -> Vec<f64> {
    vec![0.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0]
}

impl Metrics {
    /// Counts and times one request of `protocol` (`http` or `grpc`).
    pub fn count_request(&self, protocol: &str, method: &str, route: &str, status: &str, seconds: f64) {
        self.http_duration.with_label_values(&[protocol, method, route]).observe(seconds);
        self.http_requests.with_label_values(&[protocol, method, route, status]).inc();
    }

    pub fn new(replica_id: &str) -> Metrics {
        let registry = Registry::new_custom(
            Some(NAMESPACE.into()),
            Some([("replica".to_string(), replica_id.to_string())].into()),
        )
        .expect("valid registry");
        let mut families = Vec::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m.expect("valid metric");
                registry.register(Box::new(m.clone())).expect("unique metric");
                families.extend(m.collect().iter().map(|f| (f.name().to_string(), f.get_field_type())));
                m
            }};
        }
        let hist = |name: &str, help: &str| HistogramOpts::new(name, help).buckets(buckets_seconds());
        let m = Metrics {
            http_requests: reg!(IntCounterVec::new(
                Opts::new(
                    "http_requests_total",
                    "Requests by protocol (http: REST; grpc: the Open Inference Protocol's gRPC service), method, \
                     route and status (an HTTP status, or a gRPC code's name)"
                ),
                &["protocol", "method", "route", "status"]
            )),
            http_duration: reg!(HistogramVec::new(
                hist("http_request_duration_seconds", "Request latency by protocol, method and route"),
                &["protocol", "method", "route"]
            )),
            model_version: reg!(IntGauge::new("model_version", "Served model version (the updates position)")),
            events_consumed: reg!(IntCounter::new("events_consumed_total", "Training events read from Kafka")),
            events_invalid: reg!(IntCounter::new(
                "events_invalid_total",
                "Training events that failed parsing or validation"
            )),
            events_refused: reg!(IntCounterVec::new(
                Opts::new(
                    "events_refused_total",
                    "Valid events whose gradient alone the apply rule would refuse (gradient_norm, \
                     gradient_non_finite, gradient_failed): dead-lettered, while the rest of their batch is learned"
                ),
                &["reason"]
            )),
            dead_letters: reg!(IntCounterVec::new(
                Opts::new("dead_letters_total", "Invalid events written to the dead-letter topic, by delivery result"),
                &["result"]
            )),
            examples_learned: reg!(IntCounter::new("examples_learned_total", "Examples in applied gradient records")),
            records_produced: reg!(IntCounter::new("records_produced_total", "Gradient records this replica appended")),
            record_round_trip: reg!(Histogram::with_opts(hist(
                "record_round_trip_seconds",
                "A gradient record of this replica's, from sent to applied here"
            ))),
            trainer_stage: reg!(HistogramVec::new(
                hist(
                    "trainer_stage_seconds",
                    "A trainer's record cycle by stage: merge, gradient, send, applied, served, starved"
                ),
                &["stage"]
            )),
            merge_holds_released: reg!(IntCounter::new(
                "trainer_merge_holds_released_total",
                "Times a trainer stopped waiting for a partition with events still to fetch and merged without it \
                 (events then learned out of event-time order)"
            )),
            records_applied: reg!(IntCounter::new("records_applied_total", "Update-log records applied")),
            records_too_large: reg!(IntCounter::new(
                "records_too_large_total",
                "Gradient records over train.max_record_bytes or the broker's limit: their events are learned again \
                 in smaller batches (one event alone that large is skipped)"
            )),
            records_rejected: reg!(IntCounterVec::new(
                Opts::new("records_rejected_total", "Update-log records rejected, by reason"),
                &["reason"]
            )),
            consumer_lag: reg!(IntGaugeVec::new(
                Opts::new("consumer_lag", "Events not yet learned, per owned partition"),
                &["partition"]
            )),
            events_below_watermark: reg!(IntCounter::new(
                "events_below_watermark_total",
                "Events partitions found ending below their applied watermark: the events topic \
                 was deleted and recreated, or truncated; events at offsets below the watermark are not learned"
            )),
            freshness: reg!(Histogram::with_opts(
                HistogramOpts::new("freshness_seconds", "Event time to the first serving snapshot that includes it")
                    .buckets(buckets_freshness())
            )),
            staleness_records: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "staleness_records",
                    "Update-log records between the version an applied gradient was computed at and its own offset"
                )
                .buckets(buckets_staleness_records())
            )),
            staleness_examples: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "staleness_examples",
                    "Examples learned between the version an applied gradient was computed at and its own offset"
                )
                .buckets(buckets_staleness_examples())
            )),
            swaps: reg!(IntCounter::new("swaps_total", "Serving-snapshot swaps")),
            swap_duration: reg!(Histogram::with_opts(hist(
                "swap_duration_seconds",
                "Time to build and swap a serving snapshot"
            ))),
            swap_full_copies: reg!(IntCounter::new(
                "swap_full_copies_total",
                "Swaps that copied the whole model because the retired snapshot was still read"
            )),
            checkpoints: reg!(IntCounterVec::new(
                Opts::new("checkpoints_total", "Checkpoint writes by result"),
                &["result"]
            )),
            checkpoint_age: reg!(Gauge::new(
                "checkpoint_age_seconds",
                "Age of the newest checkpoint written or loaded"
            )),
            progressive_logloss: reg!(Gauge::new(
                "progressive_logloss",
                "Mean progressive loss over every learned example"
            )),
            ready: reg!(IntGauge::new("ready", "1 when caught up with the update log and serving")),
            update_log_start: reg!(IntGauge::new(
                "update_log_start",
                "Where the update log starts after this replica last trimmed it (checkpoint.trim_update_log)"
            )),
            update_log_stalled: reg!(IntGauge::new(
                "update_log_stalled",
                "1 when this replica stopped applying because the update log no longer continues its position \
                 (records deleted below it, or a gap): it serves its last weights, not ready"
            )),
            rollbacks: reg!(IntCounterVec::new(
                Opts::new(
                    "rollbacks_total",
                    "Rollback records taken, by what became of the events since (relearn, skip)"
                ),
                &["events"]
            )),
            rollback_replayed_records: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "rollback_replayed_records",
                    "Update-log records a rollback replayed from the newest checkpoint at or before its target \
                     (the target's distance from that checkpoint; the whole log when none is left)"
                )
                .buckets(vec![0.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0])
            )),
            divergences: reg!(IntCounter::new(
                "divergences_detected_total",
                "Loss spikes the divergence guard saw and answered with a rollback record"
            )),
            admin_denied: reg!(IntCounter::new(
                "admin_denied_total",
                "Admin requests refused for a missing or wrong token"
            )),
            events_ingested: reg!(IntCounterVec::new(
                Opts::new(
                    "events_ingested_total",
                    "Events posted to /v1/events, by result (produced, invalid, failed)"
                ),
                &["result"]
            )),
            registry,
            families,
        };
        for result in ["delivered", "failed"] {
            m.dead_letters.with_label_values(&[result]);
        }
        for reason in ["gradient_norm", "gradient_non_finite", "gradient_failed"] {
            m.events_refused.with_label_values(&[reason]);
        }
        for result in ["ok", "error"] {
            m.checkpoints.with_label_values(&[result]);
        }
        for result in ["produced", "invalid", "failed"] {
            m.events_ingested.with_label_values(&[result]);
        }
        for events in crate::update_log::record::EventsSince::ALL {
            m.rollbacks.with_label_values(&[events.as_str()]);
        }
        for r in Reject::ALL {
            m.records_rejected.with_label_values(&[r.as_str()]);
        }
        m
    }

    /// Every series name this replica can export, whether or not it has a
    /// value yet: a histogram's `_bucket`, `_sum` and `_count`, the others'
    /// own names. Dashboards and alert rules are checked against these.
    pub fn series_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for (name, kind) in &self.families {
            let full = format!("{NAMESPACE}_{name}");
            match kind {
                MetricType::HISTOGRAM => names.extend(["_bucket", "_sum", "_count"].map(|s| format!("{full}{s}"))),
                _ => names.push(full),
            }
        }
        names
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}
