//! Shared fixtures of the router's integration tests: a scripted FAKE worker (an in-process
//! tonic `Worker` server on 127.0.0.1:0), an in-process router, and polling helpers; REAL
//! workers (`orchard_worker::server::run`, model or simulated engine) live in [`real`].
#![allow(dead_code)] // each test binary uses a different subset of the fixtures

pub mod real;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use orchard_common::config::{HealthConfig, PolicyConfig, RouterConfig, StaticWorker};
use orchard_proto::v1 as pb;
use orchard_proto::v1::admin_client::AdminClient;
use orchard_proto::v1::generate_request::Input;
use orchard_proto::v1::orchard_client::OrchardClient;
use orchard_proto::v1::worker_server::{Worker, WorkerServer};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Model id the fake workers report.
pub const FAKE_MODEL: &str = "fake-model";

/// What the fake does with the next Generate calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behavior {
    /// Streams `max_tokens` tokens and a final message.
    Normal,
    /// Refuses the call with UNAVAILABLE before any token.
    FailBeforeFirst,
    /// Refuses with INVALID_ARGUMENT, as a worker does for prompt + max_tokens > context.
    RejectInvalid,
    /// Streams this many tokens, then fails with UNAVAILABLE.
    FailAfter(usize),
    /// Streams this many tokens, then waits for `release()` (or the client leaving).
    HoldAfter(usize),
}

/// Counters and knobs shared by a fake worker's service and the test.
pub struct FakeState {
    pub id: String,
    behavior: Mutex<Behavior>,
    /// Generate calls received.
    pub calls: AtomicU32,
    /// Streams that ended because the receiver (the router) dropped them.
    pub dropped: AtomicU32,
    /// Streams that sent their final message.
    pub completed: AtomicU32,
    /// Abort RPCs received.
    pub aborts: AtomicU32,
    /// Streams currently open.
    pub active: AtomicU32,
    /// When set, GetLoad fails (so the router's polls fail).
    fail_polls: AtomicBool,
    /// Set once by `release()`: streams parked by `HoldAfter` continue (and later ones do
    /// not park). A watch, not a Notify, so a release cannot slip between check and wait.
    release: watch::Sender<bool>,
    /// Scripted KV usage reported by GetLoad.
    kv_used: AtomicU32,
}

impl FakeState {
    pub fn set_behavior(&self, b: Behavior) {
        if let Ok(mut guard) = self.behavior.lock() {
            *guard = b;
        }
    }
    fn behavior(&self) -> Behavior {
        self.behavior.lock().map(|g| *g).unwrap_or(Behavior::Normal)
    }
    pub fn set_fail_polls(&self, fail: bool) {
        self.fail_polls.store(fail, Ordering::SeqCst);
    }
    /// Lets every held stream continue.
    pub fn release(&self) {
        self.release.send_replace(true);
    }
    pub fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }
    pub fn dropped(&self) -> u32 {
        self.dropped.load(Ordering::SeqCst)
    }
    pub fn completed(&self) -> u32 {
        self.completed.load(Ordering::SeqCst)
    }
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::SeqCst)
    }
}

/// The fake's gRPC service.
struct FakeService {
    state: Arc<FakeState>,
}

/// A running fake worker.
pub struct FakeWorker {
    pub state: Arc<FakeState>,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl FakeWorker {
    pub fn id(&self) -> &str {
        &self.state.id
    }
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for FakeWorker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts a fake worker on 127.0.0.1:0.
pub async fn spawn_fake(id: &str) -> Result<FakeWorker> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let state = Arc::new(FakeState {
        id: id.to_string(),
        behavior: Mutex::new(Behavior::Normal),
        calls: AtomicU32::new(0),
        dropped: AtomicU32::new(0),
        completed: AtomicU32::new(0),
        aborts: AtomicU32::new(0),
        active: AtomicU32::new(0),
        fail_polls: AtomicBool::new(false),
        release: watch::Sender::new(false),
        kv_used: AtomicU32::new(0),
    });
    let (_reporter, health) = tonic_health::server::health_reporter();
    let (stop, stopped) = oneshot::channel::<()>();
    let service = WorkerServer::new(FakeService {
        state: Arc::clone(&state),
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(service)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            }),
    );
    Ok(FakeWorker {
        state,
        addr,
        stop: Some(stop),
    })
}

type Chunk = Result<pb::GenerateResponse, Status>;

#[tonic::async_trait]
impl Worker for FakeService {
    type GenerateStream = ReceiverStream<Chunk>;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let state = Arc::clone(&self.state);
        state.calls.fetch_add(1, Ordering::SeqCst);
        let req = request.into_inner();
        match state.behavior() {
            Behavior::FailBeforeFirst => {
                return Err(Status::unavailable(
                    "fake: scripted failure before the first token",
                ))
            }
            Behavior::RejectInvalid => {
                return Err(Status::invalid_argument(
                    "prompt (10 tokens) + max_tokens (5000) exceeds the context length 2048",
                ))
            }
            _ => {}
        }
        let (tx, rx) = mpsc::channel(4);
        state.active.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let ended = stream_tokens(&state, &tx, &req).await;
            state.active.fetch_sub(1, Ordering::SeqCst);
            match ended {
                StreamEnd::Completed => state.completed.fetch_add(1, Ordering::SeqCst),
                StreamEnd::Dropped => state.dropped.fetch_add(1, Ordering::SeqCst),
                StreamEnd::Failed => 0,
            };
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn abort(
        &self,
        _request: Request<pb::AbortRequest>,
    ) -> Result<Response<pb::AbortResponse>, Status> {
        self.state.aborts.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(pb::AbortResponse { found: false }))
    }

    async fn get_load(
        &self,
        _request: Request<pb::GetLoadRequest>,
    ) -> Result<Response<pb::LoadReport>, Status> {
        if self.state.fail_polls.load(Ordering::SeqCst) {
            return Err(Status::unavailable("fake: scripted poll failure"));
        }
        Ok(Response::new(pb::LoadReport {
            running: self.state.active(),
            kv_blocks_used: self.state.kv_used.load(Ordering::SeqCst),
            kv_blocks_total: 1024,
            max_num_seqs: 32,
            block_size: 16,
            ..Default::default()
        }))
    }

    async fn get_model_info(
        &self,
        _request: Request<pb::GetModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        Ok(Response::new(pb::ModelInfo {
            id: FAKE_MODEL.into(),
            context_length: 2048,
            vocab_size: 256,
            chat: true,
        }))
    }

    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let text = match request.into_inner().input {
            Some(pb::tokenize_request::Input::Prompt(p)) => p,
            Some(pb::tokenize_request::Input::Chat(c)) => {
                c.messages.into_iter().map(|m| m.content).collect()
            }
            None => return Err(Status::invalid_argument("input: required")),
        };
        // One token per byte: enough for prefix matching.
        let ids = text.bytes().map(u32::from).collect();
        Ok(Response::new(pb::TokenizeResponse { ids }))
    }
}

enum StreamEnd {
    Completed,
    Dropped,
    Failed,
}

/// The text of the fake's `i`-th token.
pub fn fake_token_text(i: usize) -> String {
    format!("t{i} ")
}

async fn stream_tokens(
    state: &FakeState,
    tx: &mpsc::Sender<Chunk>,
    req: &pb::GenerateRequest,
) -> StreamEnd {
    let arrival = Instant::now();
    let n = req
        .sampling
        .as_ref()
        .and_then(|s| s.max_tokens)
        .unwrap_or(8) as usize;
    let behavior = state.behavior();
    let mut first = None;
    for i in 0..n {
        match behavior {
            Behavior::FailAfter(k) if k == i => {
                let _ = tx
                    .send(Err(Status::internal("fake: scripted mid-stream failure")))
                    .await;
                return StreamEnd::Failed;
            }
            Behavior::HoldAfter(k) if k == i => {
                let mut released = state.release.subscribe();
                tokio::select! {
                    _ = released.wait_for(|r| *r) => {}
                    _ = tx.closed() => return StreamEnd::Dropped,
                }
            }
            _ => {}
        }
        let chunk = pb::GenerateResponse {
            request_id: req.request_id.clone(),
            token_ids: vec![1000 + i as u32],
            text: fake_token_text(i),
            ..Default::default()
        };
        if tx.send(Ok(chunk)).await.is_err() {
            return StreamEnd::Dropped;
        }
        first.get_or_insert_with(Instant::now);
        // Paces generation a little so concurrent streams overlap, like a real engine step.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let now = Instant::now();
    let ttft = first.unwrap_or(now).duration_since(arrival);
    let fin = pb::GenerateResponse {
        request_id: req.request_id.clone(),
        r#final: Some(pb::FinalInfo {
            finish_reason: pb::FinishReason::Length.into(),
            usage: Some(pb::Usage {
                prompt_tokens: 3,
                completion_tokens: n as u32,
                cached_tokens: 0,
            }),
            timings: Some(pb::Timings {
                ttft_s: ttft.as_secs_f64(),
                e2e_s: now.duration_since(arrival).as_secs_f64(),
                worker_id: state.id.clone(),
                ..Default::default()
            }),
            stop_reason: String::new(),
        }),
        ..Default::default()
    };
    if tx.send(Ok(fin)).await.is_err() {
        return StreamEnd::Dropped;
    }
    StreamEnd::Completed
}

/// A router running in-process on 127.0.0.1:0, with clients connected to it.
pub struct TestRouter {
    pub addr: SocketAddr,
    pub orchard: OrchardClient<Channel>,
    pub admin: AdminClient<Channel>,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for TestRouter {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A router config over `workers` with fast polling, so tests converge quickly.
pub fn router_config(workers: &[&FakeWorker], policy: PolicyConfig) -> RouterConfig {
    let workers = workers
        .iter()
        .map(|w| (w.id(), w.url()))
        .collect::<Vec<_>>();
    router_config_over(&workers, policy)
}

/// A router config over `(id, url)` workers with fast polling, so tests converge quickly.
pub fn router_config_over<S: AsRef<str>>(
    workers: &[(S, String)],
    policy: PolicyConfig,
) -> RouterConfig {
    RouterConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        workers: workers
            .iter()
            .map(|(id, url)| StaticWorker {
                id: id.as_ref().to_string(),
                address: url.clone(),
                weight: 1.0,
            })
            .collect(),
        policy,
        health: HealthConfig {
            poll_interval: Duration::from_millis(50),
            failure_threshold: 2,
            connect_timeout: Duration::from_secs(1),
        },
        ..RouterConfig::default()
    }
}

/// Starts `orchard_router::run` on 127.0.0.1:0 and connects clients.
pub async fn spawn_router(config: RouterConfig) -> Result<TestRouter> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        if let Err(e) = orchard_router::run(config, listener, shutdown).await {
            eprintln!("router failed: {e}");
        }
    });
    let channel = Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await
        .context("connecting to the router")?;
    Ok(TestRouter {
        addr,
        orchard: OrchardClient::new(channel.clone()),
        admin: AdminClient::new(channel),
        stop: Some(stop),
    })
}

/// Polls `check` every 20 ms until it returns true, failing after 10 s.
pub async fn wait_until<F, Fut>(what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if check().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The state of each worker, keyed by id.
pub async fn worker_states(router: &TestRouter) -> Result<Vec<(String, pb::WorkerState)>> {
    let list = router
        .admin
        .clone()
        .list_workers(pb::ListWorkersRequest {})
        .await?
        .into_inner();
    Ok(list
        .workers
        .into_iter()
        .map(|w| (w.id.clone(), w.state()))
        .collect())
}

/// Waits until `n` workers are healthy.
pub async fn wait_healthy(router: &TestRouter, n: usize) -> Result<()> {
    wait_until(&format!("{n} workers are healthy"), || async {
        let states = worker_states(router).await?;
        Ok(states
            .iter()
            .filter(|(_, s)| *s == pb::WorkerState::Healthy)
            .count()
            == n)
    })
    .await
}

/// A text-prompt request for `max_tokens` tokens.
pub fn prompt_request(prompt: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(Input::Prompt(prompt.to_string())),
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.0),
            max_tokens: Some(max_tokens),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Everything one stream delivered before it ended.
#[derive(Debug, Default)]
pub struct Collected {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub final_info: Option<pb::FinalInfo>,
    /// The status that ended the stream, if it did not end cleanly.
    pub error: Option<Status>,
}

/// Sends `req` and reads the whole stream (an error before the stream is returned as Err).
pub async fn generate(router: &TestRouter, req: pb::GenerateRequest) -> Result<Collected, Status> {
    let mut stream = router.orchard.clone().generate(req).await?.into_inner();
    let mut out = Collected::default();
    loop {
        match stream.message().await {
            Ok(Some(msg)) => {
                out.text.push_str(&msg.text);
                out.token_ids.extend(msg.token_ids);
                if msg.r#final.is_some() {
                    out.final_info = msg.r#final;
                }
            }
            Ok(None) => return Ok(out),
            Err(status) => {
                out.error = Some(status);
                return Ok(out);
            }
        }
    }
}
