//! `POST /v1/models/{model}/feedback`: the outcomes of logged predictions
//! (docs/design.md section 8b), each `{"id", "label"}`, produced to the
//! labels topic keyed by the id, where the join meets them with the served
//! instance. Same token as `POST /v1/events` (`http.ingest_token`); same
//! answers: 202 once the broker has every label, 503 with the result per
//! label when it did not take some (resend those with an `error`; a label
//! sent twice is dead-lettered by the join as a duplicate, never learned
//! twice).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use rdkafka::producer::FutureProducer;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::admin::check_bearer;
use super::events::{accepted, delivered, EventsAccepted};
use super::{body_bytes, check_model, ApiError, AppState};
use crate::config::Config;
use crate::event::is_label_value;
use crate::serve::feedback::MAX_ID_BYTES;
use crate::update_log::kafka;

/// Produces labels to the labels topic.
pub struct LabelSink {
    producer: FutureProducer,
    topic: String,
    /// `http.ingest_token`, if set.
    token: Option<String>,
}

impl LabelSink {
    pub fn new(connection: &kafka::Connection, config: &Config) -> anyhow::Result<LabelSink> {
        let mut producer = kafka::producer_config(connection, &format!("{}-labels", config.replica_id));
        // The predictions' partitioner (and the Java clients'): a label
        // lands in its prediction's partition, where one joiner holds both.
        producer.set("partitioner", "murmur2_random");
        let token = config.http.ingest_token.expose();
        Ok(LabelSink {
            producer: producer.create()?,
            topic: config.feedback.labels_topic.clone(),
            token: (!token.is_empty()).then(|| token.to_string()),
        })
    }
}

/// The outcomes of predictions, by the ids their answers gave.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FeedbackRequest {
    labels: Vec<Label>,
}

/// One outcome: the prediction's id, and its label as the events' label
/// field holds it (a number; with declared features, a value the label
/// declaration reads, such as `true` or `"click"`).
#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Label {
    id: String,
    #[schema(value_type = Object)]
    label: Value,
}

/// Send the outcomes of logged predictions to be joined and learned.
#[utoipa::path(
    post,
    path = "/v1/models/{model}/feedback",
    tag = "training",
    params(("model" = String, Path, description = "The model name (model.name)", example = "default")),
    request_body = FeedbackRequest,
    security((), ("bearer" = [])),
    responses(
        (status = 202, description = "Every label is on the broker", body = EventsAccepted),
        (status = 400, description = "The body is not a batch of labels", body = super::ErrorBody),
        (status = 401, description = "http.ingest_token is set and the request does not carry it", body = super::ErrorBody),
        (status = 404, description = "Another model, or feedback.enabled is off", body = super::ErrorBody),
        (status = 503, description = "The broker did not take some labels; resend those with an error", body = EventsAccepted),
    )
)]
pub async fn labels(
    State(state): State<AppState>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Some(sink) = state.labels.clone() else {
        return ApiError::NotFound("feedback is off (feedback.enabled = false)".into()).into_response();
    };
    if let Some(token) = &sink.token {
        if let Err(denied) = check_bearer(&headers, token, "ingest") {
            return denied;
        }
    }
    produce(&state, &sink, &model, body).await.unwrap_or_else(IntoResponse::into_response)
}

async fn produce(
    state: &AppState,
    sink: &LabelSink,
    model: &str,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    check_model(state, model)?;
    let body = body_bytes(state, body)?;
    let request: FeedbackRequest =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("invalid request body: {e}")))?;
    let records = checked(request.labels, state.predictor.max_batch)?;
    let results =
        delivered(&sink.producer, &sink.topic, records.iter().map(|(id, label)| (Some(id.as_bytes()), &label[..])))
            .await;
    Ok(accepted(results, &state.metrics.serving.labels_posted, "labels posted to /v1/models/{m}/feedback"))
}

/// Each label checked (an id of 1 to `MAX_ID_BYTES` bytes, a scalar label)
/// and written as the labels topic holds it: `(id, {"id", "label"})`.
fn checked(labels: Vec<Label>, max_batch: usize) -> Result<Vec<(String, Vec<u8>)>, ApiError> {
    if labels.is_empty() || labels.len() > max_batch {
        return Err(ApiError::BadRequest(format!("{} labels; 1 to {max_batch} per request", labels.len())));
    }
    let bad = |i: usize, why: &str| Err(ApiError::BadRequest(format!("labels[{i}]: {why}")));
    let mut records = Vec::with_capacity(labels.len());
    for (i, label) in labels.into_iter().enumerate() {
        if label.id.is_empty() || label.id.len() > MAX_ID_BYTES {
            return bad(i, &format!("the id must be 1 to {MAX_ID_BYTES} bytes"));
        }
        if !is_label_value(&label.label) {
            return bad(i, "the label must be a number, a boolean or a string");
        }
        let payload = serde_json::to_vec(&label).expect("a label serializes");
        records.push((label.id, payload));
    }
    Ok(records)
}
