//! The joiner's changelog (`{predictions}.join`, compacted, one partition
//! per predictions partition): every change of the open window, written in
//! the same transaction as the joined events and the consumed offsets, and
//! read back when a partition is assigned. A record is keyed by the id;
//! its value is a tag and what the entry holds, its timestamp the entry's
//! time; a tombstone (no value) forgets the id.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

use super::window::{Closed, Entry, Window};
use crate::config::Config;
use crate::update_log::kafka;

/// How long a partition's changelog may take to read back before the
/// joiner gives up and stops (a broker away that long stops the role;
/// the replica reports it).
const RESTORE_LIMIT: Duration = Duration::from_secs(120);

/// The restore's consumer context: the end of a partition is what it
/// reads to, not an error to log (librdkafka reports it as one).
struct QuietEof;

impl ClientContext for QuietEof {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF) {
            tracing::error!(error = %error, reason, "the changelog's reader");
        }
    }
}

impl ConsumerContext for QuietEof {}

/// An entry as the changelog holds it.
pub fn value_of(entry: &Entry) -> Vec<u8> {
    let (tag, body): (u8, &[u8]) = match entry {
        Entry::Open(record) => (b'P', record),
        Entry::Held(record) => (b'L', record),
        Entry::Closed(Closed::Joined) => (b'J', b""),
        Entry::Closed(Closed::Expired) => (b'E', b""),
    };
    let mut value = Vec::with_capacity(1 + body.len());
    value.push(tag);
    value.extend_from_slice(body);
    value
}

/// The entry of a changelog value; `None` for one this code never wrote.
pub fn entry_of(value: &[u8]) -> Option<Entry> {
    let (&tag, body) = value.split_first()?;
    Some(match tag {
        b'P' => Entry::Open(body.into()),
        b'L' => Entry::Held(body.into()),
        b'J' => Entry::Closed(Closed::Joined),
        b'E' => Entry::Closed(Closed::Expired),
        _ => return None,
    })
}

/// Reads `partitions` of the changelog from their start to their last
/// committed record into `window`. Returns the records read.
pub fn restore(config: &Config, partitions: &[i32], window: &mut Window) -> anyhow::Result<u64> {
    let topic = config.feedback.changelog_topic();
    let connection = kafka::Connection::of(&config.kafka)?;
    let consumer: BaseConsumer<QuietEof> =
        kafka::base_config(&connection, &format!("{}-join-restore", config.replica_id))
            .set("group.id", format!("{}-join-restore", config.replica_id))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest")
            // Each empty partition's end is a fetch away: librdkafka's 500 ms
            // default made an assignment of empty partitions take 1.5 s.
            .set("fetch.wait.max.ms", "10")
            .create_with_context(QuietEof)?;
    let mut assignment = TopicPartitionList::new();
    for &p in partitions {
        assignment.add_partition_offset(&topic, p, Offset::Beginning)?;
        window.begin(p);
    }
    consumer.assign(&assignment)?;
    let (mut open, mut read) = (partitions.iter().copied().collect::<HashSet<i32>>(), 0u64);
    let deadline = Instant::now() + RESTORE_LIMIT;
    while !open.is_empty() {
        anyhow::ensure!(Instant::now() < deadline, "the changelog {topic} was not read back in {RESTORE_LIMIT:?}");
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                open.remove(&p);
            }
            Some(Err(e)) => tracing::warn!(error = %e, topic, "reading the changelog back"),
            Some(Ok(m)) => {
                let Some(id) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else { continue };
                let time = m.timestamp().to_millis().unwrap_or(0);
                window.restore(m.partition(), id, m.payload().and_then(entry_of).map(|e| (e, time)));
                read += 1;
            }
        }
    }
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_reads_back_as_written() {
        for entry in [
            Entry::Open(b"{\"id\":\"a\"}".as_slice().into()),
            Entry::Held(b"{}".as_slice().into()),
            Entry::Closed(Closed::Joined),
            Entry::Closed(Closed::Expired),
        ] {
            assert_eq!(entry_of(&value_of(&entry)), Some(entry));
        }
        assert_eq!(entry_of(b""), None);
        assert_eq!(entry_of(b"X"), None);
    }
}
