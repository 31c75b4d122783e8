//! Fixtures: an in-process worker on 127.0.0.1:0, clients, and readiness polling.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use orchard_common::config::WorkerConfig;
use orchard_proto::v1 as pb;
use orchard_proto::v1::worker_client::WorkerClient;
use orchard_worker::server::{self, ServerError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// How long a test waits for a worker to report SERVING.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Poll interval for readiness and gauges.
pub const POLL: Duration = Duration::from_millis(10);

/// A worker running in this process; shuts down when dropped.
pub struct TestWorker {
    pub addr: SocketAddr,
    pub channel: Channel,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl TestWorker {
    /// Binds 127.0.0.1:0 and starts `server::run` with `config`.
    pub async fn start(config: WorkerConfig) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(config, listener, async {
            let _ = rx.await;
        }));
        // Lazy: a worker whose start-up fails may close its listener before any connect.
        let channel = Channel::from_shared(format!("http://{addr}"))?.connect_lazy();
        Ok(Self {
            addr,
            channel,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    /// Starts a worker and waits until its health check says SERVING.
    pub async fn serving(config: WorkerConfig) -> Result<Self> {
        let worker = Self::start(config).await?;
        worker.wait_serving().await?;
        Ok(worker)
    }

    pub fn client(&self) -> WorkerClient<Channel> {
        WorkerClient::new(self.channel.clone())
    }

    /// Polls `grpc.health.v1.Health/Check` for `orchard.v1.Worker` until SERVING.
    pub async fn wait_serving(&self) -> Result<()> {
        let mut health = HealthClient::new(self.channel.clone());
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let status = health
                .check(HealthCheckRequest {
                    service: "orchard.v1.Worker".into(),
                })
                .await?
                .into_inner()
                .status;
            if status == ServingStatus::Serving as i32 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("worker not SERVING after {READY_TIMEOUT:?} (status {status})");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits (without asking for shutdown) until `server::run` returns on its own.
    pub async fn exited(mut self) -> Result<(), ServerError> {
        match self.task.take() {
            Some(task) => task.await.map_err(ServerError::from)?,
            None => Ok(()),
        }
    }

    /// Triggers shutdown and returns what `server::run` returned.
    pub async fn stop(mut self) -> Result<(), ServerError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(task) => task.await.map_err(ServerError::from)?,
            None => Ok(()),
        }
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A greedy request for `prompt` that runs to `max_tokens`.
pub fn prompt_request(prompt: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Prompt(prompt.into())),
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.0),
            max_tokens: Some(max_tokens),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A greedy chat request with one user message.
pub fn chat_request(content: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Chat(pb::ChatMessages {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: content.into(),
            }],
        })),
        ..prompt_request("", max_tokens)
    }
}

/// Every message of a Generate stream, in order; fails on an error status.
pub async fn generate_all(
    client: &mut WorkerClient<Channel>,
    request: pb::GenerateRequest,
) -> Result<Vec<pb::GenerateResponse>> {
    let mut stream = client.generate(request).await?.into_inner();
    let mut out = Vec::new();
    while let Some(msg) = stream.message().await? {
        out.push(msg);
    }
    Ok(out)
}

/// The streamed token ids and the final info of a finished stream.
pub fn tokens_and_final(msgs: &[pb::GenerateResponse]) -> Result<(Vec<u32>, pb::FinalInfo)> {
    let tokens = msgs.iter().flat_map(|m| m.token_ids.clone()).collect();
    let last = msgs.last().context("empty stream")?;
    let info = last
        .r#final
        .clone()
        .context("last message has no final info")?;
    Ok((tokens, info))
}

/// Polls `GetLoad` until `done` holds or `timeout` passes; returns the last report.
pub async fn poll_load(
    client: &mut WorkerClient<Channel>,
    timeout: Duration,
    done: impl Fn(&pb::LoadReport) -> bool,
) -> Result<pb::LoadReport> {
    let deadline = Instant::now() + timeout;
    loop {
        let load = client.get_load(pb::GetLoadRequest {}).await?.into_inner();
        if done(&load) || Instant::now() > deadline {
            return Ok(load);
        }
        tokio::time::sleep(POLL).await;
    }
}
