//! Process-wide telemetry set-up: structured logs through `tracing`, and OpenTelemetry traces
//! exported over OTLP/gRPC when an endpoint is configured; plus W3C trace-context propagation
//! over gRPC metadata ([`propagation`]) so one request is one trace across router and worker.
//!
//! Call [`init`] once at the start of `main`, inside a multi-threaded tokio runtime (the OTLP
//! exporter talks gRPC through tonic, driven by the runtime while a background thread batches
//! spans), and keep the returned [`TelemetryGuard`] alive until the end of `main`; dropping it
//! flushes the spans still buffered, so drop it before the runtime shuts down.

pub mod propagation;

pub use propagation::{
    extract_context, grpc_server_span, inject_context, inject_context_from, record_child_span,
    set_parent_from_metadata, TraceContextInterceptor,
};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use thiserror::Error;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

use crate::config::{LogFormat, TelemetryConfig};

/// Why telemetry could not be set up; start-up should fail loudly rather than run blind.
#[derive(Debug, Error)]
pub enum TelemetryError {
    /// `telemetry.log_level` is not a valid `tracing` filter directive.
    #[error("telemetry.log_level: {0}")]
    LogLevel(#[from] tracing_subscriber::filter::ParseError),
    /// The OTLP exporter could not be built (e.g. a malformed `telemetry.otlp_endpoint`).
    #[error("telemetry.otlp_endpoint: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// OTLP export was configured but `init` ran outside a tokio runtime, which the gRPC
    /// exporter needs for its connection.
    #[error("telemetry.otlp_endpoint is set but init ran outside a tokio runtime")]
    NoRuntime,
}

/// Keeps the trace pipeline alive; dropping it flushes and shuts down the OTLP exporter.
#[must_use = "dropping the guard at once shuts the trace exporter down"]
pub struct TelemetryGuard {
    /// `Some` only when this guard installed an OTLP pipeline.
    provider: Option<SdkTracerProvider>,
    installation: Installation,
}

/// Whether [`init`] installed the process-wide subscriber or found one already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installation {
    /// This call installed the subscriber (and the OTLP pipeline, if configured).
    Installed,
    /// A subscriber was already installed (a second `init`, or a test harness); nothing changed.
    AlreadyInstalled,
}

impl TelemetryGuard {
    /// Whether this guard's [`init`] call installed the subscriber.
    pub fn installation(&self) -> Installation {
        self.installation
    }

    /// Whether spans are being exported over OTLP by this guard's pipeline.
    pub fn exports_traces(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.shutdown() {
                // The subscriber may already be gone at exit; stderr always works.
                eprintln!("telemetry: flushing OTLP spans failed: {e}");
            }
        }
    }
}

/// Installs the global `tracing` subscriber for `service_name`: an env filter from
/// `config.log_level`, text or JSON logs on stderr per `config.log_format`, and, only when
/// `config.otlp_endpoint` is set, an OpenTelemetry layer exporting spans over OTLP/gRPC with
/// the W3C trace-context propagator registered globally. A second call (or a call after a
/// test harness installed a subscriber) changes nothing and returns a guard whose
/// [`TelemetryGuard::installation`] is [`Installation::AlreadyInstalled`].
pub fn init(
    config: &TelemetryConfig,
    service_name: &str,
) -> Result<TelemetryGuard, TelemetryError> {
    let filter = EnvFilter::try_new(&config.log_level)?;
    let provider = config
        .otlp_endpoint
        .as_deref()
        .map(|endpoint| otlp_provider(endpoint, service_name))
        .transpose()?;
    let otel_layer = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service_name.to_owned())));
    let log_layer = match config.log_format {
        LogFormat::Text => fmt::layer().with_writer(std::io::stderr).boxed(),
        LogFormat::Json => fmt::layer().json().with_writer(std::io::stderr).boxed(),
    };
    let installed = tracing_subscriber::registry()
        .with(otel_layer)
        .with(log_layer)
        .with(filter)
        .try_init();
    if installed.is_err() {
        if let Some(unused) = provider {
            // Never exported anything; shut its batch thread down quietly.
            let _ = unused.shutdown();
        }
        return Ok(TelemetryGuard {
            provider: None,
            installation: Installation::AlreadyInstalled,
        });
    }
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    if let Some(p) = &provider {
        opentelemetry::global::set_tracer_provider(p.clone());
    }
    Ok(TelemetryGuard {
        provider,
        installation: Installation::Installed,
    })
}

/// A tracer provider batching spans to the OTLP/gRPC collector at `endpoint`.
fn otlp_provider(endpoint: &str, service_name: &str) -> Result<SdkTracerProvider, TelemetryError> {
    // tonic's lazy channel spawns its connection task on the current runtime (and panics
    // without one), so check first.
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(TelemetryError::NoRuntime);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()?;
    let resource = Resource::builder()
        .with_service_name(service_name.to_owned())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}
