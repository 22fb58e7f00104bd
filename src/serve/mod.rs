//! The HTTP API. Reads only the serving snapshot, never training state:
//! a request never waits for training.
//!
//! - `POST /v1/models/{name}:predict` (KServe V1)
//! - `GET /v1/models/{name}`
//! - `GET /v1/models/{name}/snapshots`
//! - `POST /v1/models/{name}/rollback` (admin, bearer token: [`admin`])
//! - `GET /healthz`, `GET /readyz`, `GET /metrics`

pub mod admin;
mod error;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

pub use error::ApiError;

use crate::checkpoint::{CheckpointInfo, SharedStore};
use crate::metrics::Metrics;
use crate::serving::Serving;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub serving: Serving,
    pub metrics: Arc<Metrics>,
    /// Caught up with the update log as of start-up.
    pub ready: Arc<AtomicBool>,
    pub model_name: Arc<str>,
    pub max_batch: usize,
    pub max_body_bytes: usize,
    /// The checkpoint store, for listing snapshots (`None`: nothing to list).
    pub checkpoints: Option<SharedStore>,
    /// The admin endpoints; `None`: off.
    pub admin: Option<Arc<admin::Admin>>,
}

pub fn router(state: AppState) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/models/{model}", get(model_info).post(model_verb))
        .route("/v1/models/{model}/snapshots", get(snapshots))
        .route("/v1/models/{model}/rollback", axum::routing::post(admin::rollback))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), record_request))
        .with_state(state)
}

/// Counts and times every request by matched route and status.
async fn record_request(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_string();
    let start = Instant::now();
    let response = next.run(req).await;
    let m = &state.metrics;
    m.http_duration.with_label_values(&[&route]).observe(start.elapsed().as_secs_f64());
    m.http_requests.with_label_values(&[&route, response.status().as_str()]).inc();
    response
}

async fn readyz(State(state): State<AppState>) -> Response {
    let snap = state.serving.load();
    let ready = state.ready.load(Ordering::Acquire);
    let body = Json(json!({"ready": ready, "model_version": snap.position}));
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, body).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    let snap = state.serving.load();
    state.metrics.model_version.set(snap.position);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

fn check_model(state: &AppState, name: &str) -> Result<(), ApiError> {
    if name == &*state.model_name {
        Ok(())
    } else {
        Err(ApiError::NotFound(format!("model {name:?} not found; this replica serves {:?}", &*state.model_name)))
    }
}

async fn model_info(State(state): State<AppState>, Path(model): Path<String>) -> Result<Json<Value>, ApiError> {
    check_model(&state, &model)?;
    let snap = state.serving.load_full();
    // Hashing the weights takes milliseconds on a big model: off the async workers.
    let digest = tokio::task::spawn_blocking({
        let snap = snap.clone();
        move || snap.weights_digest().to_string()
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    let c = snap.model.config();
    Ok(Json(json!({
        "name": model,
        "kind": c.kind,
        "model_version": snap.position,
        "ready": state.ready.load(Ordering::Acquire),
        "examples_learned": snap.examples_learned,
        "progressive_logloss": snap.progressive_loss,
        "watermarks": snap.watermarks,
        "weights_digest": digest,
        "fingerprint": format!("{:016x}", snap.model.fingerprint()),
        "dense_dim": c.dense_dim,
        "sparse_fields": c.sparse_fields,
    })))
}

/// `GET /v1/models/{name}/snapshots`: this replica's checkpoints, newest first.
async fn snapshots(State(state): State<AppState>, Path(model): Path<String>) -> Result<Json<Value>, ApiError> {
    check_model(&state, &model)?;
    let Some(store) = state.checkpoints.clone() else {
        return Ok(Json(json!({ "snapshots": [] })));
    };
    let listed = tokio::task::spawn_blocking(move || store.list())
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    Ok(Json(json!({ "snapshots": listed.iter().map(snapshot_json).collect::<Vec<_>>() })))
}

pub fn snapshot_json(c: &CheckpointInfo) -> Value {
    let written_ms = c.written.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    json!({
        "position": c.position,
        "written_unix_ms": written_ms,
        "bytes": c.bytes,
        "examples_learned": c.examples_learned,
        "progressive_logloss": c.progressive_loss,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PredictRequest {
    instances: Vec<Value>,
}

/// `POST /v1/models/{name}:{verb}`; the only verb is `predict`.
async fn model_verb(
    State(state): State<AppState>,
    Path(model): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let Some((name, verb)) = model.split_once(':') else {
        return Err(ApiError::MethodNotAllowed);
    };
    check_model(&state, name)?;
    if verb != "predict" {
        return Err(ApiError::NotFound(format!("unknown verb {verb:?}; use :predict")));
    }
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge(state.max_body_bytes),
        _ => ApiError::BadRequest(e.body_text()),
    })?;
    let request: PredictRequest =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("invalid request body: {e}")))?;
    let n = request.instances.len();
    if n == 0 {
        return Err(ApiError::BadRequest("instances is empty".into()));
    }
    if n > state.max_batch {
        return Err(ApiError::BadRequest(format!("{n} instances; at most {} per request", state.max_batch)));
    }
    let snap = state.serving.load();
    let featurizer = snap.model.featurizer();
    let mut predictions = Vec::with_capacity(n);
    for (i, instance) in request.instances.into_iter().enumerate() {
        let features = featurizer.instance(instance).map_err(|e| ApiError::BadRequest(format!("instances[{i}]: {e}")))?;
        predictions.push(snap.model.predict(&snap.weights, &features));
    }
    Ok(Json(json!({ "predictions": predictions, "model_version": snap.position })))
}
