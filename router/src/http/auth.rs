//! Bearer-token check for the HTTP API (`Authorization: Bearer <api_key>`), as OpenAI clients
//! send it. Active only when the router's config sets `api_key`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use orchard_common::ErrorKind;
use subtle::ConstantTimeEq;

use super::error::ApiError;

/// The configured key, shared by every request.
#[derive(Clone)]
pub struct ApiKey(pub Arc<str>);

/// Lets the request through only with the right bearer token; compared in constant time so the
/// key cannot be guessed byte by byte from response times.
pub async fn require_api_key(State(key): State<ApiKey>, request: Request, next: Next) -> Response {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match token {
        Some(token) if bool::from(token.as_bytes().ct_eq(key.0.as_bytes())) => {
            next.run(request).await
        }
        Some(_) => unauthorized("invalid API key"),
        None => unauthorized("missing API key: send `Authorization: Bearer <key>`"),
    }
}

fn unauthorized(message: &str) -> Response {
    ApiError::from_kind(ErrorKind::Unauthenticated, message).into_response()
}
