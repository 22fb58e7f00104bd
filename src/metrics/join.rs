//! The join of logged predictions with their late labels: what the window
//! holds, how predictions left it, what was dead-lettered, and how long a
//! label took to become a committed training event.

use prometheus::{Histogram, IntCounterVec, IntGauge};

use super::{opts, seconds, Registrar};

#[derive(Clone)]
pub struct JoinMetrics {
    /// Predictions waiting for their label.
    pub open: IntGauge,
    /// Everything the window holds: open predictions, labels waiting for
    /// their prediction, ids remembered after their end
    /// (`feedback.max_open` bounds it).
    pub entries: IntGauge,
    /// Predictions by how they left the window: `labeled`, `expired`,
    /// `expired_early` (the window was full).
    pub predictions: IntCounterVec,
    /// Records the join refused, by reason: `label_unknown`,
    /// `label_late`, `label_duplicate`, `prediction_duplicate`,
    /// `record_invalid` (not a record of the topic's form),
    /// `event_invalid` (the joined event is not one the model reads).
    pub dead_letters: IntCounterVec,
    /// Join transactions by result: `committed`, `aborted`.
    pub transactions: IntCounterVec,
    /// From a label's record time to its joined event's commit.
    pub latency: Histogram,
    /// One transaction's writing and commit.
    pub commit_duration: Histogram,
}

impl JoinMetrics {
    pub fn new(r: &mut Registrar) -> JoinMetrics {
        let m = JoinMetrics {
            open: r.add(IntGauge::with_opts(opts("join_open_predictions", "Predictions waiting for their label"))),
            entries: r.add(IntGauge::with_opts(opts(
                "join_window_entries",
                "Open predictions, labels waiting for their prediction and ids remembered after their end",
            ))),
            predictions: r.add(IntCounterVec::new(
                opts(
                    "join_predictions_total",
                    "Predictions that left the join's window, by ending (labeled, expired, expired_early)",
                ),
                &["ending"],
            )),
            dead_letters: r.add(IntCounterVec::new(
                opts("join_dead_letters_total", "Records the join dead-lettered, by reason"),
                &["reason"],
            )),
            transactions: r.add(IntCounterVec::new(
                opts("join_transactions_total", "Join transactions, by result (committed, aborted)"),
                &["result"],
            )),
            latency: r.add(Histogram::with_opts(seconds(
                "join_latency_seconds",
                "From a label's record time to its joined training event's commit",
            ))),
            commit_duration: r.add(Histogram::with_opts(seconds(
                "join_commit_duration_seconds",
                "One join transaction: its records written and committed",
            ))),
        };
        for ending in ["labeled", "expired", "expired_early"] {
            m.predictions.with_label_values(&[ending]);
        }
        for result in ["committed", "aborted"] {
            m.transactions.with_label_values(&[result]);
        }
        m
    }
}
