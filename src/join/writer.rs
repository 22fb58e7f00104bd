//! The join's writing side: its transactional producer, and a batch's
//! decisions as the records of one transaction (joined events, dead
//! letters, the changelog's changes) with the consumed offsets.

use std::time::Duration;

use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::TopicPartitionList;
use serde_json::Value;

use super::records::Joining;
use super::window::{Out, Refused};
use super::{changelog, Batch};
use crate::config::{Config, OnExpiry};
use crate::event::{EventCodec, Featurizer};
use crate::update_log::kafka;

pub const TRANSACTION_LIMIT: Duration = Duration::from_secs(30);

pub struct Writer {
    producer: ThreadedProducer<DefaultProducerContext>,
    events: String,
    changelog: String,
    dead_letters: String,
    predictions: String,
    labels: String,
    replica_id: String,
    on_expiry: OnExpiry,
    default_label: Value,
    featurizer: Featurizer,
    codec: EventCodec,
}

impl Writer {
    pub fn new(config: &Config, featurizer: Featurizer) -> anyhow::Result<Writer> {
        let (k, f) = (&config.kafka, &config.feedback);
        let producer = kafka::producer_config(&kafka::Connection::of(k)?, &format!("{}-join", config.replica_id))
            // One id per replica of the fleet (its group): a restarted
            // joiner fences its own former self; another member's zombie is
            // fenced by the group's generation when it commits offsets
            // (KIP-447). Fleets sharing a cluster do not fence each other.
            .set("transactional.id", format!("tributary-join-{}-{}", k.group_id, config.replica_id))
            .set("linger.ms", "5")
            // Joined events keyed by id, partitioned as the predictions.
            .set("partitioner", "murmur2_random")
            .create()?;
        Ok(Writer {
            producer,
            events: k.events_topic.clone(),
            changelog: f.changelog_topic(),
            dead_letters: k.dlq_topic.clone(),
            predictions: f.predictions_topic.clone(),
            labels: f.labels_topic.clone(),
            replica_id: config.replica_id.clone(),
            on_expiry: f.on_expiry,
            default_label: f.default_label.clone(),
            codec: EventCodec::new(k, &featurizer).map_err(anyhow::Error::msg)?,
            featurizer,
        })
    }

    /// Fences this replica's former joiner and readies the producer.
    pub fn init(&self) -> Result<(), KafkaError> {
        self.producer.init_transactions(TRANSACTION_LIMIT)
    }

    /// Writes the batch and the consumed `offsets` in one transaction.
    pub fn commit(
        &self,
        batch: &Batch,
        offsets: &TopicPartitionList,
        group: &ConsumerGroupMetadata,
    ) -> Result<(), KafkaError> {
        self.producer.begin_transaction()?;
        let joining = Joining { featurizer: &self.featurizer, codec: &self.codec, default_label: &self.default_label };
        for out in &batch.out {
            self.write(out, &joining)?;
        }
        for (partition, is_label, record, why) in &batch.invalid {
            let topic = if *is_label { &self.labels } else { &self.predictions };
            self.dead_letter(*partition, None, topic, record, "record_invalid", why)?;
        }
        // Delivered first: the crate's commit would flush in 100 ms steps.
        kafka::flush_promptly(&self.producer, TRANSACTION_LIMIT)?;
        self.producer.send_offsets_to_transaction(offsets, group, TRANSACTION_LIMIT)?;
        self.producer.commit_transaction(TRANSACTION_LIMIT)
    }

    pub fn abort(&self) -> Result<(), KafkaError> {
        self.producer.abort_transaction(TRANSACTION_LIMIT)
    }

    pub fn flush(&self) {
        let _ = kafka::flush_promptly(&self.producer, Duration::from_secs(5));
    }

    /// One decision of the window as records of the transaction.
    fn write(&self, out: &Out, joining: &Joining<'_>) -> Result<(), KafkaError> {
        match out {
            Out::Joined { partition, id, prediction, label, .. } => {
                if label.is_none() && self.on_expiry == OnExpiry::Drop {
                    return Ok(());
                }
                match joining.event(prediction, label.as_deref()) {
                    Ok((event, ts)) => {
                        let record = BaseRecord::to(&self.events).key(id.as_bytes()).payload(&event[..]);
                        self.send(record.timestamp(ts))
                    }
                    Err(why) => {
                        let record = label.as_deref().unwrap_or(prediction);
                        self.dead_letter(*partition, Some(id), &self.predictions, record, "event_invalid", &why)
                    }
                }
            }
            Out::DeadLetter { partition, id, record, refused } => {
                let (topic, why) = match refused {
                    Refused::Unknown => (&self.labels, "no prediction had this id within the window"),
                    Refused::Late => (&self.labels, "the prediction's window had passed"),
                    Refused::Duplicate => (&self.labels, "the prediction already had a label"),
                    Refused::DuplicatePrediction => {
                        (&self.predictions, "a prediction was logged under this id already")
                    }
                };
                self.dead_letter(*partition, Some(id), topic, record, refused.kind(), why)
            }
            Out::Changelog { partition, id, entry } => {
                let value = entry.as_ref().map(|(e, _)| changelog::value_of(e));
                let mut record: BaseRecord<'_, [u8], [u8]> =
                    BaseRecord::to(&self.changelog).partition(*partition).key(id.as_bytes());
                if let (Some(value), Some((_, time))) = (&value, entry) {
                    record = record.payload(value).timestamp(*time);
                }
                self.send(record)
            }
        }
    }

    /// A record the join refused, to the dead-letter topic: as it came,
    /// with why and where from in headers, keyed by its id.
    fn dead_letter(
        &self,
        partition: i32,
        id: Option<&str>,
        topic: &str,
        record: &[u8],
        kind: &str,
        why: &str,
    ) -> Result<(), KafkaError> {
        let partition = partition.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header { key: "tributary.reason", value: Some(why) })
            .insert(Header { key: "tributary.reason_kind", value: Some(kind) })
            .insert(Header { key: "tributary.topic", value: Some(topic) })
            .insert(Header { key: "tributary.partition", value: Some(partition.as_str()) })
            .insert(Header { key: "tributary.replica", value: Some(self.replica_id.as_str()) });
        let mut dead: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&self.dead_letters).payload(record).headers(headers);
        dead.key = id.map(str::as_bytes);
        self.send(dead)
    }

    /// Queues one record of the transaction, waiting while the queue is full.
    fn send(&self, mut record: BaseRecord<'_, [u8], [u8]>) -> Result<(), KafkaError> {
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(e),
            }
        }
    }
}
