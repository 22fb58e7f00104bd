//! Callbacks of the trainer's Kafka clients.
//!
//! The rebalance callback runs inside `poll` on the trainer's own thread, so
//! it may block: on assignment it waits for the applier to read the update
//! log to its end as of now, then assigns each new partition at its applied
//! watermark. No event before the watermark is fetched, and none after it is
//! skipped.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaResult;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tracing::{error, info, warn};

use crate::apply::progress::Progress;
use crate::lifecycle::StopRequest;
use crate::update_log::kafka;

/// How long an assignment waits for the applier to catch up with the log.
/// The callback blocks `poll`, so this stays well under
/// `max.poll.interval.ms`; past it the partitions are assigned but the
/// trainer holds them (takes no event) until the applier gets there.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(4);

#[derive(Debug)]
pub enum Rebalanced {
    /// Partitions and the watermark each starts at; and, if the applier
    /// had not caught up in time, the log position to wait for before
    /// learning (the watermarks are then re-read).
    Assigned(Vec<(i32, i64)>, Option<i64>),
    Revoked(Vec<i32>),
}

pub struct TrainerContext {
    updates_topic: String,
    progress: Arc<Progress>,
    stop: StopRequest,
    events: Mutex<Vec<Rebalanced>>,
}

impl TrainerContext {
    pub fn new(updates_topic: String, progress: Arc<Progress>, stop: StopRequest) -> Self {
        TrainerContext { updates_topic, progress, stop, events: Mutex::new(Vec::new()) }
    }

    pub fn take_events(&self) -> Vec<Rebalanced> {
        std::mem::take(&mut *self.events.lock().expect("events lock"))
    }

    fn assign(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) -> KafkaResult<()> {
        let end = kafka::log_end(consumer, &self.updates_topic);
        let caught_up = match end {
            Some(end) => self.progress.wait_for(end, Instant::now() + CATCH_UP_LIMIT, &self.stop),
            None => false,
        };
        let hold = match (caught_up, end) {
            (false, Some(end)) => {
                info!(log_end = end, "assigned before the applier caught up: holding the partitions until it does");
                Some(end)
            }
            (false, None) => {
                // Still safe: the apply rule rejects records that do not
                // continue the watermark, and the trainer then seeks back.
                warn!("assigned without knowing the update log's end");
                None
            }
            (true, _) => None,
        };
        let watermarks = self.progress.applied().watermarks.clone();
        let mut assigned = Vec::new();
        for elem in tpl.elements() {
            let wm = watermarks.get(&elem.partition()).copied();
            assigned.push((elem.topic().to_string(), elem.partition(), wm));
        }
        for (topic, partition, wm) in &assigned {
            let offset = wm.map_or(Offset::Beginning, Offset::Offset);
            tpl.set_partition_offset(topic, *partition, offset)?;
        }
        match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => consumer.incremental_assign(tpl)?,
            _ => consumer.assign(tpl)?,
        }
        info!(partitions = ?assigned.iter().map(|a| (a.1, a.2)).collect::<Vec<_>>(), "assigned at applied watermarks");
        let list = assigned.into_iter().map(|(_, p, wm)| (p, wm.unwrap_or(0))).collect();
        self.events.lock().expect("events lock").push(Rebalanced::Assigned(list, hold));
        Ok(())
    }

    fn revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) -> KafkaResult<()> {
        match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => consumer.incremental_unassign(tpl)?,
            _ => consumer.unassign()?,
        }
        let list = tpl.elements().iter().map(|e| e.partition()).collect();
        self.events.lock().expect("events lock").push(Rebalanced::Revoked(list));
        Ok(())
    }
}

impl ClientContext for TrainerContext {}

impl ConsumerContext for TrainerContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.assign(consumer, tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => self.revoke(consumer, tpl),
            other => {
                error!(error = ?other, "rebalance error; dropping the assignment");
                self.revoke(consumer, tpl)
            }
        };
        if let Err(e) = result {
            error!(error = %e, "rebalance failed");
        }
    }
}

/// Reports gradient records that could not be delivered, so the trainer
/// seeks back rather than waiting for a record that will never land.
pub struct DeliveryContext {
    pub failures: super::outbox::DeliveryFailures,
}

impl ClientContext for DeliveryContext {}

impl ProducerContext for DeliveryContext {
    /// The trainer's sequence number of the record.
    type DeliveryOpaque = Box<u64>;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: Self::DeliveryOpaque) {
        if let Err((e, message)) = result {
            let bytes = rdkafka::message::Message::payload(message).map_or(0, <[u8]>::len);
            let too_large = e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::MessageSizeTooLarge);
            warn!(record = *seq, bytes, error = %e, "gradient record not delivered");
            let mut failures = self.failures.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            failures.push(super::outbox::DeliveryFailure { seq: *seq, too_large });
        }
    }
}

/// Counts the fate of dead letters (events that failed validation).
pub struct DeadLetterContext {
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl ClientContext for DeadLetterContext {}

impl ProducerContext for DeadLetterContext {
    type DeliveryOpaque = Box<(i32, i64)>;

    fn delivery(&self, result: &DeliveryResult<'_>, source: Self::DeliveryOpaque) {
        let outcome = match result {
            Ok(_) => "delivered",
            Err((e, _)) => {
                warn!(partition = source.0, offset = source.1, error = %e, "dead letter not delivered");
                "failed"
            }
        };
        self.metrics.trainer.dead_letters.with_label_values(&[outcome]).inc();
    }
}
