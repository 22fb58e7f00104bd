//! What a replica serves its peers: `GET /v1/models/{name}/checkpoint`, the
//! newest checkpoint of its store as the stores encode it, from which a new
//! replica bootstraps (`checkpoint.bootstrap_from`); and `POST
//! /v1/models/{name}/rows`, rows of the sparse tables at the served weights,
//! what a replica of another shard gathers (`crate::shard`). Behind its own token
//! (`checkpoint.peer_token`; none: off), since weights are the fleet's to
//! share, and the admin token, which rewrites history, should not be on
//! every new replica. A checkpoint is large (about 140 MB for the default
//! `wide_deep`): it is streamed from the store in parts on a blocking
//! thread, never held whole, never compressed (float weights barely
//! shrink), and at most [`DOWNLOADS_AT_ONCE`] are served at a time.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::admin::check_bearer;
use super::{check_model, ApiError, AppState, ErrorBody};
use crate::checkpoint::{CheckpointInfo, SharedStore};
use crate::model::gathered;

/// Checkpoints sent at once; one more is answered 429.
pub const DOWNLOADS_AT_ONCE: usize = 2;
/// The part of a checkpoint read from the store and sent at a time.
const PART_BYTES: usize = 1 << 20;
/// What a checkpoint's body is; the compression layer leaves it alone.
pub const CHECKPOINT_CONTENT_TYPE: &str = "application/vnd.tributary.checkpoint";
/// The checkpoint's update-log position, beside its body.
pub const POSITION_HEADER: &str = "x-tributary-position";

/// The endpoint's token and the downloads it may serve at once.
pub struct PeerCheckpoints {
    token: String,
    downloads: Arc<Semaphore>,
}

impl PeerCheckpoints {
    pub fn new(token: &str) -> PeerCheckpoints {
        PeerCheckpoints { token: token.to_string(), downloads: Arc::new(Semaphore::new(DOWNLOADS_AT_ONCE)) }
    }
}

/// The newest checkpoint of this replica's store, encoded as the stores
/// keep it (checksummed): what a new replica bootstraps from
/// (`checkpoint.bootstrap_from`). Its position is in `X-Tributary-Position`.
#[utoipa::path(get, path = "/v1/models/{model}/checkpoint", tag = "peers",
    params(("model" = String, Path, description = "The model name", example = "default")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The encoded checkpoint", content_type = "application/vnd.tributary.checkpoint"),
        (status = 401, description = "No token, or not checkpoint.peer_token", body = ErrorBody),
        (status = 404, description = "No such model, no checkpoint yet, or off (no checkpoint.peer_token)", body = ErrorBody),
        (status = 429, description = "As many checkpoints are being sent as the replica sends at once", body = ErrorBody),
        (status = 503, description = "The store is unreachable", body = ErrorBody),
    ))]
pub async fn newest_checkpoint(
    State(state): State<AppState>,
    Path(model): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_model(&state, &model)?;
    let Some(store) = state.checkpoints.clone() else { return Err(not_served("checkpoints")) };
    let peers = match admitted(&state, &headers, "checkpoints") {
        Ok(peers) => peers,
        Err(answer) => return Ok(answer),
    };
    let Ok(permit) = peers.downloads.clone().try_acquire_owned() else {
        return Err(ApiError::Busy(format!("{DOWNLOADS_AT_ONCE} checkpoints are being sent; try again later")));
    };
    let listed = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.list()).await.map_err(|e| ApiError::Internal(e.to_string()))?
    };
    let newest = listed.map_err(|e| ApiError::Unavailable(e.to_string()))?.into_iter().next();
    let Some(info) = newest else {
        return Err(ApiError::NotFound("no checkpoint yet".into()));
    };
    let headers = [
        (header::CONTENT_TYPE, CHECKPOINT_CONTENT_TYPE.to_string()),
        (header::CONTENT_LENGTH, info.bytes.to_string()),
        (header::HeaderName::from_static(POSITION_HEADER), info.position.to_string()),
    ];
    Ok((StatusCode::OK, headers, stream_parts(store, info, permit)).into_response())
}

/// What the peers' endpoints answer when no peer token is configured.
fn not_served(what: &str) -> ApiError {
    ApiError::NotFound(format!("{what} are not served: no checkpoint.peer_token is configured"))
}

/// The peers' side of this replica, for a request of `what` (named in a
/// refusal): a peer token is configured, and the request carries it.
/// `Err`: the answer to send instead (as `check_bearer`'s, unboxed).
#[allow(clippy::result_large_err)]
fn admitted(state: &AppState, headers: &HeaderMap, what: &str) -> Result<Arc<PeerCheckpoints>, Response> {
    let peers = state.peer_checkpoints.clone().ok_or_else(|| not_served(what).into_response())?;
    check_bearer(headers, &peers.token, "peer")?;
    Ok(peers)
}

/// The most rows one gather may ask for.
pub const MAX_ROWS_ASKED: usize = 1 << 16;

/// The longest a rows request waits for the served weights to reach its
/// `at_least`; then it is answered from what is served (its position says
/// which).
const AT_LEAST_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Rows of the sparse tables, each `[param, bucket]`.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RowsAsked {
    rows: Vec<(u32, u32)>,
    /// Answer from served weights at this update-log position or later,
    /// waiting up to half a second for them: a trainer asks for the
    /// position that includes its own last record, so that no gradient of
    /// its misses its own previous step on another shard's rows.
    #[serde(default)]
    at_least: i64,
    /// With each optimizer slot's values of the rows after theirs, when
    /// the served weights carry the optimizer's state (a fleet whose
    /// trainers overlap): what a trainer's overlay steps.
    #[serde(default)]
    slots: bool,
}

/// Rows of the sparse tables at the served weights, for a replica of
/// another shard that gathers the rows a batch reads (docs/design.md
/// section 8a): their values as little-endian f32, one row after the
/// other, then each optimizer slot's values for them when asked for and
/// served (`X-Tributary-Slots`: how many), the served position in
/// `X-Tributary-Position` and its watermarks in `X-Tributary-Watermarks`.
#[utoipa::path(post, path = "/v1/models/{model}/rows", tag = "peers",
    params(("model" = String, Path, description = "The model name", example = "default")),
    request_body = RowsAsked,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The rows' values, f32 little-endian", content_type = "application/octet-stream"),
        (status = 400, description = "A row this replica does not hold, or more than 65 536", body = ErrorBody),
        (status = 401, description = "No token, or not checkpoint.peer_token", body = ErrorBody),
        (status = 404, description = "No such model, or off (no checkpoint.peer_token)", body = ErrorBody),
    ))]
pub async fn rows(
    State(state): State<AppState>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_model(&state, &model)?;
    if let Err(answer) = admitted(&state, &headers, "rows") {
        return Ok(answer);
    }
    let asked: RowsAsked = serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    if asked.rows.len() > MAX_ROWS_ASKED {
        return Err(ApiError::BadRequest(format!("{} rows asked; at most {MAX_ROWS_ASKED}", asked.rows.len())));
    }
    let snap = served_at_least(&state, asked.at_least).await;
    let layout = snap.model.layout();
    let not_held = || {
        ApiError::BadRequest(format!(
            "a row asked is not a row this replica holds (shard {} of {})",
            layout.index, layout.count
        ))
    };
    let mut values = gathered::answer(&snap.model, layout, &snap.weights, &asked.rows).ok_or_else(not_held)?;
    let slots = snap.optimizer.as_ref().filter(|_| asked.slots).map_or(&[][..], |o| o.slots.as_slice());
    for slot in slots {
        values.extend(gathered::answer(&snap.model, layout, slot, &asked.rows).ok_or_else(not_held)?);
    }
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let headers = [
        (header::CONTENT_TYPE, "application/octet-stream".to_string()),
        (header::HeaderName::from_static(POSITION_HEADER), snap.position.to_string()),
        (header::HeaderName::from_static("x-tributary-slots"), slots.len().to_string()),
        (header::HeaderName::from_static("x-tributary-watermarks"), crate::shard::watermarks_header(&snap.watermarks)),
    ];
    Ok((StatusCode::OK, headers, bytes).into_response())
}

/// The served snapshot once at `position` or later, or after
/// [`AT_LEAST_WAIT`], whichever comes first.
async fn served_at_least(state: &AppState, position: i64) -> std::sync::Arc<crate::snapshot::Snapshot> {
    let give_up = tokio::time::Instant::now() + AT_LEAST_WAIT;
    loop {
        let snap = state.predictor.serving.load_full();
        if snap.position >= position || tokio::time::Instant::now() >= give_up {
            return snap;
        }
        // The applier publishes at most every few milliseconds.
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// The checkpoint's bytes as a body, read in parts on a blocking thread (two
/// parts ahead of the client at most); the body holds `permit` until it is
/// sent whole or dropped. A store error midway ends the body short of its
/// Content-Length, which the client sees as a torn transfer.
fn stream_parts(store: SharedStore, info: CheckpointInfo, permit: OwnedSemaphorePermit) -> Body {
    let (parts, received) = mpsc::channel::<Result<Bytes, std::io::Error>>(2);
    tokio::task::spawn_blocking(move || {
        let mut at = 0u64;
        while at < info.bytes {
            let part = match store.read_part(&info, at, PART_BYTES) {
                Ok(part) if !part.is_empty() => Ok(Bytes::from(part)),
                Ok(_) => Err(std::io::Error::other("the checkpoint ended before its listed size")),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            };
            let failed = part.is_err();
            at += part.as_ref().map_or(0, |p| p.len() as u64);
            if parts.blocking_send(part).is_err() || failed {
                return;
            }
        }
    });
    Body::from_stream(futures::stream::unfold((received, permit), |(mut received, permit)| async move {
        received.recv().await.map(|part| (part, (received, permit)))
    }))
}
