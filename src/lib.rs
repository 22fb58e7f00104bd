//! tributary: a fleet of identical replicas that learn online from a Kafka
//! stream of training events and serve predictions over HTTP from the newest
//! weights. Read `DESIGN.md` (in the team's shared folder) for the protocol;
//! this crate is laid out by role:
//!
//! - [`model`]: parameter layout, seeded weights, forward pass, libtorch
//!   training graph. Knows neither HTTP nor Kafka.
//! - [`event`]: the event and instance schema, hashing of sparse values.
//! - [`train`]: the trainer, a consumer-group member that turns batches of
//!   events into gradient records.
//! - [`log`]: the `updates` log: record format, Kafka clients, topics.
//! - [`apply`]: the applier, the one writer of the replica's state; the
//!   apply rule and the optimizer.
//! - [`serving`]: the serving snapshot behind arc-swap and its publisher.
//! - [`serve`]: the HTTP API, which reads only the serving snapshot.
//! - [`checkpoint`]: snapshots of the state, for recovery.
//! - [`startup`]: builds a replica from its configuration, for `main` and tests.

#[cfg(target_endian = "big")]
compile_error!("tributary's record and checkpoint formats assume a little-endian target");

pub mod apply;
pub mod checkpoint;
pub mod config;
pub mod event;
pub mod ingest;
pub mod log;
pub mod metrics;
pub mod model;
pub mod serve;
pub mod serving;
pub mod startup;
pub mod synthetic;
pub mod telemetry;
pub mod train;
