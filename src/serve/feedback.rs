//! Feature logging at predict time (docs/design.md section 8b): each served
//! instance, as it was served (its record, the prediction, `model_version`,
//! the time), written to the predictions topic keyed by its id, for the
//! join with the outcome that comes later. A prediction never waits on the
//! broker: the producer's queue is bounded (`feedback.max_unsent`), and an
//! instance that finds it full is counted as unlogged, never a failed
//! prediction. Owns its producer and the ids it makes; knows no protocol.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use serde::Serialize;
use serde_json::Value;

use super::tensor::{Elements, Tensor};
use super::{Predicted, ServeError};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::update_log::kafka;

/// The longest id a request may give an instance.
pub const MAX_ID_BYTES: usize = 256;
/// The input (BYTES `[N]`, one UTF-8 id per row) through which a V2 request,
/// REST or gRPC, names its instances, and the output it gets them back in.
pub const ID_TENSOR: &str = "id";

/// Takes the ids input out of `inputs`, when there is one.
pub fn take_ids(inputs: &mut Vec<Tensor>) -> Result<Option<Vec<String>>, ServeError> {
    let Some(at) = inputs.iter().position(|t| t.name == ID_TENSOR) else { return Ok(None) };
    let input = inputs.remove(at);
    let bad = |why: &str| ServeError::BadRequest(format!("input {ID_TENSOR:?}: {why}; use BYTES [N], an id per row"));
    if input.datatype != "BYTES" || input.shape.len() != 1 {
        return Err(bad(&format!("{} {:?}", input.datatype, input.shape)));
    }
    let ids: Vec<String> = match input.elements {
        Elements::Bytes(ids) => {
            ids.into_iter().map(String::from_utf8).collect::<Result<_, _>>().map_err(|_| bad("not UTF-8"))?
        }
        Elements::Json(ids) => ids
            .into_iter()
            .map(|id| id.as_str().map(String::from))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("not strings"))?,
        _ => return Err(bad("not BYTES")),
    };
    match ids.len() as i64 == input.shape[0] {
        true => Ok(Some(ids)),
        false => Err(bad(&format!("{} ids for the shape {:?}", ids.len(), input.shape))),
    }
}

/// Counts what the broker did not take.
struct Deliveries {
    metrics: Arc<Metrics>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            tracing::warn!(error = %e, "a served prediction was not logged");
            self.metrics.serving.predictions_logged.with_label_values(&["failed"]).inc();
        }
    }
}

/// A served instance as the predictions topic holds it (the prediction as
/// the answer wrote it: the same f32).
#[derive(Serialize)]
struct Logged<'a> {
    id: &'a str,
    instance: &'a Value,
    prediction: f32,
    model_version: i64,
    /// When it was served, ms since the epoch.
    ts: i64,
}

/// The producer of the predictions topic.
pub struct PredictionLog {
    producer: ThreadedProducer<Deliveries>,
    topic: String,
    /// Ids made here: `{replica}-{start, ms}-{n}`, unique across restarts.
    prefix: String,
    made: AtomicU64,
    metrics: Arc<Metrics>,
}

impl PredictionLog {
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> anyhow::Result<PredictionLog> {
        let connection = kafka::Connection::of(&config.kafka)?;
        let mut producer = kafka::producer_config(&connection, &format!("{}-predictions", config.replica_id));
        producer
            .set("queue.buffering.max.messages", config.feedback.max_unsent.to_string())
            .set("linger.ms", "5")
            // The Java clients' partitioner: a team's labels keyed by the
            // same id, written from the JVM, land in the same partition.
            .set("partitioner", "murmur2_random");
        let started = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
        Ok(PredictionLog {
            producer: producer.create_with_context(Deliveries { metrics: metrics.clone() })?,
            topic: config.feedback.predictions_topic.clone(),
            prefix: format!("{}-{started}", config.replica_id),
            made: AtomicU64::new(0),
            metrics,
        })
    }

    /// The ids of `n` instances: those the request gave (one per instance,
    /// each 1 to `MAX_ID_BYTES` bytes), or new ones.
    pub fn ids(&self, given: Option<Vec<String>>, n: usize) -> Result<Vec<String>, ServeError> {
        let Some(ids) = given else {
            let first = self.made.fetch_add(n as u64, Ordering::Relaxed);
            return Ok((first..first + n as u64).map(|i| format!("{}-{i}", self.prefix)).collect());
        };
        if ids.len() != n {
            return Err(ServeError::BadRequest(format!("{} ids for {n} instances; one per instance", ids.len())));
        }
        if let Some(i) = ids.iter().position(|id| id.is_empty() || id.len() > MAX_ID_BYTES) {
            return Err(ServeError::BadRequest(format!("ids[{i}] must be 1 to {MAX_ID_BYTES} bytes")));
        }
        Ok(ids)
    }

    /// Hands each served instance to the producer, without waiting: one
    /// that finds the queue full is counted as unlogged.
    pub fn log(&self, ids: &[String], instances: &[Value], served: &Predicted) {
        let ts = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        for ((id, instance), &prediction) in ids.iter().zip(instances).zip(&served.predictions) {
            let logged = Logged { id, instance, prediction, model_version: served.model_version, ts };
            let value = serde_json::to_string(&logged).expect("a served instance serializes");
            let result = match self.producer.send(BaseRecord::to(&self.topic).key(id).payload(&value)) {
                Ok(()) => "queued",
                Err(_) => "unlogged",
            };
            self.metrics.serving.predictions_logged.with_label_values(&[result]).inc();
        }
    }
}
