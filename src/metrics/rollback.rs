//! Rollbacks taken and what they replayed, and the divergence guard's
//! detections.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec};

use super::{opts, Registrar};
use crate::update_log::record::EventsSince;

pub struct RollbackMetrics {
    pub rollbacks: IntCounterVec,
    pub replayed_records: Histogram,
    pub divergences: IntCounter,
}

impl RollbackMetrics {
    pub fn new(r: &mut Registrar) -> RollbackMetrics {
        let m = RollbackMetrics {
            rollbacks: r.add(IntCounterVec::new(
                opts("rollbacks_total", "Rollback records taken, by what became of the events since (relearn, skip)"),
                &["events"],
            )),
            replayed_records: r.add(Histogram::with_opts(
                HistogramOpts::new(
                    "rollback_replayed_records",
                    "Update-log records a rollback replayed from the newest checkpoint at or before its target \
                     (the target's distance from that checkpoint; the whole log when none is left)",
                )
                .buckets(vec![0.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0]),
            )),
            divergences: r.add(IntCounter::new(
                "divergences_detected_total",
                "Loss spikes the divergence guard saw and answered with a rollback record",
            )),
        };
        for events in EventsSince::ALL {
            m.rollbacks.with_label_values(&[events.as_str()]);
        }
        m
    }
}
