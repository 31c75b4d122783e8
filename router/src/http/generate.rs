//! One generation over HTTP: call the `Orchard` service in-process, wait for its first message
//! (so failures before the first token get a proper HTTP status), then either gather the whole
//! stream or relay it as server-sent events.
//!
//! The service's stream is owned by the response body: when the client disconnects, hyper drops
//! the body, which drops the stream, which cancels the request on the worker - the same path a
//! gRPC client takes.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, BoxStream, StreamExt};
use orchard_proto::v1 as pb;
use orchard_proto::v1::orchard_server::Orchard;
use serde::Serialize;

use super::error::ApiError;
use super::format::{ChunkExtras, Collected, OutputFormat};
use super::response::{Finish, Piece};
use super::AppState;

/// Headers copied from HTTP into the gRPC metadata so the request's trace continues through the
/// router and workers (W3C trace context).
const TRACE_HEADERS: [&str; 2] = ["traceparent", "tracestate"];

/// Whether the streamed response ends with a usage chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageChunk {
    Include,
    Omit,
}

/// How the client wants the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// One JSON response after the last token.
    Whole,
    /// Server-sent events, one chunk per stream message, then `data: [DONE]`.
    Stream(UsageChunk),
}

/// The service's message stream, boxed so the SSE body has one concrete type.
type MessageStream = BoxStream<'static, Result<pb::GenerateResponse, tonic::Status>>;

/// Runs `request` through the service and answers in `format`, as `delivery` asks.
pub async fn respond<S: Orchard, F: OutputFormat>(
    state: &AppState<S>,
    headers: &HeaderMap,
    request: pb::GenerateRequest,
    format: F,
    delivery: Delivery,
) -> Result<Response, ApiError> {
    let retry_after = state.options.retry_after;
    let mut grpc = tonic::Request::new(request);
    for name in TRACE_HEADERS {
        let value = headers.get(name).and_then(|v| v.to_str().ok());
        if let Some(parsed) = value.and_then(|v| v.parse().ok()) {
            grpc.metadata_mut().insert(name, parsed);
        }
    }
    let status_error = |s: tonic::Status| ApiError::from_status(&s, retry_after);
    let mut messages: MessageStream = state
        .service
        .generate(grpc)
        .await
        .map_err(status_error)?
        .into_inner()
        .boxed();
    let first = match messages.next().await {
        Some(Ok(first)) => first,
        Some(Err(status)) => return Err(status_error(status)),
        None => return Err(ended_early()),
    };
    let messages: MessageStream = stream::iter([Ok(first)]).chain(messages).boxed();
    match delivery {
        Delivery::Whole => {
            let collected = collect(messages, retry_after).await?;
            Ok(Json(format.whole(collected)).into_response())
        }
        Delivery::Stream(usage) => {
            let events = SseRelay::new(messages, format, usage, retry_after).into_stream();
            Ok(Sse::new(events)
                .keep_alive(KeepAlive::default())
                .into_response())
        }
    }
}

fn ended_early() -> ApiError {
    ApiError::internal("the generation stream ended without a final message")
}

/// Gathers every message up to the final one.
async fn collect(
    mut messages: MessageStream,
    retry_after: Duration,
) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut chars = 0;
    let mut logprob_runs = Vec::new();
    while let Some(item) = messages.next().await {
        let piece = item
            .map_err(|s| ApiError::from_status(&s, retry_after))
            .and_then(Piece::from_response)?;
        if !piece.logprobs.is_empty() {
            logprob_runs.push((chars, piece.logprobs));
        }
        chars += piece.text.chars().count();
        text.push_str(&piece.text);
        if let Some(finish) = piece.finish {
            return Ok(Collected {
                text,
                logprob_runs,
                finish,
            });
        }
    }
    Err(ended_early())
}

/// Turns stream messages into SSE events, queueing the few events one message can produce.
struct SseRelay<F> {
    messages: MessageStream,
    format: F,
    usage: UsageChunk,
    retry_after: Duration,
    pending: VecDeque<Event>,
    /// Characters of completion text sent so far (completions' `text_offset`).
    chars_sent: usize,
    /// No more messages are read once the final message or an error went out.
    ended: bool,
}

impl<F: OutputFormat> SseRelay<F> {
    fn new(messages: MessageStream, format: F, usage: UsageChunk, retry_after: Duration) -> Self {
        let pending = format.opening().iter().map(json_event).collect();
        Self {
            messages,
            format,
            usage,
            retry_after,
            pending,
            chars_sent: 0,
            ended: false,
        }
    }

    fn into_stream(self) -> impl futures::Stream<Item = Result<Event, Infallible>> + Send {
        stream::unfold(self, |mut relay| async move {
            loop {
                if let Some(event) = relay.pending.pop_front() {
                    return Some((Ok(event), relay));
                }
                if relay.ended {
                    return None;
                }
                let item = relay.messages.next().await;
                relay.on_message(item);
            }
        })
    }

    fn on_message(&mut self, item: Option<Result<pb::GenerateResponse, tonic::Status>>) {
        let piece = match item {
            Some(Ok(resp)) => Piece::from_response(resp),
            Some(Err(status)) => Err(ApiError::from_status(&status, self.retry_after)),
            None => Err(ended_early()),
        };
        match piece {
            Ok(piece) => self.on_piece(piece),
            Err(err) => {
                tracing::warn!(error = %err, "generation failed after streaming started");
                self.pending.push_back(json_event(&err.body()));
                self.ended = true;
            }
        }
    }

    fn on_piece(&mut self, piece: Piece) {
        let carries_something =
            !piece.text.is_empty() || !piece.logprobs.is_empty() || piece.finish.is_some();
        if !carries_something {
            return;
        }
        let timings_here = self.usage == UsageChunk::Omit;
        let extras = ChunkExtras {
            timings: piece
                .finish
                .as_ref()
                .filter(|_| timings_here)
                .and_then(|f| f.timings.clone()),
        };
        let chunk = self.format.chunk(&piece, self.chars_sent, extras);
        self.pending.push_back(json_event(&chunk));
        self.chars_sent += piece.text.chars().count();
        if let Some(finish) = &piece.finish {
            self.finish(finish);
        }
    }

    fn finish(&mut self, finish: &Finish) {
        if self.usage == UsageChunk::Include {
            let chunk = self.format.usage_chunk(finish);
            self.pending.push_back(json_event(&chunk));
        }
        self.pending.push_back(Event::default().data("[DONE]"));
        self.ended = true;
    }
}

/// `data: <json>`; a value that cannot be serialized becomes an error event instead.
fn json_event<T: Serialize>(value: &T) -> Event {
    match serde_json::to_string(value) {
        Ok(json) => Event::default().data(json),
        Err(e) => {
            let err = ApiError::internal(format!("could not encode a chunk: {e}"));
            let body = serde_json::json!({ "error": {
                "message": err.message, "type": err.kind, "param": null, "code": err.code,
            }});
            Event::default().data(body.to_string())
        }
    }
}
