//! W3C trace context (`traceparent` / `tracestate`) carried in gRPC metadata, so the
//! router's request span and the worker's handler span belong to one trace.
//!
//! Client side: [`TraceContextInterceptor`] (or [`inject_context`]) writes the current span's
//! context into an outgoing request. Server side: [`grpc_server_span`] as tonic's
//! `Server::builder().trace_fn(..)` opens a span per call that is a child of the caller's,
//! or a handler calls [`set_parent_from_metadata`] on its own span. The propagator is used
//! directly rather than through the OpenTelemetry global, so propagation works in tests and
//! tools that never called [`super::init`].

use std::time::SystemTime;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{Span as _, TraceContextExt, Tracer};
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::codegen::http;
use tonic::metadata::{KeyRef, MetadataKey, MetadataMap, MetadataValue};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Writes W3C trace-context headers into gRPC metadata.
struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The propagator only emits valid ASCII header names and values; anything else is
        // dropped rather than failing the request over a trace header.
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Reads W3C trace-context headers from gRPC metadata.
struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|key| match key {
                KeyRef::Ascii(key) => Some(key.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Writes the current `tracing` span's trace context into outgoing gRPC metadata. Writes
/// nothing when the span has no OpenTelemetry context (tracing export off).
pub fn inject_context(metadata: &mut MetadataMap) {
    inject_context_from(&Span::current().context(), metadata);
}

/// Writes `context` into outgoing gRPC metadata (for callers holding a context explicitly,
/// e.g. a relay task that outlives the request span).
pub fn inject_context_from(context: &Context, metadata: &mut MetadataMap) {
    TraceContextPropagator::new().inject_context(context, &mut MetadataInjector(metadata));
}

/// The caller's trace context from incoming gRPC metadata; an empty context (no remote
/// parent) when the caller sent none or sent a malformed `traceparent`.
pub fn extract_context(metadata: &MetadataMap) -> Context {
    TraceContextPropagator::new().extract(&MetadataExtractor(metadata))
}

/// Makes `span` a child of the caller's span named in `metadata`, so a handler's span joins
/// the caller's trace. Call it right after creating the span, before entering it or reading
/// its context (OpenTelemetry fixes a span's parent when it starts). Without a remote
/// context the span stays a root.
pub fn set_parent_from_metadata(span: &Span, metadata: &MetadataMap) {
    let parent = extract_context(metadata);
    if let Err(e) = span.set_parent(parent) {
        // No OpenTelemetry layer (export off), a filtered-out span, or a span already
        // started: there is no trace to join, and the request must not fail over it.
        tracing::trace!(error = ?e, "span not linked to the caller's trace");
    }
}

/// Records a phase of `parent`'s work that was measured elsewhere (e.g. on the engine thread)
/// as a finished child span named `name` running from `start` to `end`. Uses the global
/// OpenTelemetry tracer, which [`super::init`] installs only when OTLP export is configured;
/// without it, or when `parent` has no OpenTelemetry context, nothing is recorded.
pub fn record_child_span(parent: &Span, name: &'static str, start: SystemTime, end: SystemTime) {
    let context = parent.context();
    if !context.span().span_context().is_valid() {
        return;
    }
    let tracer = opentelemetry::global::tracer("orchard");
    let mut span = tracer
        .span_builder(name)
        .with_start_time(start)
        .start_with_context(&tracer, &context);
    span.end_with_timestamp(end);
}

/// tonic's `Server::builder().trace_fn(grpc_server_span)`: one `grpc.server` span per call,
/// named after the RPC path and parented to the caller's span from the request headers.
pub fn grpc_server_span(request: &http::Request<()>) -> Span {
    let span = tracing::info_span!(
        "grpc.server",
        otel.name = %request.uri().path(),
        otel.kind = "server",
        rpc.system = "grpc",
    );
    let metadata = MetadataMap::from_headers(request.headers().clone());
    set_parent_from_metadata(&span, &metadata);
    span
}

/// A tonic client interceptor that injects the current span's trace context into every
/// request: `Client::with_interceptor(channel, TraceContextInterceptor)`. It runs when the
/// call is issued, so issue calls inside the span that should be the parent.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceContextInterceptor;

impl tonic::service::Interceptor for TraceContextInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        inject_context(request.metadata_mut());
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use anyhow::{ensure, Result};
    use opentelemetry::trace::{TraceContextExt, TraceId, TracerProvider as _};
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tonic::service::Interceptor;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// Runs `f` under a subscriber with an OpenTelemetry layer (no exporter), so spans carry
    /// real trace ids without touching the process-wide subscriber.
    fn with_otel<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
        let provider = SdkTracerProvider::builder().build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, f)
    }

    fn trace_id(span: &Span) -> TraceId {
        span.context().span().span_context().trace_id()
    }

    #[test]
    fn inject_then_extract_round_trips_the_trace_id() -> Result<()> {
        with_otel(|| {
            let client = tracing::info_span!("client");
            let _entered = client.enter();
            let mut metadata = MetadataMap::new();
            inject_context(&mut metadata);
            let expected = trace_id(&client);
            ensure!(expected != TraceId::INVALID, "client span has no trace id");
            let traceparent = metadata.get("traceparent").and_then(|v| v.to_str().ok());
            ensure!(
                traceparent.is_some_and(|t| t.contains(&expected.to_string())),
                "traceparent {traceparent:?} lacks {expected}"
            );

            let remote = extract_context(&metadata);
            ensure!(remote.span().span_context().is_remote());
            ensure!(remote.span().span_context().trace_id() == expected);
            Ok(())
        })
    }

    #[test]
    fn server_span_joins_the_callers_trace() -> Result<()> {
        with_otel(|| {
            let client = tracing::info_span!("client");
            let request =
                client.in_scope(|| TraceContextInterceptor.call(tonic::Request::new(())))?;
            let mut http_request = http::Request::new(());
            *http_request.headers_mut() = request.metadata().clone().into_headers();
            let server = grpc_server_span(&http_request);
            ensure!(trace_id(&server) == trace_id(&client));

            let unrelated = grpc_server_span(&http::Request::new(()));
            ensure!(trace_id(&unrelated) != trace_id(&client));
            Ok(())
        })
    }

    #[test]
    fn missing_or_malformed_context_extracts_as_no_parent() {
        let mut metadata = MetadataMap::new();
        assert!(!extract_context(&metadata).span().span_context().is_valid());
        metadata.insert("traceparent", MetadataValue::from_static("00-garbage-01"));
        assert!(!extract_context(&metadata).span().span_context().is_valid());
    }
}
