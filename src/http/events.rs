//! `POST /v1/events`: training events over HTTP, for clients without a Kafka
//! library. The events go to the same topic, in the same form (JSON, or Avro
//! in the Confluent wire format when `kafka.event_format = "avro"`), as any
//! producer's; the trainers cannot tell them apart.
//!
//! A batch is all or nothing at validation: every event is checked with the
//! trainer's own parser, and if any is invalid none is produced (422, with
//! the reason per bad event), so a client fixes the batch and sends it again
//! without duplicating the good ones. Valid batches are produced with
//! `acks=all` and answered once the broker has them (202, partition and
//! offset per event). If the broker fails some, the answer is 503 with the
//! result per event: resend only those with an `error`. With
//! `http.ingest_token` set, requests must carry it as a bearer token.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use prometheus::IntCounterVec;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::admin::check_bearer;
use super::{body_bytes, ApiError, AppState};
use crate::event::EventCodec;
use crate::update_log::kafka;

/// Produces events to the events topic.
pub struct EventSink {
    producer: FutureProducer,
    topic: String,
    /// The topic's encoding (`kafka.event_format`).
    codec: EventCodec,
    /// The bearer token a request must carry (`http.ingest_token`), if any.
    token: Option<String>,
}

impl EventSink {
    pub fn new(
        connection: &kafka::Connection,
        topic: &str,
        codec: EventCodec,
        replica_id: &str,
        token: &str,
    ) -> anyhow::Result<EventSink> {
        let mut config = kafka::producer_config(connection, &format!("{replica_id}-ingest"));
        // Events, unlike gradient records, may share a batch: the trainer
        // probes back when a fetch starts past its offset (`train::Resume`).
        config.set("linger.ms", "2").set("batch.num.messages", "1000");
        let token = (!token.is_empty()).then(|| token.to_string());
        Ok(EventSink { producer: config.create()?, topic: topic.to_string(), codec, token })
    }
}

/// A batch of training events (the event schema of docs/api.md).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventsRequest {
    /// Each: `{"dense": [...], "sparse": {...}, "label": 1, "ts": 1764000000000}`.
    #[schema(value_type = Vec<Object>)]
    events: Vec<Value>,
}

/// Where one event landed, or why it did not.
#[derive(Serialize, ToSchema)]
pub struct EventResult {
    #[serde(skip_serializing_if = "Option::is_none")]
    partition: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) error: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct EventsAccepted {
    /// One per event, in request order.
    pub(super) results: Vec<EventResult>,
}

#[derive(Serialize, ToSchema)]
pub struct InvalidEvent {
    /// Position in `events`.
    index: usize,
    /// A stable name of the reason, as in the dead-letter header.
    reason: &'static str,
    error: String,
}

#[derive(Serialize, ToSchema)]
pub struct EventsRejected {
    error: String,
    invalid: Vec<InvalidEvent>,
}

/// Produce a batch of training events to the events topic.
#[utoipa::path(
    post,
    path = "/v1/events",
    tag = "training",
    request_body = EventsRequest,
    security((), ("bearer" = [])),
    responses(
        (status = 202, description = "Every event is on the broker", body = EventsAccepted),
        (status = 400, description = "The body is not a batch of events", body = super::ErrorBody),
        (status = 401, description = "http.ingest_token is set and the request does not carry it", body = super::ErrorBody),
        (status = 404, description = "Ingestion is off (http.ingest = false)", body = super::ErrorBody),
        (status = 422, description = "Some events are invalid; none was produced", body = EventsRejected),
        (status = 503, description = "The broker did not take some events; resend those with an error", body = EventsAccepted),
    )
)]
pub async fn ingest(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Some(sink) = state.events.clone() else {
        return ApiError::NotFound("event ingestion is off (http.ingest = false)".into()).into_response();
    };
    if let Some(token) = &sink.token {
        if let Err(denied) = check_bearer(&headers, token, "ingest") {
            return denied;
        }
    }
    produce(&state, &sink, body).await.unwrap_or_else(IntoResponse::into_response)
}

async fn produce(
    state: &AppState,
    sink: &EventSink,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(state, body)?;
    let request: EventsRequest =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("invalid request body: {e}")))?;
    let n = request.events.len();
    if n == 0 {
        return Err(ApiError::BadRequest("events is empty".into()));
    }
    if n > state.predictor.max_batch {
        return Err(ApiError::BadRequest(format!("{n} events; at most {} per request", state.predictor.max_batch)));
    }
    let ingested = &state.metrics.serving.events_ingested;
    let payloads = match encoded(state, sink, request.events) {
        Ok(payloads) => payloads,
        Err(invalid) => {
            ingested.with_label_values(&["invalid"]).inc_by(invalid.len() as u64);
            let error = format!("{} of {n} events are invalid; none was produced", invalid.len());
            return Ok((StatusCode::UNPROCESSABLE_ENTITY, Json(EventsRejected { error, invalid })).into_response());
        }
    };
    let results = delivered(&sink.producer, &sink.topic, payloads.iter().map(|p| (None, p.as_slice()))).await;
    Ok(accepted(results, ingested, "events posted to /v1/events"))
}

/// The answer to a batch produced: 202 when the broker took every record,
/// else 503 with the result per record; each counted in `counted` as
/// `produced` or `failed`.
pub(super) fn accepted(results: Vec<EventResult>, counted: &IntCounterVec, what: &str) -> Response {
    let failed = results.iter().filter(|r| r.error.is_some()).count();
    counted.with_label_values(&["produced"]).inc_by((results.len() - failed) as u64);
    counted.with_label_values(&["failed"]).inc_by(failed as u64);
    let status = if failed == 0 {
        StatusCode::ACCEPTED
    } else {
        tracing::warn!(failed, of = results.len(), "the broker did not take some {what}");
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(EventsAccepted { results })).into_response()
}

/// Each event checked against the served model and encoded in the topic's
/// format; or every invalid one, by index, with why.
fn encoded(state: &AppState, sink: &EventSink, events: Vec<Value>) -> Result<Vec<Vec<u8>>, Vec<InvalidEvent>> {
    let snap = state.predictor.serving.load();
    let featurizer = snap.model.featurizer();
    let mut payloads = Vec::with_capacity(events.len());
    let mut invalid = Vec::new();
    for (index, event) in events.into_iter().enumerate() {
        let bytes = serde_json::to_vec(&event).expect("a JSON value serializes");
        let encoded = match featurizer.event(&bytes) {
            Ok(_) => sink.codec.encode_parsed(bytes, event).map_err(|e| ("avro", e)),
            Err(e) => Err((e.kind(), e.to_string())),
        };
        match encoded {
            Ok(payload) => payloads.push(payload),
            Err((reason, error)) => invalid.push(InvalidEvent { index, reason, error }),
        }
    }
    if invalid.is_empty() {
        Ok(payloads)
    } else {
        Err(invalid)
    }
}

/// Produces every `(key, payload)` to `topic`, all at once, and says where
/// each landed or why not.
pub(super) async fn delivered(
    producer: &FutureProducer,
    topic: &str,
    records: impl Iterator<Item = (Option<&[u8]>, &[u8])>,
) -> Vec<EventResult> {
    let deliveries = records.map(|(key, payload)| {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).payload(payload);
        record.key = key;
        // Waits for queue space rather than failing under a burst; the
        // producer's message.timeout.ms bounds the whole delivery.
        producer.send(record, Duration::from_secs(5))
    });
    (futures::future::join_all(deliveries).await.into_iter())
        .map(|r| match r {
            Ok(d) => EventResult { partition: Some(d.partition), offset: Some(d.offset), error: None },
            Err((e, _)) => EventResult { partition: None, offset: None, error: Some(e.to_string()) },
        })
        .collect()
}
