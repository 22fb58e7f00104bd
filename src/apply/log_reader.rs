//! The applier's reader of `updates`: where it reads from, the log's end as
//! of start-up (what readiness waits for), and the read errors it says while
//! the broker is away. Knows nothing of what the records do.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::BorrowedMessage;
use rdkafka::{Offset, TopicPartitionList};
use tracing::{info, warn};

use super::rollback::LogSource;
use crate::config::Config;
use crate::update_log::kafka;

/// How many times the start-up asks the broker for the update log's end
/// (each ask waits up to 2 s) before reading on without it.
const LOG_END_ATTEMPTS: u32 = 5;

/// A read error is said at most this often while it lasts.
const READ_ERROR_SAID_EVERY: Duration = Duration::from_secs(5);

pub(super) struct LogReader {
    consumer: BaseConsumer,
    /// For the other readers of the log (a rollback's replay, the guard's check).
    connection: kafka::Connection,
    topic: String,
    /// The client id of the reader that replays the log for a rollback.
    replay_client_id: String,
    /// The log end as of start-up: listed, or the first fetch response's
    /// when the broker could not list it (see `kafka::fetched_end`).
    start_end: Option<i64>,
    last_read_error: Option<Instant>,
    /// Whether the trainer bounds the records it has not seen
    /// (`train.max_unseen_records`), and so needs the log end.
    trainer_needs_end: bool,
}

impl LogReader {
    pub(super) fn new(config: &Config) -> anyhow::Result<LogReader> {
        let connection = kafka::Connection::of(&config.kafka)?;
        Ok(LogReader {
            consumer: kafka::log_reader_config(&connection, &config.replica_id).create()?,
            connection,
            topic: config.kafka.updates_topic.clone(),
            replay_client_id: format!("{}-replay", config.replica_id),
            start_end: None,
            last_read_error: None,
            trainer_needs_end: config.train.max_unseen_records > 0,
        })
    }

    /// Reads from `position`, and notes the log's end as of now; refuses a
    /// position ahead of it.
    pub(super) fn start_at(&mut self, position: i64) -> anyhow::Result<()> {
        self.read_from(position)?;
        let listed_end = self.list_log_end();
        info!(position, log_end = ?listed_end, "applier started");
        if let Some(end) = listed_end.filter(|&end| end < position) {
            anyhow::bail!(ahead_of_log(position, &self.topic, end));
        }
        self.start_end = listed_end;
        Ok(())
    }

    /// The next record fetched will be the one at `position`.
    pub(super) fn read_from(&self, position: i64) -> anyhow::Result<()> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, 0, Offset::Offset(position))?;
        self.consumer.assign(&tpl)?;
        Ok(())
    }

    /// The update log's end, asked of the broker up to `LOG_END_ATTEMPTS`
    /// times. An unanswered ask is never taken for an empty log (which
    /// would refuse every checkpoint): after the last one the end is left
    /// unknown, and the first fetch response's is checked instead
    /// ([`LogReader::learn_start_end`]).
    fn list_log_end(&self) -> Option<i64> {
        for attempt in 1..=LOG_END_ATTEMPTS {
            if let Some(end) = kafka::log_end(&self.consumer, &self.topic) {
                return Some(end);
            }
            warn!(attempt, of = LOG_END_ATTEMPTS, "the broker did not say where the update log ends; asking again");
        }
        None
    }

    /// Without a listed start-up end: the first fetch response's, once
    /// there is one; a `position` ahead of it is refused.
    pub(super) fn learn_start_end(&mut self, position: i64) -> anyhow::Result<()> {
        if self.start_end.is_some() {
            return Ok(());
        }
        if let Some(fetched) = self.fetched_end() {
            if fetched < position {
                anyhow::bail!(ahead_of_log(position, &self.topic, fetched));
            }
            self.start_end = Some(fetched);
        }
        Ok(())
    }

    pub(super) fn start_end(&self) -> Option<i64> {
        self.start_end
    }

    pub(super) fn poll(&self, timeout: Duration) -> Option<KafkaResult<BorrowedMessage<'_>>> {
        self.consumer.poll(timeout)
    }

    /// The log's first offset, asked of the broker.
    pub(super) fn log_start(&self) -> Option<i64> {
        kafka::log_start(&self.consumer, &self.topic)
    }

    /// The log's end as of the last fetch (no request to the broker).
    pub(super) fn fetched_end(&self) -> Option<i64> {
        kafka::fetched_end(&self.consumer, &self.topic, 0)
    }

    /// The log's end for the trainer's bound on records it has not seen:
    /// 0 when it has no such bound, or before a fetch.
    pub(super) fn end_for_the_trainer(&self) -> i64 {
        if self.trainer_needs_end {
            self.fetched_end().unwrap_or(0)
        } else {
            0
        }
    }

    /// Says a read error, at most every `READ_ERROR_SAID_EVERY`.
    pub(super) fn say_read_error(&mut self, e: &KafkaError) {
        if self.last_read_error.is_none_or(|t| t.elapsed() >= READ_ERROR_SAID_EVERY) {
            warn!(error = %e, "cannot read the update log; serving the last weights, retrying");
            self.last_read_error = Some(Instant::now());
        }
    }

    /// Where a rollback's replay reads the log.
    pub(super) fn replay_source(&self) -> LogSource<'_> {
        LogSource { connection: &self.connection, topic: &self.topic, client_id: &self.replay_client_id }
    }

    pub(super) fn connection(&self) -> &kafka::Connection {
        &self.connection
    }

    pub(super) fn topic(&self) -> &str {
        &self.topic
    }
}

/// Why a replica refuses a checkpoint beyond the end of its update log:
/// reading on would wait for offsets that new records will reuse.
fn ahead_of_log(position: i64, topic: &str, end: i64) -> String {
    format!(
        "the checkpoint is at position {position} of {topic:?} but that log ends at {end}: the topic was deleted \
         or recreated, or the checkpoint belongs to another cluster. Remove the checkpoints to start from the seed \
         weights, or point the replica at the right brokers."
    )
}
