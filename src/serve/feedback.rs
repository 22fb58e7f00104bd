//! Feature logging at predict time (docs/design.md section 8b): each served
//! instance, as it was served (its record, the prediction, `model_version`,
//! the time), written to the predictions topic keyed by its id, for the
//! join with the outcome that comes later. A prediction never waits on the
//! broker: the producer's queue is bounded (`feedback.max_unsent`), and an
//! instance that finds it full is counted as unlogged, never a failed
//! prediction. Owns its producer and the ids it makes; knows no protocol.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::IntCounter;
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
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
    /// `predictions_logged_total{result="failed"}`.
    failed: IntCounter,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            tracing::warn!(error = %e, "a served prediction was not logged");
            self.failed.inc();
        }
    }
}

/// The producer of the predictions topic.
pub struct PredictionLog {
    producer: ThreadedProducer<Deliveries>,
    topic: String,
    /// Ids made here: `{replica}-{start, ms}-{n}`, unique across restarts.
    prefix: String,
    made: AtomicU64,
    /// `predictions_logged_total` by result, looked up once.
    queued: IntCounter,
    unlogged: IntCounter,
}

impl PredictionLog {
    pub fn new(config: &Config, metrics: &Metrics) -> anyhow::Result<PredictionLog> {
        let connection = kafka::Connection::of(&config.kafka)?;
        let mut producer = kafka::producer_config(&connection, &format!("{}-predictions", config.replica_id));
        producer
            .set("queue.buffering.max.messages", config.feedback.max_unsent.to_string())
            // Served instances are many and small, and nothing waits for
            // them: large batches, compressed, cost the broker and this
            // replica the fewest requests.
            .set("linger.ms", "50")
            .set("compression.type", "lz4")
            // Only failures are reported back (and counted): a report per
            // logged instance woke the producer's thread for nothing.
            .set("delivery.report.only.error", "true")
            // The Java clients' partitioner: a team's labels keyed by the
            // same id, written from the JVM, land in the same partition.
            .set("partitioner", "murmur2_random");
        let started = crate::telemetry::unix_ms();
        let logged = &metrics.serving.predictions_logged;
        Ok(PredictionLog {
            producer: producer.create_with_context(Deliveries { failed: logged.with_label_values(&["failed"]) })?,
            topic: config.feedback.predictions_topic.clone(),
            prefix: format!("{}-{started}", config.replica_id),
            made: AtomicU64::new(0),
            queued: logged.with_label_values(&["queued"]),
            unlogged: logged.with_label_values(&["unlogged"]),
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

    /// Waits up to `limit` for the logged instances still queued to reach
    /// the broker (a graceful stop).
    pub fn flush(&self, limit: std::time::Duration) {
        use rdkafka::producer::Producer;
        if let Err(e) = self.producer.flush(limit) {
            tracing::warn!(error = %e, "served predictions not all logged before the stop");
        }
    }

    /// Hands each served instance (`instances`: each as JSON text, written
    /// before it was served) to the producer, without waiting: one that
    /// finds the queue full is counted as unlogged.
    pub fn log(&self, ids: &[String], instances: &[String], served: &Predicted) {
        let ts = crate::telemetry::unix_ms();
        for ((id, instance), &prediction) in ids.iter().zip(instances).zip(&served.predictions) {
            let value = logged(id, instance, prediction, served.model_version, ts);
            match self.producer.send(BaseRecord::to(&self.topic).key(id).payload(&value)) {
                Ok(()) => self.queued.inc(),
                Err(_) => self.unlogged.inc(),
            }
        }
    }
}

/// A served instance as the predictions topic holds it: `{"id",
/// "instance", "prediction", "model_version", "ts"}`, the instance as it
/// was written before it was served, the prediction as the answer wrote it
/// (the same f32; `null` if not finite, as serde writes it), `ts` in ms.
/// Written by hand: serializing it through a `Value` cost a copy of each
/// instance per prediction.
fn logged(id: &str, instance: &str, prediction: f32, model_version: i64, ts: i64) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(instance.len() + id.len() + 96);
    out.push_str("{\"id\":");
    out.push_str(&Value::from(id).to_string());
    out.push_str(",\"instance\":");
    out.push_str(instance);
    match prediction.is_finite() {
        true => write!(out, ",\"prediction\":{prediction:?}"),
        false => write!(out, ",\"prediction\":null"),
    }
    .expect("writing to a String");
    write!(out, ",\"model_version\":{model_version},\"ts\":{ts}}}").expect("writing to a String");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_logged_instance_is_json_with_the_prediction_as_served() {
        let instance = serde_json::json!({"dense": [0.5], "sparse": {"f0": "a \"quoted\" value"}});
        for prediction in [0.5009752f32, 1e-8, 0.1, 1.0] {
            let text = logged("id \"1\"", &instance.to_string(), prediction, 7, 42);
            let value: Value = serde_json::from_str(&text).unwrap();
            assert_eq!((&value["id"], &value["instance"]), (&Value::from("id \"1\""), &instance));
            assert_eq!(value["prediction"].as_f64().unwrap() as f32, prediction, "{text}");
            // As the answer writes the same f32.
            let answered = serde_json::to_string(&prediction).unwrap();
            assert!(text.contains(&format!(":{answered},")), "{text} vs {answered}");
            assert_eq!((value["model_version"].as_i64(), value["ts"].as_i64()), (Some(7), Some(42)));
        }
        let nan: Value = serde_json::from_str(&logged("i", "{}", f32::NAN, 0, 0)).unwrap();
        assert!(nan["prediction"].is_null());
    }
}
