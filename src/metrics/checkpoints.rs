//! Checkpoints written and their age, and the update log trimmed after them.

use prometheus::{Gauge, IntCounterVec, IntGauge};

use super::{opts, Registrar};

pub struct CheckpointMetrics {
    pub written: IntCounterVec,
    pub age: Gauge,
    pub update_log_start: IntGauge,
}

impl CheckpointMetrics {
    pub fn new(r: &mut Registrar) -> CheckpointMetrics {
        let m = CheckpointMetrics {
            written: r.add(IntCounterVec::new(opts("checkpoints_total", "Checkpoint writes by result"), &["result"])),
            age: r.add(Gauge::new("checkpoint_age_seconds", "Age of the newest checkpoint written or loaded")),
            update_log_start: r.add(IntGauge::new(
                "update_log_start",
                "Where the update log starts after this replica last trimmed it (checkpoint.trim_update_log)",
            )),
        };
        for result in ["ok", "error"] {
            m.written.with_label_values(&[result]);
        }
        m
    }
}
