//! The HTTP API. Predictions read only the serving snapshot, never training
//! state, so a request never waits for training; the admin endpoints act
//! through the applier's narrow handle ([`crate::apply::handle`]), and the
//! snapshot list reads the checkpoint store.
//!
//! Every route is a handler with a `#[utoipa::path]` annotation, listed
//! once in `endpoints`: the router and the OpenAPI document
//! (`GET /openapi.json`) are both built from that list, so they cannot
//! disagree. Groups: KServe V1 (`/v1/models/...`), the Open Inference
//! Protocol (KServe V2, [`v2`]), training events over HTTP ([`events`]),
//! the outcomes of logged predictions ([`feedback`]),
//! the admin endpoints ([`admin`]), the status page ([`status`]), and
//! health and metrics.

pub mod admin;
mod checkpoints;
mod error;
pub mod events;
pub mod feedback;
pub mod peer;
pub mod status;
pub mod v2;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tower_http::compression::predicate::{DefaultPredicate, NotForContentType, Predicate};
use tower_http::compression::CompressionLayer;
use tower_http::decompression::RequestDecompressionLayer;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::OpenApi as OpenApiDoc;
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::UtoipaMethodRouter;
use utoipa_axum::routes;

pub use checkpoints::CheckpointEntry;
pub use error::ApiError;

use crate::checkpoint::SharedStore;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::serve::Predictor;
use crate::snapshot::Serving;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The served model, as every protocol serves it.
    pub predictor: Predictor,
    pub metrics: Arc<Metrics>,
    pub replica_id: Arc<str>,
    pub max_body_bytes: usize,
    /// The checkpoint store, for listing its checkpoints (`None`: nothing to list).
    pub checkpoints: Option<SharedStore>,
    /// The admin endpoints; `None`: off.
    pub admin: Option<Arc<admin::Admin>>,
    /// `GET /v1/models/{name}/checkpoint` for peers; `None`: off.
    pub peer_checkpoints: Option<Arc<peer::PeerCheckpoints>>,
    /// `POST /v1/events`; `None`: off.
    pub events: Option<Arc<events::EventSink>>,
    /// `POST /v1/models/{model}/feedback`; `None`: off.
    pub labels: Option<Arc<feedback::LabelSink>>,
    /// The last minutes of the status page's series.
    pub history: Arc<status::History>,
}

impl AppState {
    /// What every handler needs, from the replica's configuration; the
    /// optional parts (snapshot list, admin, events) off until set.
    pub fn new(serving: Serving, metrics: Arc<Metrics>, config: &Config, ready: Arc<AtomicBool>) -> AppState {
        AppState {
            predictor: Predictor::new(serving, ready, config, &metrics.shards),
            metrics,
            replica_id: config.replica_id.as_str().into(),
            max_body_bytes: config.http.max_body_bytes,
            checkpoints: None,
            admin: None,
            peer_checkpoints: None,
            events: None,
            labels: None,
            history: Arc::default(),
        }
    }
}

/// Every endpoint, once: the router and the OpenAPI document come from here.
/// (Deprecated paths are served and documented as such.)
#[allow(deprecated)]
fn endpoints() -> Vec<UtoipaMethodRouter<AppState>> {
    vec![
        routes!(status::page),
        routes!(status::status),
        routes!(healthz),
        routes!(readyz),
        routes!(metrics),
        routes!(openapi_json),
        routes!(model_info),
        routes!(predict),
        routes!(checkpoints::list),
        routes!(checkpoints::list_as_snapshots),
        routes!(peer::newest_checkpoint),
        routes!(peer::rows),
        routes!(admin::rollback),
        routes!(events::ingest),
        routes!(feedback::labels),
        routes!(v2::server_metadata),
        routes!(v2::live),
        routes!(v2::ready),
        routes!(v2::model_metadata),
        routes!(v2::model_ready),
        routes!(v2::infer),
    ]
}

/// The axum route of a documented path: a custom verb after the last
/// parameter (`/v1/models/{model}:predict`, Google's API style, which
/// KServe V1 uses) is part of that parameter for the router, which parses
/// it in the handler.
fn route_of(path: &str) -> &str {
    match path.rfind("}:") {
        Some(i) => &path[..=i],
        None => path,
    }
}

pub fn router(state: AppState) -> Router {
    let limit = state.max_body_bytes;
    let mut router = Router::new();
    for (_, paths, method_router) in endpoints() {
        for path in paths.paths.keys() {
            router = router.route(route_of(path), method_router.clone());
        }
    }
    router
        .fallback(|| async { ApiError::NotFound("no such route; GET /openapi.json lists them".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        // The limit holds for the body as decompressed (a gzip bomb is a 413).
        .layer(DefaultBodyLimit::max(limit))
        .layer(RequestDecompressionLayer::new())
        // Not a checkpoint: float weights barely shrink, and gzip on the
        // async workers would take them from predictions.
        .layer(
            CompressionLayer::new().compress_when(
                DefaultPredicate::new().and(NotForContentType::const_new(peer::CHECKPOINT_CONTENT_TYPE)),
            ),
        )
        .layer(middleware::from_fn_with_state(state.clone(), record_request))
        .with_state(state)
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tributary",
        description = "A replica of a fleet that learns online from Kafka and serves the newest weights. \
            Every replica serves the same API; equal model_version means bit-identical weights.",
        license(name = "Apache-2.0")
    ),
    tags(
        (name = "kserve-v1", description = "KServe V1 prediction protocol"),
        (name = "kserve-v2", description = "Open Inference Protocol (KServe V2), REST"),
        (name = "training", description = "Training events and model state"),
        (name = "admin", description = "Behind Authorization: Bearer <http.admin_token>"),
        (name = "peers", description = "For the fleet's replicas, behind Authorization: Bearer <checkpoint.peer_token>"),
        (name = "operations", description = "Health, metrics, status page, this document"),
    ),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, doc: &mut OpenApiDoc) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI 3 document of [`router`].
pub fn openapi() -> OpenApiDoc {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    for (schemas, paths, _) in endpoints() {
        doc.paths.merge(paths);
        doc.components.get_or_insert_with(Default::default).schemas.extend(schemas);
    }
    doc
}

/// `{"error": "..."}`: every error answer.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    error: String,
}

/// The body, or the error that reading it gave (413 past `http.max_body_bytes`).
fn body_bytes(state: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge(state.max_body_bytes),
        _ => ApiError::BadRequest(e.body_text()),
    })
}

/// Counts and times every request by method, matched route and status.
async fn record_request(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_string();
    let method = req.method().clone();
    let start = Instant::now();
    let response = next.run(req).await;
    let seconds = start.elapsed().as_secs_f64();
    state.metrics.serving.count_request("http", method.as_str(), &route, response.status().as_str(), seconds);
    response
}

/// Alive: the HTTP server answers. Says nothing of the model.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, body = Object, example = json!({"status": "ok"}))))]
async fn healthz() -> Json<Value> {
    Json(serde_json::json!({"status": "ok"}))
}

#[derive(Serialize, ToSchema)]
pub struct Readiness {
    /// Caught up with the update log as of start-up, and serving.
    ready: bool,
    model_version: i64,
}

/// Ready: caught up with the update log as of start-up.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses(
    (status = 200, description = "Ready", body = Readiness),
    (status = 503, description = "Still catching up", body = Readiness),
))]
async fn readyz(State(state): State<AppState>) -> Response {
    let snap = state.predictor.serving.load();
    let ready = state.predictor.ready.load(Ordering::Acquire);
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(Readiness { ready, model_version: snap.position })).into_response()
}

/// Prometheus metrics, text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, content_type = "text/plain", body = String)))]
async fn metrics(State(state): State<AppState>) -> Response {
    let snap = state.predictor.serving.load();
    state.metrics.applier.model_version.set(snap.position);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", responses((status = 200, description = "OpenAPI 3", body = Object)))]
async fn openapi_json() -> Response {
    static DOC: OnceLock<String> = OnceLock::new();
    let doc = DOC.get_or_init(|| openapi().to_pretty_json().expect("the document serializes"));
    ([(header::CONTENT_TYPE, "application/json")], doc.as_str()).into_response()
}

/// Whether `name` is the model this replica serves.
pub fn check_model(state: &AppState, name: &str) -> Result<(), ApiError> {
    Ok(state.predictor.check_model(name)?)
}

#[derive(Serialize, ToSchema)]
pub struct ModelInfo {
    name: String,
    /// logistic | mlp | wide_deep
    #[schema(value_type = String)]
    kind: crate::config::ModelKind,
    /// The update-log position of the served weights.
    model_version: i64,
    ready: bool,
    examples_learned: u64,
    /// Events the log's records took but no one learned: invalid ones, and
    /// those of batches whose gradient could not be computed.
    examples_skipped: u64,
    /// Mean loss of every learned example, taken before it was learned.
    progressive_logloss: Option<f64>,
    /// Per events partition: the next offset to learn.
    #[schema(value_type = Object)]
    watermarks: std::collections::BTreeMap<i32, i64>,
    /// BLAKE3 of the weights this replica holds (a shard's: its rows):
    /// equal digests, equal weights.
    weights_digest: String,
    /// The shard of the sparse tables this replica holds (`shard.index`
    /// of `shard.count`); absent when it holds the whole model.
    #[serde(skip_serializing_if = "Option::is_none")]
    shard: Option<ShardInfo>,
    /// The model structure's fingerprint (hex).
    fingerprint: String,
    dense_dim: usize,
    sparse_fields: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ShardInfo {
    index: u32,
    count: u32,
}

/// The served model: version, progress, weights digest.
#[utoipa::path(get, path = "/v1/models/{model}", tag = "kserve-v1",
    params(("model" = String, Path, description = "The model name (model.name)", example = "default")),
    responses((status = 200, body = ModelInfo), (status = 404, body = ErrorBody)))]
async fn model_info(State(state): State<AppState>, Path(model): Path<String>) -> Result<Json<ModelInfo>, ApiError> {
    check_model(&state, &model)?;
    let snap = state.predictor.serving.load_full();
    // Hashing the weights takes milliseconds on a big model: off the async workers.
    let digest = tokio::task::spawn_blocking({
        let snap = snap.clone();
        move || snap.weights_digest().to_string()
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    let c = snap.model.config();
    Ok(Json(ModelInfo {
        name: model,
        kind: c.kind,
        model_version: snap.position,
        ready: state.predictor.ready.load(Ordering::Acquire),
        examples_learned: snap.examples_learned,
        examples_skipped: snap.examples_skipped,
        progressive_logloss: snap.progressive_loss,
        watermarks: snap.watermarks.clone(),
        weights_digest: digest,
        shard: Some(snap.model.layout()).filter(|l| l.count > 1).map(|l| ShardInfo { index: l.index, count: l.count }),
        fingerprint: format!("{:016x}", snap.model.fingerprint()),
        dense_dim: c.dense_dim,
        sparse_fields: c.sparse_fields.clone(),
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PredictRequest {
    /// Each: `{"dense": [...], "sparse": {"field": "value" or ["v1", "v2"]}}`.
    #[schema(value_type = Vec<Object>)]
    instances: Vec<Value>,
    /// With `feedback.enabled`: an id per instance, under which it is
    /// logged to the predictions topic (absent: the replica makes them).
    #[serde(default)]
    ids: Option<Vec<String>>,
}

#[derive(Serialize, ToSchema)]
pub struct PredictResponse {
    /// One per instance: a probability under log-loss, else the raw output.
    predictions: Vec<f32>,
    /// The update-log position of the weights that answered (of a
    /// sharded fleet: the lowest among the shards read).
    model_version: i64,
    /// Of a sharded fleet: the position each shard's rows were read at,
    /// by shard index.
    #[serde(skip_serializing_if = "Option::is_none")]
    shard_versions: Option<std::collections::BTreeMap<u32, i64>>,
    /// With `feedback.enabled`: each instance's id in the predictions topic
    /// (the request's, or made by the replica).
    #[serde(skip_serializing_if = "Option::is_none")]
    ids: Option<Vec<String>>,
}

impl PredictResponse {
    fn of(p: crate::serve::Predicted, ids: Option<Vec<String>>) -> PredictResponse {
        let (predictions, model_version, shard_versions) = (p.predictions, p.model_version, p.shard_versions);
        PredictResponse { predictions, model_version, shard_versions, ids }
    }
}

/// Predictions for a batch of instances (KServe V1).
#[utoipa::path(post, path = "/v1/models/{model}:predict", tag = "kserve-v1",
    params(("model" = String, Path, description = "The model name", example = "default")),
    request_body = PredictRequest,
    responses(
        (status = 200, body = PredictResponse),
        (status = 400, description = "A bad body or instance, named by index", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 503, description = "A shard the instances read has no replica answering, named", body = ErrorBody),
    ))]
async fn predict(
    State(state): State<AppState>,
    Path(model): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<PredictResponse>, ApiError> {
    let Some((name, verb)) = model.split_once(':') else {
        return Err(ApiError::MethodNotAllowed);
    };
    check_model(&state, name)?;
    if verb != "predict" {
        return Err(ApiError::NotFound(format!("unknown verb {verb:?}; use :predict")));
    }
    let body = body_bytes(&state, body)?;
    let request: PredictRequest =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("invalid request body: {e}")))?;
    let snap = state.predictor.serving.load_full();
    let rows = crate::serve::tensor::Rows::Records(request.instances);
    let (p, ids) = state.predictor.predict_logged(&snap, rows, request.ids).await?;
    Ok(Json(PredictResponse::of(p, ids)))
}

#[cfg(test)]
mod tests {
    use super::route_of;

    #[test]
    fn custom_verbs_belong_to_the_last_parameter() {
        assert_eq!(route_of("/v1/models/{model}:predict"), "/v1/models/{model}");
        assert_eq!(route_of("/v1/models/{model}/snapshots"), "/v1/models/{model}/snapshots");
        assert_eq!(route_of("/healthz"), "/healthz");
    }
}
