//! Errors of the HTTP front in OpenAI's JSON shape
//! (`{"error": {"message", "type", "param", "code"}}`).
//!
//! Failures are classified once, by whoever is closest to the cause: the `Orchard` service
//! (a `tonic::Status`, mapped here through [`ErrorKind::from_code`] so the HTTP status follows
//! the same classification as gRPC), axum's JSON extractor (malformed bodies), or this front
//! (parameters OpenAI has and Orchard does not, the API key).

use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use orchard_common::ErrorKind;
use serde::Serialize;
use thiserror::Error;

/// A failure answered to an HTTP client.
#[derive(Debug, Clone, Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    /// HTTP status of the response (or of the SSE error event's cause).
    pub status: StatusCode,
    /// OpenAI's error `type`, which clients use to pick an exception class.
    pub kind: &'static str,
    /// Human-readable reason; names the offending parameter where there is one.
    pub message: String,
    /// The request parameter at fault, when known.
    pub param: Option<String>,
    /// Machine-readable code: the Orchard error kind's metric label, so HTTP errors, gRPC
    /// errors and metrics use one vocabulary.
    pub code: &'static str,
    /// Set on 429 so clients back off for the time the router suggests.
    pub retry_after: Option<Duration>,
}

/// The JSON body of an error (`{"error": {...}}`).
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

/// The inner object of [`ErrorBody`], also sent alone-wrapped in SSE error events.
#[derive(Debug, Serialize)]
pub struct ErrorDetail<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<&'a str>,
    pub code: &'static str,
}

/// HTTP status used when the client went away (nginx's "client closed request"); nobody
/// reads it, but logs and access metrics do.
const CLIENT_CLOSED_REQUEST: u16 = 499;

impl ApiError {
    /// An error of `kind` as the `Orchard` service would classify it.
    pub fn from_kind(kind: ErrorKind, message: impl Into<String>) -> Self {
        let (status, openai_type) = match kind {
            ErrorKind::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_request_error"),
            ErrorKind::NotFound => (StatusCode::NOT_FOUND, "invalid_request_error"),
            ErrorKind::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
            ErrorKind::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "server_error"),
            ErrorKind::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "server_error"),
            ErrorKind::Cancelled => (
                StatusCode::from_u16(CLIENT_CLOSED_REQUEST)
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                "server_error",
            ),
            ErrorKind::Unauthenticated => (StatusCode::UNAUTHORIZED, "authentication_error"),
            ErrorKind::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
        };
        Self {
            status,
            kind: openai_type,
            message: message.into(),
            param: None,
            code: kind.label(),
            retry_after: None,
        }
    }

    /// A 400 about one request parameter.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            ..Self::from_kind(ErrorKind::InvalidArgument, message)
        }
    }

    /// A failure of the generation stream itself (no final message, engine error).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::from_kind(ErrorKind::Internal, message)
    }

    /// The service's status, with `Retry-After` on 429 set to `retry_after`.
    pub fn from_status(status: &tonic::Status, retry_after: Duration) -> Self {
        let kind = ErrorKind::from_code(status.code());
        let mut err = Self::from_kind(kind, status.message());
        if kind == ErrorKind::ResourceExhausted {
            err.retry_after = Some(retry_after);
        }
        err
    }

    /// The body as it goes on the wire.
    pub fn body(&self) -> ErrorBody<'_> {
        ErrorBody {
            error: ErrorDetail {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let mut err = Self::from_kind(ErrorKind::InvalidArgument, rejection.body_text());
        // Keep "payload too large" and "wrong content type" distinguishable; every other
        // rejection (syntax, wrong types, missing fields) is a plain 400 as in OpenAI's API.
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE || status == StatusCode::UNSUPPORTED_MEDIA_TYPE {
            err.status = status;
        }
        err
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if let Some(after) = self.retry_after {
            // Whole seconds, at least one: HTTP's Retry-After has no fractions.
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_openai_statuses() {
        let cases = [
            (tonic::Code::InvalidArgument, 400, "invalid_request_error"),
            (tonic::Code::NotFound, 404, "invalid_request_error"),
            (tonic::Code::ResourceExhausted, 429, "rate_limit_error"),
            (tonic::Code::Unavailable, 503, "server_error"),
            (tonic::Code::Unauthenticated, 401, "authentication_error"),
            (tonic::Code::Internal, 500, "server_error"),
        ];
        for (code, http, kind) in cases {
            let err = ApiError::from_status(&tonic::Status::new(code, "m"), Duration::ZERO);
            assert_eq!(err.status.as_u16(), http, "{code:?}");
            assert_eq!(err.kind, kind, "{code:?}");
        }
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let status = tonic::Status::resource_exhausted("full");
        let response = ApiError::from_status(&status, Duration::from_millis(1500)).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            response.headers().get(header::RETRY_AFTER),
            Some(&HeaderValue::from(2u64))
        );
    }
}
