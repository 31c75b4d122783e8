//! Endpoint handlers: parse the OpenAI body, build the `GenerateRequest`, hand it to
//! [`generate::respond`].

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Json;
use orchard_proto::v1 as pb;
use orchard_proto::v1::orchard_server::Orchard;
use serde::Serialize;

use super::error::ApiError;
use super::format::{ChatFormat, CompletionFormat, Meta};
use super::generate::{self, Delivery, UsageChunk};
use super::request::{Endpoint, OpenAiRequest, StreamOptions};
use super::response::{ModelCard, ModelList};
use super::AppState;

/// `POST /v1/completions`.
pub async fn completions<S: Orchard>(
    State(state): State<AppState<S>>,
    headers: HeaderMap,
    body: Result<Json<OpenAiRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    let meta = new_meta("cmpl", &body.model);
    let request = body.to_generate(Endpoint::Completions, &meta.id)?;
    let delivery = delivery(body.stream, body.stream_options);
    let format = CompletionFormat { meta };
    generate::respond(&state, &headers, request, format, delivery).await
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions<S: Orchard>(
    State(state): State<AppState<S>>,
    headers: HeaderMap,
    body: Result<Json<OpenAiRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    let meta = new_meta("chatcmpl", &body.model);
    let request = body.to_generate(Endpoint::ChatCompletions, &meta.id)?;
    let delivery = delivery(body.stream, body.stream_options);
    let format = ChatFormat { meta };
    generate::respond(&state, &headers, request, format, delivery).await
}

/// `GET /v1/models`, from the service's ListModels.
pub async fn models<S: Orchard>(
    State(state): State<AppState<S>>,
) -> Result<Json<ModelList>, ApiError> {
    let models = list_models(&state).await?;
    Ok(Json(ModelList {
        object: "list",
        data: models.into_iter().map(ModelCard::from).collect(),
    }))
}

/// Body of a healthy `GET /health`.
#[derive(Debug, Serialize)]
pub struct Health {
    pub status: &'static str,
    /// Models the router can serve right now.
    pub models: usize,
}

/// `GET /health`: 200 while the router can serve at least one model, else 503, so a load
/// balancer in front of several routers skips one that has no workers. Never needs the API key.
pub async fn health<S: Orchard>(
    State(state): State<AppState<S>>,
) -> Result<Json<Health>, ApiError> {
    let models = list_models(&state).await?;
    if models.is_empty() {
        return Err(ApiError::from_kind(
            orchard_common::ErrorKind::Unavailable,
            "no model is being served",
        ));
    }
    Ok(Json(Health {
        status: "ok",
        models: models.len(),
    }))
}

/// Any other path: 404 in OpenAI's error shape.
pub async fn not_found() -> ApiError {
    ApiError::from_kind(orchard_common::ErrorKind::NotFound, "no such endpoint")
}

async fn list_models<S: Orchard>(state: &AppState<S>) -> Result<Vec<pb::ModelInfo>, ApiError> {
    let reply = state
        .service
        .list_models(tonic::Request::new(pb::ListModelsRequest {}))
        .await
        .map_err(|s| ApiError::from_status(&s, state.options.retry_after))?;
    Ok(reply.into_inner().models)
}

fn delivery(stream: bool, options: Option<StreamOptions>) -> Delivery {
    match (stream, options.unwrap_or_default().include_usage) {
        (false, _) => Delivery::Whole,
        (true, true) => Delivery::Stream(UsageChunk::Include),
        (true, false) => Delivery::Stream(UsageChunk::Omit),
    }
}

/// A fresh response identity: `<prefix>-<uuid>` doubles as the Orchard request id, so one id
/// finds the request in HTTP, router and worker logs.
fn new_meta(prefix: &str, model: &str) -> Meta {
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Meta {
        id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()),
        created,
        model: model.to_string(),
    }
}
