//! The applier: reads the whole `updates` log in order and is the one writer
//! of the replica's state. What a record does to the state (the apply rule,
//! the optimizer) is in [`crate::state`]; this module owns the loop around
//! it: fetching, publishing snapshots, readiness, checkpoints, rollbacks and
//! the divergence guard.

pub mod applier;
pub mod attest;
pub mod checkpointing;
pub mod guard;
pub mod handle;
mod log_reader;
mod outcomes;
pub mod progress;
pub mod rollback;
pub mod staleness;
mod swaps;
