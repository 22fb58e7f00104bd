//! All integration tests build into this one binary (one link, not one per
//! file). `api` drives the HTTP router in process; `fleet` runs real
//! processes: Apache Kafka brokers and tributary replicas, killed with SIGKILL.
//! Tests whose name starts with `slow_` inject faults and take longer:
//! `scripts/test --quick` skips them, CI runs them.

mod api;
mod boundaries;
mod browser;
mod cli;
mod clients;
mod deploy;
mod endpoints;
mod faults;
mod features;
mod feedback;
mod fleet;
mod helpers;
mod kafka_cluster;
mod quality;
mod rollback;
mod shards;
mod torchscript;
