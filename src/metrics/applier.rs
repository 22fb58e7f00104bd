//! The applier's metrics: the update log applied (records, examples,
//! rejections, staleness), what is served (version, swaps, freshness,
//! loss), and whether the replica is ready or stalled.

use prometheus::{Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge};

use super::{opts, seconds, Registrar};
use crate::state::Reject;

pub struct ApplierMetrics {
    pub model_version: IntGauge,
    pub examples_learned: IntCounter,
    pub records_applied: IntCounter,
    pub records_rejected: IntCounterVec,
    pub freshness: Histogram,
    pub staleness_records: Histogram,
    pub staleness_examples: Histogram,
    pub swaps: IntCounter,
    pub swap_duration: Histogram,
    pub swap_full_copies: IntCounter,
    pub progressive_logloss: Gauge,
    pub ready: IntGauge,
    pub update_log_stalled: IntGauge,
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

impl ApplierMetrics {
    pub fn new(r: &mut Registrar) -> ApplierMetrics {
        let m = ApplierMetrics {
            model_version: r.add(IntGauge::new("model_version", "Served model version (the updates position)")),
            examples_learned: r.add(IntCounter::new("examples_learned_total", "Examples in applied gradient records")),
            records_applied: r.add(IntCounter::new("records_applied_total", "Update-log records applied")),
            records_rejected: r.add(IntCounterVec::new(
                opts("records_rejected_total", "Update-log records rejected, by reason"),
                &["reason"],
            )),
            freshness: r.add(Histogram::with_opts(
                HistogramOpts::new("freshness_seconds", "Event time to the first serving snapshot that includes it")
                    .buckets(buckets_freshness()),
            )),
            staleness_records: r.add(Histogram::with_opts(
                HistogramOpts::new(
                    "staleness_records",
                    "Update-log records between the version an applied gradient was computed at and its own offset",
                )
                .buckets(buckets_staleness_records()),
            )),
            staleness_examples: r.add(Histogram::with_opts(
                HistogramOpts::new(
                    "staleness_examples",
                    "Examples learned between the version an applied gradient was computed at and its own offset",
                )
                .buckets(buckets_staleness_examples()),
            )),
            swaps: r.add(IntCounter::new("swaps_total", "Serving-snapshot swaps")),
            swap_duration: r.add(Histogram::with_opts(seconds(
                "swap_duration_seconds",
                "Time to build and swap a serving snapshot",
            ))),
            swap_full_copies: r.add(IntCounter::new(
                "swap_full_copies_total",
                "Swaps that copied the whole model because the retired snapshot was still read",
            )),
            progressive_logloss: r
                .add(Gauge::new("progressive_logloss", "Mean progressive loss over every learned example")),
            ready: r.add(IntGauge::new("ready", "1 when caught up with the update log and serving")),
            update_log_stalled: r.add(IntGauge::new(
                "update_log_stalled",
                "1 when this replica stopped applying because the update log no longer continues its position \
                 (records deleted below it, or a gap): it serves its last weights, not ready",
            )),
        };
        for reason in Reject::ALL {
            m.records_rejected.with_label_values(&[reason.as_str()]);
        }
        m
    }
}
