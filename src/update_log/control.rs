//! Appending control records to the update log: rollbacks (from the admin
//! API and the divergence guard), a replica's settings when it starts, and
//! its weights digests (attestations). Same producer settings as gradient
//! records: acknowledged by all in-sync replicas, one record per batch.

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};

use super::kafka;
use super::record::{AttestationRecord, Record, RollbackRecord, SettingsRecord};

#[derive(Clone)]
pub struct ControlLog {
    producer: FutureProducer,
    topic: String,
}

impl ControlLog {
    pub fn new(connection: &kafka::Connection, topic: &str, replica_id: &str) -> anyhow::Result<ControlLog> {
        let producer = kafka::producer_config(connection, &format!("{replica_id}-control")).create()?;
        Ok(ControlLog { producer, topic: topic.to_string() })
    }

    /// Appends `r`; the offset it landed at. Any executor can drive this.
    pub async fn append(&self, r: RollbackRecord) -> anyhow::Result<i64> {
        self.append_record(Record::Rollback(r)).await
    }

    /// Appends a replica's settings; the offset they landed at.
    pub async fn announce(&self, r: SettingsRecord) -> anyhow::Result<i64> {
        self.append_record(Record::Settings(r)).await
    }

    /// Appends a replica's weights digest at a position; the offset it landed at.
    pub async fn attest(&self, r: AttestationRecord) -> anyhow::Result<i64> {
        self.append_record(Record::Attestation(r)).await
    }

    async fn append_record(&self, r: Record) -> anyhow::Result<i64> {
        let bytes = r.encode();
        let record: FutureRecord<'_, (), [u8]> = FutureRecord::to(&self.topic).payload(&bytes);
        let delivery =
            self.producer.send_result(record).map_err(|(e, _)| anyhow::anyhow!("cannot queue the record: {e}"))?;
        match tokio::time::timeout(Duration::from_secs(35), delivery).await {
            Ok(Ok(Ok(delivered))) => Ok(delivered.offset),
            Ok(Ok(Err((e, _)))) => Err(anyhow::anyhow!("the broker did not take the record: {e}")),
            Ok(Err(_)) => Err(anyhow::anyhow!("the producer went away")),
            Err(_) => Err(anyhow::anyhow!("no acknowledgement in 35 s")),
        }
    }
}
