//! OpenAI-compatible HTTP front of the router (axum).
//!
//! Every request is translated into a call to the router's own public gRPC service - any type
//! implementing the tonic-generated [`Orchard`] trait - made in-process. Routing, validation,
//! retries, telemetry and cancellation therefore live in one place and HTTP clients get exactly
//! what gRPC clients get: this module only changes shapes (OpenAI JSON and server-sent events)
//! and maps `tonic::Status` codes to HTTP statuses once ([`error`]).
//!
//! Endpoints: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`,
//! `GET /health`, and with an Admin service `GET /v1/orchard/workers`. The API reference
//! followed is OpenAI's (completions, chat completions, streaming chunks, error object);
//! vLLM's extensions (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `min_tokens`,
//! `stop_token_ids`) are accepted too.

pub mod admin;
pub mod auth;
pub mod error;
pub mod format;
pub mod generate;
pub mod handlers;
pub mod request;
pub mod response;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::{middleware, Router};
use orchard_common::config::RouterConfig;
use orchard_proto::v1::admin_server::Admin;
use orchard_proto::v1::orchard_server::Orchard;
use tokio::net::TcpListener;

pub use error::ApiError;

/// Settings of the HTTP front.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Bearer token required on every endpoint but `/health`; none when unset.
    pub api_key: Option<String>,
    /// `Retry-After` sent with 429 (every worker saturated): how long a client should back off.
    pub retry_after: Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            api_key: None,
            retry_after: Duration::from_secs(1),
        }
    }
}

impl HttpOptions {
    /// The options a router config asks for.
    pub fn from_config(config: &RouterConfig) -> Self {
        Self {
            api_key: config.api_key.clone(),
            ..Self::default()
        }
    }
}

/// What every handler needs: the service to call and the options.
pub struct AppState<S> {
    pub service: Arc<S>,
    pub options: Arc<HttpOptions>,
}

impl<S> Clone for AppState<S> {
    fn clone(&self) -> Self {
        Self {
            service: Arc::clone(&self.service),
            options: Arc::clone(&self.options),
        }
    }
}

/// The OpenAI-compatible API over `service` (the router's public gRPC service, or a fake).
pub fn app<S: Orchard>(service: Arc<S>, options: HttpOptions) -> Router {
    build(service, None, options)
}

/// [`app`] plus `GET /v1/orchard/workers` from the router's Admin service.
pub fn app_with_admin<S: Orchard, A: Admin>(
    service: Arc<S>,
    admin: Arc<A>,
    options: HttpOptions,
) -> Router {
    build(service, Some(admin::routes(admin)), options)
}

fn build<S: Orchard>(service: Arc<S>, extra: Option<Router>, options: HttpOptions) -> Router {
    let api_key = options.api_key.clone();
    let state = AppState {
        service,
        options: Arc::new(options),
    };
    let mut api = Router::new()
        .route("/v1/completions", post(handlers::completions::<S>))
        .route(
            "/v1/chat/completions",
            post(handlers::chat_completions::<S>),
        )
        .route("/v1/models", get(handlers::models::<S>))
        .with_state(state.clone());
    if let Some(extra) = extra {
        api = api.merge(extra);
    }
    if let Some(key) = api_key {
        let key = auth::ApiKey(Arc::from(key));
        api = api.route_layer(middleware::from_fn_with_state(key, auth::require_api_key));
    }
    Router::new()
        .route("/health", get(handlers::health::<S>))
        .with_state(state)
        .merge(api)
        .fallback(handlers::not_found)
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets open requests finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
