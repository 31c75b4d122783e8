//! `telemetry::init` against a real OTLP/gRPC endpoint: an in-process collector built from
//! the OpenTelemetry protocol's own service definition receives the spans, with the service
//! name, once the guard is dropped. This binary installs the global subscriber, so it holds
//! only the tests that may share one.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use orchard_common::config::TelemetryConfig;
use orchard_common::telemetry::{init, Installation, TelemetryError};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::TcpListenerStream;

/// Forwards every export request it receives to the test.
struct Collector(mpsc::UnboundedSender<ExportTraceServiceRequest>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let _ = self.0.send(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn service_name(request: &ExportTraceServiceRequest) -> Option<String> {
    request
        .resource_spans
        .iter()
        .filter_map(|rs| rs.resource.as_ref())
        .flat_map(|r| &r.attributes)
        .find(|kv| kv.key == "service.name")
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            _ => None,
        })
}

fn span_names(request: &ExportTraceServiceRequest) -> Vec<String> {
    request
        .resource_spans
        .iter()
        .flat_map(|rs| &rs.scope_spans)
        .flat_map(|ss| &ss.spans)
        .map(|s| s.name.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_the_otlp_collector_and_a_second_init_is_a_no_op() -> Result<()> {
    let (tx, mut received) = mpsc::unbounded_channel();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(tx)))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let config = TelemetryConfig {
        otlp_endpoint: Some(format!("http://{addr}")),
        ..TelemetryConfig::default()
    };
    let guard = init(&config, "orchard-otlp-test")?;
    ensure!(guard.installation() == Installation::Installed);
    ensure!(guard.exports_traces());
    tracing::info_span!("generate", request_id = "r-1").in_scope(|| {
        tracing::info!("one request");
    });

    let second = init(&TelemetryConfig::default(), "again")?;
    ensure!(second.installation() == Installation::AlreadyInstalled);
    ensure!(!second.exports_traces());

    // Dropping the guard flushes the batch; it blocks, so keep it off the runtime's threads.
    tokio::task::spawn_blocking(move || drop(guard)).await?;
    let mut names = Vec::new();
    while let Ok(Some(request)) =
        tokio::time::timeout(Duration::from_secs(10), received.recv()).await
    {
        ensure!(service_name(&request).as_deref() == Some("orchard-otlp-test"));
        names.extend(span_names(&request));
        if names.iter().any(|n| n == "generate") {
            return Ok(());
        }
    }
    anyhow::bail!("collector never received the `generate` span; got {names:?}")
}

#[test]
fn otlp_outside_a_runtime_is_an_error_not_a_panic() -> Result<()> {
    let config = TelemetryConfig {
        otlp_endpoint: Some("http://127.0.0.1:4317".into()),
        ..TelemetryConfig::default()
    };
    let result = init(&config, "no-runtime");
    ensure!(
        matches!(result, Err(TelemetryError::NoRuntime)),
        "expected NoRuntime, got {:?}",
        result.as_ref().map(|g| g.installation())
    );
    Ok(())
}

#[test]
fn a_bad_log_level_names_the_key() -> Result<()> {
    let config = TelemetryConfig {
        log_level: "info,[[bad".into(),
        ..TelemetryConfig::default()
    };
    let err = init(&config, "bad-level")
        .err()
        .context("bad filter accepted")?;
    ensure!(err.to_string().contains("telemetry.log_level"), "{err}");
    Ok(())
}
