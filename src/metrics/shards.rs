//! A sharded replica's gathers of rows from the other shards: asks per
//! shard by outcome, the hedges, and how long a gather took.

use prometheus::{Histogram, IntCounterVec};

use super::{opts, seconds, Registrar};

#[derive(Clone)]
pub struct ShardMetrics {
    /// Asks of a shard's replica: `shard`, and `outcome` `answered`,
    /// `failed` (an error, a wrong answer) or `hedged` (its next replica
    /// asked too, after `shard.hedge_after_ms` without an answer).
    pub asks: IntCounterVec,
    /// Gathers in which a shard had no replica answering: a 503 or a batch
    /// read again.
    pub unavailable: IntCounterVec,
    /// One gather from every shard a batch reads, answered or not.
    pub gather_duration: Histogram,
}

impl ShardMetrics {
    pub fn new(r: &mut Registrar) -> ShardMetrics {
        ShardMetrics {
            asks: r.add(IntCounterVec::new(
                opts(
                    "shard_asks_total",
                    "Rows asked of another shard's replica, by shard and outcome (answered, failed, hedged)",
                ),
                &["shard", "outcome"],
            )),
            unavailable: r.add(IntCounterVec::new(
                opts("shard_unavailable_total", "Gathers in which a shard had no replica answering, by shard"),
                &["shard"],
            )),
            gather_duration: r.add(Histogram::with_opts(seconds(
                "shard_gather_duration_seconds",
                "One gather of a batch's rows from the other shards",
            ))),
        }
    }
}
