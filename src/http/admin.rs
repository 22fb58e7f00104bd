//! Admin endpoints, behind a bearer token (`http.admin_token`); with no
//! token configured they are off and answer 404.
//!
//! `POST /v1/models/{name}/rollback` with `{"to_version": q | "last_good",
//! "events": "relearn" | "skip"}` appends a rollback record to the update
//! log and answers once this replica has taken it (or after 30 s, 202).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use utoipa::ToSchema;

use super::{check_model, ApiError, AppState};
use crate::apply::handle::{ReplicaHandle, RollbackAnswer, RollbackError, RollbackTarget};
use crate::update_log::record::EventsSince;

/// How long a rollback request waits for this replica to take it before
/// answering 202.
const ROLLBACK_ANSWER_WAIT: Duration = Duration::from_secs(30);

/// What the admin endpoints need: the token they check, and the replica's
/// handle they act through.
pub struct Admin {
    pub token: String,
    pub replica: ReplicaHandle,
}

#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
enum Target {
    Version(i64),
    Named(String),
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RollbackRequest {
    /// A version (an update-log position, e.g. a snapshot's) or "last_good".
    to_version: Target,
    /// What becomes of the events learned since: relearn | skip.
    #[schema(value_type = String)]
    events: EventsSince,
}

/// Compares in time independent of where the strings differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Ok if `headers` carry `Authorization: Bearer <token>`; else the 401
/// answer, which names the `kind` of token (admin, ingest) it wanted.
// The error is the HTTP answer itself, built once per refused request:
// boxing it would only add an allocation.
#[allow(clippy::result_large_err)]
pub(super) fn check_bearer(headers: &HeaderMap, token: &str, kind: &str) -> Result<(), Response> {
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|t| same_secret(t.trim().as_bytes(), token.as_bytes())) {
        return Ok(());
    }
    let why = match given {
        Some(_) => format!("wrong {kind} token"),
        None => format!("the {kind} token is required: Authorization: Bearer <token>"),
    };
    Err((StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], Json(json!({ "error": why })))
        .into_response())
}

#[allow(clippy::result_large_err)] // as `check_bearer`
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<Arc<Admin>, Response> {
    let Some(admin) = state.admin.clone() else {
        return Err(ApiError::NotFound("admin endpoints are off: no admin token is configured".into()).into_response());
    };
    check_bearer(headers, &admin.token, "admin").inspect_err(|_| state.metrics.serving.admin_denied.inc())?;
    Ok(admin)
}

/// Roll the fleet back to a version: appends a rollback record to the
/// update log; answers once this replica has taken it.
#[utoipa::path(post, path = "/v1/models/{model}/rollback", tag = "admin",
    params(("model" = String, Path, description = "The model name", example = "default")),
    request_body = RollbackRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Taken (or rejected, with the reason) by this replica", body = Object),
        (status = 202, description = "Appended; this replica had not read it after 30 s", body = Object),
        (status = 400, body = super::ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = super::ErrorBody),
        (status = 404, description = "Admin endpoints are off (no token configured)", body = super::ErrorBody),
        (status = 409, description = "No checkpoint and log can rebuild that version; the error names the oldest that can be reached", body = super::ErrorBody),
        (status = 503, description = "The update log is unreachable", body = super::ErrorBody),
    ))]
pub async fn rollback(
    State(state): State<AppState>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let admin = match authorize(&state, &headers) {
        Ok(admin) => admin,
        Err(denied) => return denied,
    };
    match roll_back(state, admin, model, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn roll_back(
    state: AppState,
    admin: Arc<Admin>,
    model: String,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    check_model(&state, &model)?;
    let body = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let request: RollbackRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadRequest(format!(
            "invalid request body: {e}; expected {{\"to_version\": <version> or \"last_good\", \"events\": \"relearn\" or \"skip\"}}"
        ))
    })?;
    let target = match request.to_version {
        Target::Version(q) => RollbackTarget::Version(q),
        Target::Named(name) if name == "last_good" => RollbackTarget::LastGood,
        Target::Named(name) => {
            return Err(ApiError::BadRequest(format!("to_version {name:?}: a version number or \"last_good\"")))
        }
    };
    let answer = admin.replica.roll_back(target, request.events, ROLLBACK_ANSWER_WAIT).await.map_err(|e| match e {
        RollbackError::OutOfRange(..) => ApiError::BadRequest(e.to_string()),
        RollbackError::Unreachable { .. } => ApiError::Conflict(e.to_string()),
        RollbackError::Unavailable(_) => ApiError::Unavailable(e.to_string()),
        RollbackError::Internal(_) => ApiError::Internal(e.to_string()),
    })?;
    Ok(match answer {
        RollbackAnswer::Read { offset, to, outcome: o, model_version } => {
            let body = json!({
                "rollback_offset": offset, "to_version": to, "events": o.events, "taken": o.taken,
                "rejected": o.rejected, "examples_undone": o.examples_undone, "model_version": model_version,
            });
            (StatusCode::OK, Json(body)).into_response()
        }
        RollbackAnswer::Pending { offset, to } => {
            let body = json!({ "rollback_offset": offset, "to_version": to, "events": request.events, "taken": null });
            (StatusCode::ACCEPTED, Json(body)).into_response()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abcdefghijklmnop", b"abcdefghijklmnop"));
        assert!(!same_secret(b"abcdefghijklmnop", b"abcdefghijklmnoq"));
        assert!(!same_secret(b"abcdefghijklmnop", b"abcdefghijklmno"));
    }
}
