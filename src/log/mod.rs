//! The `updates` log: the record format and the Kafka plumbing around it.

pub mod kafka;
pub mod record;
