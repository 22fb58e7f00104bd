//! The one error type of the HTTP API: each case maps to a status and a JSON
//! body `{"error": "..."}` that says what was wrong. Internals are logged,
//! never sent.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::serve::ServeError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
    /// Too many at once: try again later (429).
    #[error("{0}")]
    Busy(String),
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Busy(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<ServeError> for ApiError {
    fn from(e: ServeError) -> ApiError {
        match e {
            ServeError::BadRequest(m) => ApiError::BadRequest(m),
            ServeError::NotFound(m) => ApiError::NotFound(m),
            ServeError::Internal(m) => ApiError::Internal(m),
            ServeError::Unavailable(m) => ApiError::Unavailable(m),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(detail) = &self {
            tracing::error!(detail, "internal error answering a request");
        }
        (self.status(), Json(serde_json::json!({ "error": self.to_string() }))).into_response()
    }
}
