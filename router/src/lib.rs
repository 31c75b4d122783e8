//! Orchard router: public gRPC (and OpenAI-style HTTP) fronts over a RouterActor that
//! balances requests across workers with a pluggable policy, health-checked by one
//! WorkerLink actor per worker.
//!
//! Embedding: [`Router::start`] builds the actors and gives out the services (the HTTP front
//! calls [`OrchardService`] in-process); [`run`] serves everything on a listener until
//! `shutdown` resolves (tests bind `127.0.0.1:0` and call it directly).

pub mod actors;
pub mod error;
pub mod http;
pub mod policy;
pub mod service;

use std::future::Future;
use std::sync::Arc;

use orchard_common::config::{PolicyConfig, RouterConfig};
use orchard_common::metrics::{Registry, RouterMetrics};
use orchard_proto::v1::admin_server::AdminServer;
use orchard_proto::v1::orchard_server::OrchardServer;
use ractor::{Actor, ActorRef};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

pub use actors::RouterHandle;
pub use error::RouterError;
pub use service::{AdminService, OrchardService};

use actors::{PromptTokens, RouterActor, RouterArgs, RouterMsg, RouterSettings};

/// A running RouterActor (with its WorkerLinks) and the services built on it.
pub struct Router {
    actor: ActorRef<RouterMsg>,
    join: JoinHandle<()>,
    handle: RouterHandle,
    max_retries: u32,
    /// This router's Prometheus registry (one per process, never the global default, so
    /// in-process tests with several routers do not collide).
    registry: Registry,
    metrics: Arc<RouterMetrics>,
}

impl Router {
    /// Starts the RouterActor and one WorkerLink per static worker of `config`.
    pub async fn start(config: &RouterConfig) -> Result<Self, RouterError> {
        let actor = RouterActor {
            settings: RouterSettings {
                max_in_flight_per_worker: config.max_in_flight_per_worker,
                max_lease: config.max_lease,
                health: config.health.clone(),
            },
        };
        let args = RouterArgs {
            workers: config.workers.clone(),
            policy: config.policy.clone(),
        };
        let (actor, join) = Actor::spawn(None, actor, args).await?;
        let prompt_tokens = match config.policy {
            PolicyConfig::PrefixAffinity { .. } => PromptTokens::Needed,
            _ => PromptTokens::NotNeeded,
        };
        let handle = RouterHandle::new(actor.clone(), prompt_tokens);
        let registry = Registry::new();
        let metrics = Arc::new(RouterMetrics::new(&registry)?);
        Ok(Self {
            actor,
            join,
            handle,
            max_retries: config.max_retries,
            registry,
            metrics,
        })
    }

    /// The handle the services use; also useful to embedders that route themselves.
    pub fn handle(&self) -> RouterHandle {
        self.handle.clone()
    }

    /// The public generation service, to serve over gRPC or call in-process.
    pub fn orchard_service(&self) -> OrchardService {
        OrchardService::new(self.handle.clone(), self.max_retries, self.metrics.clone())
    }

    /// The Prometheus registry the router's metrics live in (served on `/metrics`).
    pub fn registry(&self) -> Registry {
        self.registry.clone()
    }

    /// The operator service.
    pub fn admin_service(&self) -> AdminService {
        AdminService::new(self.handle.clone())
    }

    /// Stops the RouterActor (which stops its links) and waits for it.
    pub async fn stop(self) {
        self.actor.stop(None);
        if let Err(e) = self.join.await {
            tracing::warn!(error = %e, "router actor ended abnormally");
        }
    }
}

/// Serves Orchard, Admin, grpc.health.v1 and server reflection (v1 and v1alpha) on
/// `listener` until `shutdown` resolves; also the OpenAI-compatible HTTP front on
/// `config.http_listen` and Prometheus `/metrics` on `config.telemetry.metrics_listen` when
/// they are set. Every server stops on the same `shutdown`.
pub async fn run(
    config: RouterConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RouterError> {
    let router = Router::start(&config).await?;
    let stop = Shutdown::spawn(shutdown);
    let side_servers = start_side_servers(&config, &router, &stop).await?;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<OrchardServer<OrchardService>>()
        .await;
    health_reporter
        .set_serving::<AdminServer<AdminService>>()
        .await;
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    tracing::info!(addr = %listener.local_addr()?, "router serving gRPC");
    let served = tonic::transport::Server::builder()
        // One span per call, joined to the caller's trace when it sent a `traceparent`.
        .trace_fn(orchard_common::telemetry::grpc_server_span)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(OrchardServer::new(router.orchard_service()))
        .add_service(AdminServer::new(router.admin_service()))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop.wait())
        .await;
    for server in side_servers {
        if let Err(e) = server.await {
            tracing::warn!(error = %e, "HTTP server task ended abnormally");
        }
    }
    router.stop().await;
    Ok(served?)
}

/// One shutdown signal shared by the gRPC, HTTP and metrics servers.
#[derive(Clone)]
struct Shutdown(tokio::sync::watch::Receiver<bool>);

impl Shutdown {
    fn spawn(signal: impl Future<Output = ()> + Send + 'static) -> Self {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            signal.await;
            let _ = tx.send(true);
        });
        Self(rx)
    }

    fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.0.clone();
        async move {
            // An error means the sender is gone, which also means "stop".
            let _ = rx.wait_for(|stopped| *stopped).await;
        }
    }
}

/// Binds and starts the HTTP front and the metrics endpoint when configured.
async fn start_side_servers(
    config: &RouterConfig,
    router: &Router,
    stop: &Shutdown,
) -> Result<Vec<JoinHandle<()>>, RouterError> {
    let mut servers = Vec::new();
    if let Some(addr) = config.http_listen {
        let listener = TcpListener::bind(addr).await?;
        tracing::info!(addr = %listener.local_addr()?, "router serving OpenAI-compatible HTTP");
        let app = http::app_with_admin(
            Arc::new(router.orchard_service()),
            Arc::new(router.admin_service()),
            http::HttpOptions::from_config(config),
        );
        let wait = stop.wait();
        servers.push(tokio::spawn(async move {
            if let Err(e) = http::serve(listener, app, wait).await {
                tracing::error!(error = %e, "HTTP front stopped");
            }
        }));
    }
    if let Some(addr) = config.telemetry.metrics_listen {
        let listener = TcpListener::bind(addr).await?;
        tracing::info!(addr = %listener.local_addr()?, "router serving /metrics");
        let scrape = MetricsScrape {
            registry: router.registry(),
            metrics: router.metrics.clone(),
            router: router.handle(),
            known: Arc::default(),
        };
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let scrape = scrape.clone();
                async move { scrape.render().await }
            }),
        );
        let wait = stop.wait();
        servers.push(tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(wait)
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "metrics endpoint stopped");
            }
        }));
    }
    Ok(servers)
}

/// What `/metrics` needs: the registry, plus the registry of workers to publish their state
/// and in-flight gauges as of the scrape (and to drop the series of workers that left).
#[derive(Clone)]
struct MetricsScrape {
    registry: Registry,
    metrics: Arc<RouterMetrics>,
    router: RouterHandle,
    known: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl MetricsScrape {
    async fn render(&self) -> (axum::http::StatusCode, String) {
        match self.router.list_workers().await {
            Ok(workers) => self.publish(&workers),
            Err(e) => tracing::warn!(error = %e, "listing workers for /metrics"),
        }
        match orchard_common::metrics::render(&self.registry) {
            Ok(text) => (axum::http::StatusCode::OK, text),
            Err(e) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }

    fn publish(&self, workers: &[orchard_proto::v1::WorkerStatus]) {
        use orchard_common::metrics::WorkerState;
        use orchard_proto::v1::WorkerState as Pb;
        let mut known = self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now: std::collections::HashSet<String> = workers.iter().map(|w| w.id.clone()).collect();
        for gone in known.difference(&now) {
            self.metrics.forget_worker(gone);
        }
        for w in workers {
            let state = match w.state() {
                Pb::Healthy => WorkerState::Healthy,
                Pb::Draining => WorkerState::Draining,
                Pb::Unhealthy | Pb::Connecting | Pb::Unspecified => WorkerState::Unhealthy,
            };
            self.metrics.set_worker_state(&w.id, state);
            self.metrics.set_in_flight(&w.id, w.in_flight);
        }
        *known = now;
    }
}

/// Reflection over Orchard's protos and grpc.health.v1, so grpcurl and generic clients can
/// discover every service.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(orchard_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}
