//! One request is one trace across router and worker: the client's W3C `traceparent` is
//! honoured by the router, the router's WorkerLink clients carry the context to the worker,
//! and the worker's request span (with the engine's queue / prefill / decode phases as child
//! spans) joins it. Spans are collected in memory through the real `tracing` ->
//! OpenTelemetry pipeline; this binary holds this one test because it installs the
//! process-wide subscriber and tracer provider.

mod common;

use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{ensure, Context, Result};
use common::real::RealWorker;
use common::{
    prompt_request, router_config_over, spawn_router, wait_healthy, wait_until, TestRouter,
};
use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry::Value;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use orchard_common::config::PolicyConfig;
use orchard_worker::sim::test_worker_config;
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Every span ended so far (a simple exporter hands each over as it ends).
#[derive(Debug, Clone, Default)]
struct Collected(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Collected {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(batch);
        Ok(())
    }
}

impl Collected {
    /// The ended spans of `trace` named `name`.
    fn named(&self, trace: TraceId, name: &str) -> Vec<SpanData> {
        let spans = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        spans
            .iter()
            .filter(|s| s.span_context.trace_id() == trace && s.name == name)
            .cloned()
            .collect()
    }

    /// The one ended span of `trace` named `name`.
    fn one(&self, trace: TraceId, name: &str) -> Result<SpanData> {
        let mut found = self.named(trace, name);
        ensure!(
            found.len() == 1,
            "{} `{name}` spans in trace {trace}",
            found.len()
        );
        found.pop().context("checked above")
    }

    /// The trace of the `router.generate` span for request `id`.
    fn trace_of_request(&self, id: &str) -> Option<TraceId> {
        let spans = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        spans
            .iter()
            .find(|s| {
                s.name == "router.generate"
                    && attribute(s, "request_id") == Some(Value::from(id.to_string()))
            })
            .map(|s| s.span_context.trace_id())
    }
}

fn attribute(span: &SpanData, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.clone())
}

fn span_id(span: &SpanData) -> SpanId {
    span.span_context.span_id()
}

/// Installs `tracing` -> OpenTelemetry for Orchard's own crates, exporting into `spans`.
fn install(spans: &Collected) -> Result<()> {
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(spans.clone())
        .build();
    // The worker's engine phases are recorded through the global tracer (as in production).
    opentelemetry::global::set_tracer_provider(provider.clone());
    let targets = Targets::new()
        .with_target("orchard_router", Level::INFO)
        .with_target("orchard_worker", Level::INFO)
        .with_target("orchard_common", Level::INFO);
    tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
        .with(targets)
        .try_init()?;
    Ok(())
}

/// Sends a greedy request with id `id` (and `traceparent`, when given) and reads it to the end.
async fn send(router: &TestRouter, id: &str, traceparent: Option<&str>) -> Result<()> {
    let mut request = tonic::Request::new(orchard_proto::v1::GenerateRequest {
        request_id: id.into(),
        ..prompt_request("hello trace", 4)
    });
    if let Some(tp) = traceparent {
        request.metadata_mut().insert("traceparent", tp.parse()?);
    }
    let mut stream = router.orchard.clone().generate(request).await?.into_inner();
    let mut finished = false;
    while let Some(msg) = stream.message().await? {
        finished |= msg.r#final.is_some();
    }
    ensure!(finished, "request {id} ended without a final message");
    Ok(())
}

/// Checks that `trace` holds router.generate -> worker.generate -> engine phases, linked by
/// parent ids, and returns the router span.
fn check_router_to_worker(spans: &Collected, trace: TraceId, id: &str) -> Result<SpanData> {
    let router = spans.one(trace, "router.generate")?;
    let worker = spans.one(trace, "worker.generate")?;
    ensure!(
        worker.parent_span_id == span_id(&router) && worker.parent_span_is_remote,
        "worker span's parent {} is not the router span {} (remote)",
        worker.parent_span_id,
        span_id(&router)
    );
    ensure!(attribute(&worker, "request_id") == Some(id.to_string().into()));
    for key in ["queue_s", "prefill_s", "ttft_s", "decode_s", "e2e_s"] {
        ensure!(
            attribute(&worker, key).is_some(),
            "worker span lacks `{key}`"
        );
    }
    let mut previous_end = None;
    for phase in ["engine.queue", "engine.prefill", "engine.decode"] {
        let span = spans.one(trace, phase)?;
        ensure!(
            span.parent_span_id == span_id(&worker),
            "{phase} is not a child of worker.generate"
        );
        ensure!(
            span.start_time <= span.end_time,
            "{phase} ends before it starts"
        );
        if let Some(end) = previous_end {
            ensure!(
                span.start_time >= end,
                "{phase} starts before the previous phase ended"
            );
        }
        previous_end = Some(span.end_time);
    }
    Ok(router)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_one_trace_from_client_through_router_to_worker_phases() -> Result<()> {
    let spans = Collected::default();
    install(&spans)?;
    let worker = RealWorker::serving(test_worker_config("sim-trace")).await?;
    let list = [(worker.id.as_str(), worker.url())];
    let router = spawn_router(router_config_over(&list, PolicyConfig::RoundRobin)).await?;
    wait_healthy(&router, 1).await?;

    // A client that sends a trace context: everything joins the client's trace.
    let client_trace = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736")?;
    let client_span = SpanId::from_hex("00f067aa0ba902b7")?;
    let traceparent = format!("00-{client_trace}-{client_span}-01");
    send(&router, "traced", Some(&traceparent)).await?;
    // Spans end when the relay task and the worker's stream are dropped, just after the
    // client saw the end of the stream.
    wait_until("the traced request's spans are exported", || async {
        Ok(spans.named(client_trace, "engine.decode").len() == 1
            && spans.named(client_trace, "router.generate").len() == 1)
    })
    .await?;
    let router_span = check_router_to_worker(&spans, client_trace, "traced")?;
    // The router's per-call `grpc.server` span is named after the RPC (`otel.name`); it ends
    // when tonic is done with the response.
    let rpc = "/orchard.v1.Orchard/Generate";
    wait_until("the router's gRPC span is exported", || async {
        Ok(spans.named(client_trace, rpc).len() == 1)
    })
    .await?;
    let server = spans.one(client_trace, rpc)?;
    ensure!(
        server.parent_span_id == client_span && server.parent_span_is_remote,
        "the router's gRPC span is not the client's child"
    );
    ensure!(router_span.parent_span_id == span_id(&server));

    // A client without one: the router starts the trace and still carries it to the worker.
    send(&router, "untraced", None).await?;
    wait_until("the untraced request's router span is exported", || async {
        Ok(spans.trace_of_request("untraced").is_some())
    })
    .await?;
    let trace = spans
        .trace_of_request("untraced")
        .context("checked above")?;
    ensure!(
        trace != client_trace,
        "a new request reused the client's trace"
    );
    wait_until(
        "the untraced request's worker spans are exported",
        || async { Ok(spans.named(trace, "engine.decode").len() == 1) },
    )
    .await?;
    check_router_to_worker(&spans, trace, "untraced")?;
    Ok(())
}
