//! `GET /v1/models/{model}/checkpoints`: the checkpoint store's checkpoints
//! of this model, newest first. Under its first name,
//! `GET /v1/models/{model}/snapshots` (deprecated), the same list answers
//! as `{"snapshots": [...]}`: "snapshot" now names only the serving
//! snapshot.

use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::{check_model, ApiError, AppState, ErrorBody};
use crate::checkpoint::CheckpointInfo;

/// One checkpoint.
#[derive(Serialize, ToSchema)]
pub struct CheckpointEntry {
    /// The update-log position it holds: a `to_version` for rollback.
    position: i64,
    written_unix_ms: u64,
    bytes: u64,
    examples_learned: Option<u64>,
    progressive_logloss: Option<f64>,
}

impl From<&CheckpointInfo> for CheckpointEntry {
    fn from(c: &CheckpointInfo) -> CheckpointEntry {
        CheckpointEntry {
            position: c.position,
            written_unix_ms: c.written.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            bytes: c.bytes,
            examples_learned: c.examples_learned,
            progressive_logloss: c.progressive_loss,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct Checkpoints {
    /// Newest first.
    checkpoints: Vec<CheckpointEntry>,
}

/// The list under its deprecated name.
#[derive(Serialize, ToSchema)]
pub struct Snapshots {
    /// Newest first.
    snapshots: Vec<CheckpointEntry>,
}

/// The checkpoint store's checkpoints of this model, newest first.
#[utoipa::path(get, path = "/v1/models/{model}/checkpoints", tag = "training",
    params(("model" = String, Path, description = "The model name", example = "default")),
    responses((status = 200, body = Checkpoints), (status = 404, body = ErrorBody), (status = 503, description = "The store is unreachable", body = ErrorBody)))]
pub async fn list(State(state): State<AppState>, Path(model): Path<String>) -> Result<Json<Checkpoints>, ApiError> {
    Ok(Json(Checkpoints { checkpoints: listed(&state, &model).await? }))
}

/// Deprecated: `GET /v1/models/{model}/checkpoints`, as `{"snapshots": [...]}`.
#[utoipa::path(get, path = "/v1/models/{model}/snapshots", tag = "training",
    params(("model" = String, Path, description = "The model name", example = "default")),
    responses((status = 200, body = Snapshots), (status = 404, body = ErrorBody), (status = 503, description = "The store is unreachable", body = ErrorBody)))]
#[deprecated = "GET /v1/models/{model}/checkpoints"]
pub async fn list_as_snapshots(
    State(state): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<Snapshots>, ApiError> {
    Ok(Json(Snapshots { snapshots: listed(&state, &model).await? }))
}

/// The store's checkpoints of `model`, newest first (none without a store).
async fn listed(state: &AppState, model: &str) -> Result<Vec<CheckpointEntry>, ApiError> {
    check_model(state, model)?;
    let Some(store) = state.checkpoints.clone() else { return Ok(Vec::new()) };
    let listed = tokio::task::spawn_blocking(move || store.list())
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    Ok(listed.iter().map(CheckpointEntry::from).collect())
}
