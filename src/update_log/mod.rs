//! The `updates` log: the record format and the Kafka plumbing around it.

pub mod control;
pub mod kafka;
pub mod record;
