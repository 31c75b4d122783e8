//! The worker process: serves `orchard.v1.Worker`, `grpc.health.v1.Health` and gRPC reflection
//! (v1 and v1alpha) on one listener, loads the engine, and registers with a router when
//! configured.
//!
//! [`run`] takes an already bound listener and a shutdown future (mini-redis style), so tests
//! bind `127.0.0.1:0`, start a worker in-process and poll its health instead of sleeping.
//! Health is `NOT_SERVING` until the engine is loaded and has finished one short warm-up
//! generation; the model loads on a blocking thread, so health answers meanwhile.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use orchard_common::config::{EngineKind, WorkerConfig};
use orchard_common::metrics::{MetricsError, Registry, WorkerMetrics};
use orchard_common::{OrchardError, SamplingParams};
use orchard_proto::v1::worker_server::WorkerServer;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::engine::{self, EngineError, EngineEvent, EngineHandle, EngineParts, EngineRequest};
use crate::registration::{self, Announcement};
use crate::service::convert::ChatSupport;
use crate::service::{LoadedEngine, WorkerService};
use crate::sim;
use crate::text::chat_template::Message;
use crate::text::frontend::TextFrontend;

/// Why the worker could not start or keep serving.
#[derive(Debug, Error)]
pub enum ServerError {
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
    #[error("warm-up generation failed: {0}")]
    Warmup(OrchardError),
    #[error("the engine loader thread failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("registering metrics: {0}")]
    Metrics(#[from] MetricsError),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// gRPC service name whose health tracks the engine (besides the server-wide `""`).
const WORKER_SERVICE: &str = "orchard.v1.Worker";
/// The warm-up request's id, prompt and length.
const WARMUP_ID: &str = "warmup";
const WARMUP_TEXT: &str = "Hello";
const WARMUP_TOKENS: u32 = 2;

/// Serves a worker on `listener` until `shutdown` resolves (or the engine fails to start).
pub async fn run(
    config: WorkerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let local = listener.local_addr()?;
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;
    let registry = Registry::new();
    let metrics = Arc::new(WorkerMetrics::new(&registry, &config.id)?);
    let service = WorkerService::new(&config.id, metrics);
    let metrics_server = match config.telemetry.metrics_listen {
        Some(addr) => Some(serve_metrics(addr, registry, service.clone()).await?),
        None => None,
    };
    let (failed_tx, failed_rx) = oneshot::channel();
    let startup = tokio::spawn(start(Startup {
        config,
        service: service.clone(),
        health: health.clone(),
        local,
        failed: failed_tx,
    }));
    let served = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(WorkerServer::new(service))
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(listener),
            stop_signal(shutdown, failed_rx, health),
        )
        .await;
    let started = startup_outcome(startup).await;
    if let Some(task) = metrics_server {
        task.abort();
    }
    served?;
    started
}

/// Serves Prometheus `/metrics` on `addr`, refreshing the engine gauges at each scrape; the
/// task is aborted when the gRPC server stops.
async fn serve_metrics(
    addr: SocketAddr,
    registry: Registry,
    service: WorkerService,
) -> Result<JoinHandle<()>, ServerError> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "worker serving /metrics");
    let scrape = move || {
        let (registry, service) = (registry.clone(), service.clone());
        async move {
            service.refresh_load_metrics();
            match orchard_common::metrics::render(&registry) {
                Ok(text) => (axum::http::StatusCode::OK, text),
                Err(e) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
    };
    let app = axum::Router::new().route("/metrics", axum::routing::get(scrape));
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    }))
}

/// Reflection over every service this server hosts (Orchard's and gRPC health).
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(orchard_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// Resolves on `shutdown` or when start-up failed; marks the worker NOT_SERVING first so
/// routers stop sending it requests while in-flight ones finish.
async fn stop_signal(
    shutdown: impl Future<Output = ()>,
    failed: oneshot::Receiver<()>,
    health: HealthReporter,
) {
    let failed = async {
        if failed.await.is_err() {
            // Start-up finished without failing: only `shutdown` stops the server.
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = shutdown => tracing::info!("shutting down"),
        () = failed => tracing::error!("engine start-up failed; stopping the server"),
    }
    set_health(&health, ServingStatus::NotServing).await;
}

/// The start-up task's error, if it failed; a task still running (loading, or keeping a
/// registration alive) is stopped.
async fn startup_outcome(startup: JoinHandle<Result<(), ServerError>>) -> Result<(), ServerError> {
    if !startup.is_finished() {
        startup.abort();
        return Ok(());
    }
    startup.await?
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health.set_service_status(WORKER_SERVICE, status).await;
}

/// What the start-up task needs.
struct Startup {
    config: WorkerConfig,
    service: WorkerService,
    health: HealthReporter,
    local: SocketAddr,
    /// Signalled when start-up fails, to stop the server.
    failed: oneshot::Sender<()>,
}

/// Loads and warms up the engine, flips health to SERVING, then keeps the router registration
/// alive (when configured) for as long as the server runs.
async fn start(ctx: Startup) -> Result<(), ServerError> {
    let loaded = match load_and_warm_up(&ctx.config).await {
        Ok(loaded) => loaded,
        Err(err) => {
            tracing::error!(error = %err, "engine start-up failed");
            let _ = ctx.failed.send(());
            return Err(err);
        }
    };
    let info = loaded.engine.info().clone();
    if ctx.service.install(loaded).is_err() {
        tracing::warn!("an engine was already installed; keeping it");
    }
    set_health(&ctx.health, ServingStatus::Serving).await;
    tracing::info!(
        worker_id = %ctx.config.id,
        model = %info.model_name,
        kv_blocks = info.num_kv_blocks,
        kv_cache_dtype = ctx.config.engine.kv_cache_dtype.name(),
        max_model_len = info.max_model_len,
        "worker serving"
    );
    if let Some(reg) = ctx.config.registration.clone() {
        let address = reg
            .advertise
            .clone()
            .unwrap_or_else(|| advertised(ctx.local));
        let me = Announcement {
            id: ctx.config.id.clone(),
            address,
            weight: ctx.config.weight,
        };
        registration::run(reg, me).await;
    }
    Ok(())
}

/// `http://<listen address>`; an unspecified IP (0.0.0.0) cannot be dialled, so say so.
fn advertised(local: SocketAddr) -> String {
    if local.ip().is_unspecified() {
        tracing::warn!(%local, "listening on an unspecified address; set registration.advertise");
    }
    format!("http://{local}")
}

async fn load_and_warm_up(config: &WorkerConfig) -> Result<LoadedEngine, ServerError> {
    let cfg = config.clone();
    let (parts, frontend) = tokio::task::spawn_blocking(move || build_engine(&cfg)).await??;
    let engine = EngineHandle::spawn(parts)?;
    let chat = chat_support(&frontend);
    warm_up(&engine, &frontend, chat).await?;
    Ok(LoadedEngine {
        engine,
        frontend,
        chat,
    })
}

/// The real model or the simulated engine, as `engine_kind` says.
fn build_engine(cfg: &WorkerConfig) -> Result<(EngineParts, TextFrontend), EngineError> {
    match cfg.engine_kind {
        EngineKind::Model => engine::load_model(cfg),
        EngineKind::Simulated => sim::simulated_engine(cfg),
    }
}

fn greeting() -> Vec<Message> {
    vec![Message {
        role: "user".into(),
        content: WARMUP_TEXT.into(),
    }]
}

/// Whether the model has a usable chat template (rendering a greeting succeeds).
fn chat_support(frontend: &TextFrontend) -> ChatSupport {
    match frontend.encode_chat(&greeting()) {
        Ok(_) => ChatSupport::Template,
        Err(_) => ChatSupport::None,
    }
}

/// One short greedy generation through the whole engine path, so the first client request
/// does not pay for lazy initialisation and a broken engine never reports SERVING.
async fn warm_up(
    engine: &EngineHandle,
    frontend: &TextFrontend,
    chat: ChatSupport,
) -> Result<(), ServerError> {
    let prompt = match chat {
        ChatSupport::Template => frontend.encode_chat(&greeting())?,
        ChatSupport::None => frontend.encode_prompt(WARMUP_TEXT)?,
    };
    let (events, mut receiver) = mpsc::unbounded_channel();
    engine
        .submit(EngineRequest {
            id: WARMUP_ID.into(),
            prompt_token_ids: prompt,
            params: SamplingParams {
                ignore_eos: true,
                ..SamplingParams::greedy(WARMUP_TOKENS)
            },
            arrival: std::time::Instant::now(),
            events,
        })
        .map_err(ServerError::Warmup)?;
    while let Some(event) = receiver.recv().await {
        match event {
            EngineEvent::Tokens(_) => {}
            EngineEvent::Finished(_) => return Ok(()),
            EngineEvent::Failed(err) => return Err(ServerError::Warmup(err)),
        }
    }
    Err(ServerError::Warmup(OrchardError::unavailable(
        "the engine stopped during warm-up",
    )))
}

/// Resolves on Ctrl-C or (on Unix) SIGTERM, the signals service managers send to stop a worker.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
