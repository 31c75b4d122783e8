//! A fake of the router's public `Orchard` service (and of its Admin service's ListWorkers),
//! for testing the HTTP front without workers: it answers with scripted tokens or errors,
//! records every `GenerateRequest` it gets and counts the streams it opened and saw dropped.
//!
//! Also served by `examples/http_fake_server.rs` for the Python `openai` client tests.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{self, BoxStream};
use orchard_common::SamplingParams;
use orchard_proto::v1 as pb;
use orchard_proto::v1::admin_server::Admin;
use orchard_proto::v1::orchard_server::Orchard;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// Name of the one model the fake serves.
pub const FAKE_MODEL: &str = "fake-model";
/// Worker id the fake reports in timings and ListWorkers.
pub const FAKE_WORKER: &str = "fake-0";
/// KV blocks the fake pretends each live request holds.
pub const BLOCKS_PER_REQUEST: u32 = 4;
const CONTEXT_LENGTH: u32 = 2048;
/// Words the `Generate` script produces, one token each.
const WORDS: [&str; 6] = [" apple", " pear", " plum", " fig", " quince", " cherry"];
/// Tokens the `Generate` script produces before stopping on its own ("EOS").
const NATURAL_LENGTH: u32 = 12;

/// What the fake answers to the next `Generate` calls.
#[derive(Debug, Clone)]
pub enum Script {
    /// One token per piece, then a final message.
    Tokens {
        pieces: Vec<String>,
        finish: pb::FinishReason,
        cached_tokens: u32,
    },
    /// Refuse the request before any message.
    Reject(Status),
    /// Send `pieces`, then fail the stream with `status`.
    FailAfter { pieces: Vec<String>, status: Status },
    /// Tokens until the stream is dropped.
    Endless,
    /// Behave like a small model: check the model name and the sampling parameters (with the
    /// same `SamplingParams::validate` the router uses), then produce `max_tokens` tokens
    /// (fewer, finishing with `stop`, unless `ignore_eos`), one every `pace`.
    Generate { pace: Duration },
}

/// Streams opened and closed so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamCounts {
    pub opened: u32,
    /// Dropped for any reason, finished or not.
    pub closed: u32,
    /// Dropped before their last message was sent: the client went away.
    pub cancelled: u32,
}

/// The fake service.
pub struct Fake {
    script: Mutex<Script>,
    requests: Mutex<Vec<pb::GenerateRequest>>,
    counts: watch::Sender<StreamCounts>,
}

impl Fake {
    pub fn new(script: Script) -> Arc<Self> {
        Arc::new(Self {
            script: Mutex::new(script),
            requests: Mutex::new(Vec::new()),
            counts: watch::Sender::new(StreamCounts::default()),
        })
    }

    /// Every `GenerateRequest` received so far.
    pub fn requests(&self) -> Vec<pb::GenerateRequest> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Watches stream counts (to wait for a drop without sleeping).
    pub fn counts(&self) -> watch::Receiver<StreamCounts> {
        self.counts.subscribe()
    }

    fn script(&self) -> Script {
        match self.script.lock() {
            Ok(s) => s.clone(),
            Err(_) => Script::Reject(Status::internal("fake script lock poisoned")),
        }
    }

    fn open(&self, plan: Plan) -> BoxStream<'static, Result<pb::GenerateResponse, Status>> {
        self.counts.send_modify(|c| c.opened += 1);
        let run = Run {
            plan,
            produced: 0,
            arrival: Instant::now(),
            first_token: None,
            guard: DropGuard {
                counts: self.counts.clone(),
                finished: false,
            },
        };
        Box::pin(stream::unfold(run, |mut run| async move {
            run.next().await.map(|item| (item, run))
        }))
    }
}

/// How a stream ends after its tokens.
#[derive(Debug, Clone)]
enum Ending {
    Finish(pb::FinishReason),
    Fail(Status),
}

/// One request's scripted output.
#[derive(Debug, Clone)]
struct Plan {
    request_id: String,
    /// `None` = endless.
    pieces: Option<Vec<String>>,
    ending: Ending,
    logprobs: Option<u32>,
    prompt_tokens: u32,
    cached_tokens: u32,
    pace: Option<Duration>,
}

/// Counts the stream as closed (and cancelled, unless it finished) when it is dropped.
struct DropGuard {
    counts: watch::Sender<StreamCounts>,
    finished: bool,
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        let finished = self.finished;
        self.counts.send_modify(|c| {
            c.closed += 1;
            if !finished {
                c.cancelled += 1;
            }
        });
    }
}

struct Run {
    plan: Plan,
    produced: u32,
    arrival: Instant,
    first_token: Option<Instant>,
    guard: DropGuard,
}

impl Run {
    async fn next(&mut self) -> Option<Result<pb::GenerateResponse, Status>> {
        if self.guard.finished {
            return None;
        }
        if let Some(pace) = self.plan.pace {
            tokio::time::sleep(pace).await;
        }
        let index = self.produced as usize;
        let piece = match &self.plan.pieces {
            Some(pieces) => pieces.get(index).cloned(),
            None => Some(WORDS[index % WORDS.len()].to_string()),
        };
        match piece {
            Some(text) => Some(Ok(self.token(text))),
            None => {
                self.guard.finished = true;
                match self.plan.ending.clone() {
                    Ending::Finish(reason) => Some(Ok(self.final_message(reason))),
                    Ending::Fail(status) => Some(Err(status)),
                }
            }
        }
    }

    fn token(&mut self, text: String) -> pb::GenerateResponse {
        let id = 100 + self.produced;
        self.produced += 1;
        self.first_token.get_or_insert_with(Instant::now);
        let logprobs = self.plan.logprobs.map(|n| pb::Logprobs {
            logprob: -0.5,
            top: (0..n)
                .map(|k| pb::TokenLogprob {
                    token_id: if k == 0 { id } else { 10_000 + k },
                    text: if k == 0 {
                        text.clone()
                    } else {
                        format!("alt{k}")
                    },
                    logprob: -0.5 - k as f32,
                })
                .collect(),
        });
        pb::GenerateResponse {
            request_id: self.plan.request_id.clone(),
            token_ids: vec![id],
            text,
            logprobs: logprobs.into_iter().collect(),
            r#final: None,
        }
    }

    /// Final message with usage and the fake's own measured timings.
    fn final_message(&self, reason: pb::FinishReason) -> pb::GenerateResponse {
        let e2e = self.arrival.elapsed();
        let ttft = self
            .first_token
            .map(|t| t.duration_since(self.arrival))
            .unwrap_or(e2e);
        let tpot = match self.produced {
            0 | 1 => Duration::ZERO,
            n => e2e.saturating_sub(ttft) / (n - 1),
        };
        let timings = pb::Timings {
            ttft_s: ttft.as_secs_f64(),
            mean_tpot_s: tpot.as_secs_f64(),
            e2e_s: e2e.as_secs_f64(),
            worker_id: FAKE_WORKER.to_string(),
            router_ttft_s: ttft.as_secs_f64(),
            router_e2e_s: e2e.as_secs_f64(),
            ..Default::default()
        };
        pb::GenerateResponse {
            request_id: self.plan.request_id.clone(),
            r#final: Some(pb::FinalInfo {
                finish_reason: reason as i32,
                usage: Some(pb::Usage {
                    prompt_tokens: self.plan.prompt_tokens,
                    completion_tokens: self.produced,
                    cached_tokens: self.plan.cached_tokens,
                }),
                timings: Some(timings),
                stop_reason: String::new(),
            }),
            ..Default::default()
        }
    }
}

/// Prompt length by the fake's tokenizer: one token per whitespace-separated word.
fn prompt_tokens(request: &pb::GenerateRequest) -> u32 {
    use pb::generate_request::Input;
    let words = |s: &str| s.split_whitespace().count();
    let n = match &request.input {
        Some(Input::Prompt(text)) => words(text),
        Some(Input::PromptTokenIds(ids)) => ids.ids.len(),
        Some(Input::Chat(chat)) => chat.messages.iter().map(|m| words(&m.content) + 2).sum(),
        None => 0,
    };
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The `Script::Generate` behaviour: validate, then size the output like a model would.
fn generated_plan(request: &pb::GenerateRequest, pace: Duration) -> Result<Plan, Status> {
    if request.model != FAKE_MODEL {
        return Err(Status::not_found(format!(
            "model `{}` is not served",
            request.model
        )));
    }
    let params = SamplingParams::from(&request.sampling.clone().unwrap_or_default());
    params.validate()?;
    let count = if params.ignore_eos {
        params.max_tokens
    } else {
        params.max_tokens.min(NATURAL_LENGTH)
    };
    let finish = if count == params.max_tokens {
        pb::FinishReason::Length
    } else {
        pb::FinishReason::Stop
    };
    let pieces = (0..count as usize)
        .map(|i| WORDS[i % WORDS.len()].to_string())
        .collect();
    Ok(Plan {
        request_id: request.request_id.clone(),
        pieces: Some(pieces),
        ending: Ending::Finish(finish),
        logprobs: params.logprobs,
        prompt_tokens: prompt_tokens(request),
        cached_tokens: 0,
        pace: Some(pace),
    })
}

fn scripted_plan(script: Script, request: &pb::GenerateRequest) -> Result<Plan, Status> {
    let logprobs = request.sampling.as_ref().and_then(|s| s.logprobs);
    let plan = |pieces, ending, cached_tokens| Plan {
        request_id: request.request_id.clone(),
        pieces,
        ending,
        logprobs,
        prompt_tokens: prompt_tokens(request),
        cached_tokens,
        pace: None,
    };
    match script {
        Script::Tokens {
            pieces,
            finish,
            cached_tokens,
        } => Ok(plan(Some(pieces), Ending::Finish(finish), cached_tokens)),
        Script::Reject(status) => Err(status),
        Script::FailAfter { pieces, status } => Ok(plan(Some(pieces), Ending::Fail(status), 0)),
        Script::Endless => Ok(plan(None, Ending::Finish(pb::FinishReason::Length), 0)),
        Script::Generate { pace } => generated_plan(request, pace),
    }
}

#[tonic::async_trait]
impl Orchard for Fake {
    type GenerateStream = BoxStream<'static, Result<pb::GenerateResponse, Status>>;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let request = request.into_inner();
        if let Ok(mut seen) = self.requests.lock() {
            seen.push(request.clone());
        }
        let plan = scripted_plan(self.script(), &request)?;
        Ok(Response::new(self.open(plan)))
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        Ok(Response::new(pb::ListModelsResponse {
            models: vec![pb::ModelInfo {
                id: FAKE_MODEL.to_string(),
                context_length: CONTEXT_LENGTH,
                vocab_size: 49152,
                chat: true,
            }],
        }))
    }
}

#[tonic::async_trait]
impl Admin for Fake {
    async fn list_workers(
        &self,
        _request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let counts = *self.counts.borrow();
        let live = counts.opened - counts.closed;
        let worker = pb::WorkerStatus {
            id: FAKE_WORKER.to_string(),
            address: "http://fake".to_string(),
            state: pb::WorkerState::Healthy as i32,
            load: Some(pb::LoadReport {
                running: live,
                kv_blocks_used: live * BLOCKS_PER_REQUEST,
                kv_blocks_total: 1024,
                ..Default::default()
            }),
            in_flight: live,
            weight: 1.0,
            source: "static".to_string(),
            lease_remaining_s: 0.0,
        };
        Ok(Response::new(pb::ListWorkersResponse {
            workers: vec![worker],
        }))
    }

    async fn register(
        &self,
        _request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        Err(Status::unimplemented("the fake has no registry"))
    }

    async fn heartbeat(
        &self,
        _request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        Err(Status::unimplemented("the fake has no registry"))
    }

    async fn drain(
        &self,
        _request: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        Err(Status::unimplemented("the fake has no registry"))
    }

    async fn undrain(
        &self,
        _request: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        Err(Status::unimplemented("the fake has no registry"))
    }
}
