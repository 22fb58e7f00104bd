//! The trainer's metrics: events read, refused and dead-lettered, its
//! records and their cycle, the merge, the lag of its partitions.

use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec};

use super::{opts, seconds, Registrar};

pub struct TrainerMetrics {
    pub events_consumed: IntCounter,
    pub events_invalid: IntCounter,
    pub events_refused: IntCounterVec,
    pub dead_letters: IntCounterVec,
    pub records_produced: IntCounter,
    pub record_round_trip: Histogram,
    /// Where a trainer's record cycle goes, by stage (see `train::stages`).
    pub stage: HistogramVec,
    pub merge_holds_released: IntCounter,
    pub partitions_read_again: IntCounter,
    pub records_too_large: IntCounter,
    pub consumer_lag: IntGaugeVec,
    pub events_below_watermark: IntCounter,
}

impl TrainerMetrics {
    pub fn new(r: &mut Registrar) -> TrainerMetrics {
        let m = TrainerMetrics {
            events_consumed: r.add(IntCounter::new("events_consumed_total", "Training events read from Kafka")),
            events_invalid: r
                .add(IntCounter::new("events_invalid_total", "Training events that failed parsing or validation")),
            events_refused: r.add(IntCounterVec::new(
                opts(
                    "events_refused_total",
                    "Valid events whose gradient alone the apply rule would refuse (gradient_norm, \
                     gradient_non_finite, gradient_failed): dead-lettered, while the rest of their batch is learned",
                ),
                &["reason"],
            )),
            dead_letters: r.add(IntCounterVec::new(
                opts("dead_letters_total", "Invalid events written to the dead-letter topic, by delivery result"),
                &["result"],
            )),
            records_produced: r
                .add(IntCounter::new("records_produced_total", "Gradient records this replica appended")),
            record_round_trip: r.add(Histogram::with_opts(seconds(
                "record_round_trip_seconds",
                "A gradient record of this replica's, from sent to applied here",
            ))),
            stage: r.add(HistogramVec::new(
                seconds(
                    "trainer_stage_seconds",
                    "A trainer's record cycle by stage: merge, gradient, send, applied, served, starved",
                ),
                &["stage"],
            )),
            merge_holds_released: r.add(IntCounter::new(
                "trainer_merge_holds_released_total",
                "Times a trainer stopped waiting for a partition with events still to fetch and merged without it \
                 (events then learned out of event-time order)",
            )),
            partitions_read_again: r.add(IntCounter::new(
                "trainer_partitions_read_again_total",
                "Times a trainer read a partition again from its next record's start because an event came after \
                 events beyond it (no event is lost or learned twice; it should stay 0)",
            )),
            records_too_large: r.add(IntCounter::new(
                "records_too_large_total",
                "Gradient records over train.max_record_bytes or the broker's limit: their events are learned again \
                 in smaller batches (one event alone that large is skipped)",
            )),
            consumer_lag: r.add(IntGaugeVec::new(
                opts("consumer_lag", "Events not yet learned, per owned partition"),
                &["partition"],
            )),
            events_below_watermark: r.add(IntCounter::new(
                "events_below_watermark_total",
                "Events partitions found ending below their applied watermark: the events topic \
                 was deleted and recreated, or truncated; events at offsets below the watermark are not learned",
            )),
        };
        for result in ["delivered", "failed"] {
            m.dead_letters.with_label_values(&[result]);
        }
        for reason in ["gradient_norm", "gradient_non_finite", "gradient_failed"] {
            m.events_refused.with_label_values(&[reason]);
        }
        m
    }
}
