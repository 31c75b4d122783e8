//! REAL workers in-process: `orchard_worker::server::run` on 127.0.0.1:0 with the default
//! model (or the simulated engine), readiness by polling gRPC health, and a `/metrics`
//! scraper for the worker's and router's Prometheus endpoints.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use orchard_common::config::WorkerConfig;
use orchard_proto::v1 as pb;
use orchard_proto::v1::worker_client::WorkerClient;
use orchard_worker::server::{self, ServerError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// How long a worker may take to load the model and warm up (a loaded 2-core CI machine).
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Poll interval for readiness and gauges.
pub const POLL: Duration = Duration::from_millis(10);

/// The default model; CI fetches it first, so a missing file is a failure, not a skip.
pub fn default_model() -> Result<std::path::PathBuf> {
    let path = orchard_worker::model::gguf::default_model_path();
    ensure!(
        path.is_file(),
        "default model {} missing (run deploy/fetch-model.sh)",
        path.display()
    );
    Ok(path)
}

/// A real-model worker config: the default model on one compute thread (two workers share
/// the two CI cores) and a 64 MB KV cache, with `/metrics` on `metrics`.
pub fn model_worker_config(id: &str, metrics: Option<SocketAddr>) -> Result<WorkerConfig> {
    let mut cfg = WorkerConfig {
        id: id.into(),
        ..WorkerConfig::default()
    };
    cfg.model.path = default_model()?;
    cfg.model.threads = Some(1);
    cfg.engine.kv_cache_mb = 64;
    cfg.telemetry.metrics_listen = metrics;
    Ok(cfg)
}

/// A free loopback address for a `/metrics` listener (bound, then released). The config
/// takes an address, not a listener, so this is the one place a port is picked up front;
/// the window in which another process could take it is a few microseconds.
pub async fn free_addr() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    Ok(listener.local_addr()?)
}

/// A real worker running in this process; shuts down when dropped.
pub struct RealWorker {
    pub id: String,
    pub addr: SocketAddr,
    pub channel: Channel,
    /// Where the worker serves `/metrics`, when configured.
    pub metrics: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl RealWorker {
    /// Binds 127.0.0.1:0, starts `server::run` with `config` and waits until it is SERVING.
    pub async fn serving(config: WorkerConfig) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let id = config.id.clone();
        let metrics = config.telemetry.metrics_listen;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(config, listener, async {
            let _ = rx.await;
        }));
        // Lazy: a worker whose start-up fails may close its listener before any connect.
        let channel = Channel::from_shared(format!("http://{addr}"))?.connect_lazy();
        let mut worker = Self {
            id,
            addr,
            channel,
            metrics,
            shutdown: Some(tx),
            task: Some(task),
        };
        worker.wait_serving().await?;
        Ok(worker)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn client(&self) -> WorkerClient<Channel> {
        WorkerClient::new(self.channel.clone())
    }

    /// Polls `grpc.health.v1.Health/Check` for `orchard.v1.Worker` until SERVING; fails with
    /// the worker's own error if `server::run` returned (e.g. the model is bad, or its
    /// `/metrics` address was taken), not with the refused connection that follows it.
    async fn wait_serving(&mut self) -> Result<()> {
        let mut health = HealthClient::new(self.channel.clone());
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if self.task.as_ref().is_some_and(JoinHandle::is_finished) {
                let outcome = match self.task.take() {
                    Some(task) => task.await,
                    None => bail!("worker {} has no task", self.id),
                };
                match outcome {
                    Ok(Ok(())) => bail!("worker {} exited during start-up", self.id),
                    Ok(Err(e)) => bail!("worker {} failed to start: {e}", self.id),
                    Err(e) => bail!("worker {} start-up task failed: {e}", self.id),
                }
            }
            let request = HealthCheckRequest {
                service: "orchard.v1.Worker".into(),
            };
            let checked = health.check(request).await;
            if Instant::now() > deadline {
                bail!(
                    "worker {} not SERVING after {READY_TIMEOUT:?}: {checked:?}",
                    self.id
                );
            }
            // A transport error is answered on the next turn: by the worker's own error if its
            // task has ended, else by another check.
            if let Ok(reply) = checked {
                if reply.into_inner().status == ServingStatus::Serving as i32 {
                    return Ok(());
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The worker's own load report (running, waiting, KV blocks in use).
    pub async fn load(&self) -> Result<pb::LoadReport> {
        let report = self.client().get_load(pb::GetLoadRequest {}).await?;
        Ok(report.into_inner())
    }

    /// Stops the worker through its shutdown signal and waits until `server::run` returned
    /// (tonic's graceful shutdown: open streams finish first, then the listener is closed).
    pub async fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await??;
        }
        Ok(())
    }

    /// The worker's `/metrics` text.
    pub async fn scrape(&self) -> Result<String> {
        scrape(self.metrics.context("worker started without /metrics")?).await
    }
}

impl Drop for RealWorker {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// `GET /metrics` on `addr` over a plain HTTP/1.1 connection; the body on 200.
pub async fn scrape(addr: SocketAddr) -> Result<String> {
    let mut conn = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to /metrics on {addr}"))?;
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    conn.read_to_string(&mut response).await?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "GET /metrics: {head}");
    Ok(body.to_string())
}

/// Polls `/metrics` on `addr` until it answers (the server binds it during start-up).
pub async fn wait_scrape(addr: SocketAddr) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match scrape(addr).await {
            Ok(text) => return Ok(text),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// The value of the sample whose series (name and labels, exactly as exposed) is `series`.
pub fn sample(text: &str, series: &str) -> Result<f64> {
    orchard_common::metrics::sample_value(text, series)
        .with_context(|| format!("no sample `{series}` in:\n{text}"))
}

/// A TCP relay in front of a worker that the test can sever, closing every connection through
/// it at once: what the router sees when a worker's host dies mid-stream. (An in-process
/// worker cannot be killed that way: its shutdown is graceful and lets open streams finish.)
pub struct Severable {
    pub addr: SocketAddr,
    cut: tokio::sync::watch::Sender<bool>,
}

impl Severable {
    /// Relays 127.0.0.1:0 to `upstream` until [`Severable::sever`].
    pub async fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (cut, _) = tokio::sync::watch::channel(false);
        let severed = cut.subscribe();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut severed = severed.clone();
                if *severed.borrow() {
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = severed.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Ok(Self { addr, cut })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes every relayed connection and refuses new ones.
    pub fn sever(&self) {
        self.cut.send_replace(true);
    }
}
