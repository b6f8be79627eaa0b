//! The one error answer of the API: `{"error": "...", "hint": "..."}`, the
//! shape the Go daemon uses, with a status and an optional `Retry-After`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::run::Refusal;

/// An error answer: `{"error": "...", "hint": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) error: String,
    pub(crate) hint: Option<String>,
    pub(crate) retry_after: Option<u64>,
}

impl ApiError {
    /// An answer with `status` and the message `error`.
    pub fn new(status: StatusCode, error: impl Into<String>) -> Self {
        ApiError {
            status,
            error: error.into(),
            hint: None,
            retry_after: None,
        }
    }

    /// Adds a hint: what the caller can do about it.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Adds `Retry-After: seconds`.
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The status it is answered with.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.error
    }

    pub(crate) fn bad_request(error: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, error)
    }

    pub(crate) fn not_found() -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not found")
    }

    pub(crate) fn job_not_found() -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "no such job")
            .hint("jobs are visible to their owner only, and expire after they finish")
    }
}

impl From<&Refusal> for ApiError {
    fn from(refusal: &Refusal) -> Self {
        let status =
            StatusCode::from_u16(refusal.http_status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let error = ApiError::new(status, refusal.to_string());
        match refusal {
            Refusal::Busy(_) => error.hint("retry later").retry_after(1),
            Refusal::BadArgument(_) | Refusal::ShuttingDown | Refusal::AuditUnavailable(_) => error,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({ "error": self.error });
        if let Some(hint) = self.hint {
            body["hint"] = Value::String(hint);
        }
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
