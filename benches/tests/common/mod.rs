//! In-process fakes of the servers `orchard-bench` measures: an Orchard gRPC router and an
//! OpenAI-compatible SSE server, both on 127.0.0.1:0, each emitting exactly `max_tokens`
//! tokens per request (one per message / event) so tests can check what the client counted.
//! A prompt containing `FAIL` is refused; over HTTP a prompt containing `NOUSAGE` gets no
//! usage event.

#![allow(dead_code)] // each test binary uses a different part of this shared module

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;

use axum::extract::Json;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::Stream;
use orchard_bench::client::{Client, ConnectOptions};
use orchard_bench::progress::ProgressMode;
use orchard_bench::runner::Settings;
use orchard_bench::target::Target;
use orchard_proto::v1::generate_request::Input;
use orchard_proto::v1::orchard_server::{Orchard, OrchardServer};
use orchard_proto::v1::{
    FinalInfo, FinishReason, GenerateRequest, GenerateResponse, ListModelsRequest,
    ListModelsResponse, ModelInfo, Timings, Usage,
};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Status};

/// What the fake gRPC server reports as its own timings.
pub const FAKE_SERVER_TTFT_S: f64 = 0.0125;
/// Worker id in the fake's timings.
pub const FAKE_WORKER: &str = "fake-worker";
/// Cached tokens the fake reports for every request.
pub const FAKE_CACHED: u32 = 3;
/// Model the fake HTTP server lists.
pub const FAKE_MODEL: &str = "fake-model";

/// Fake Orchard router.
#[derive(Debug, Default)]
pub struct FakeOrchard;

type GenStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

fn prompt_words(req: &GenerateRequest) -> (String, u32) {
    let prompt = match &req.input {
        Some(Input::Prompt(p)) => p.clone(),
        _ => String::new(),
    };
    let words = u32::try_from(prompt.split_whitespace().count()).unwrap_or(u32::MAX);
    (prompt, words)
}

#[tonic::async_trait]
impl Orchard for FakeOrchard {
    type GenerateStream = GenStream;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<tonic::Response<Self::GenerateStream>, Status> {
        let req = request.into_inner();
        let (prompt, words) = prompt_words(&req);
        if prompt.contains("FAIL") {
            return Err(Status::resource_exhausted("fake is saturated"));
        }
        let n = req.sampling.and_then(|s| s.max_tokens).unwrap_or(16);
        let mut msgs: Vec<Result<GenerateResponse, Status>> = (0..n)
            .map(|i| {
                Ok(GenerateResponse {
                    token_ids: vec![100 + i],
                    text: format!(" t{i}"),
                    ..GenerateResponse::default()
                })
            })
            .collect();
        msgs.push(Ok(GenerateResponse {
            r#final: Some(FinalInfo {
                finish_reason: FinishReason::Length as i32,
                usage: Some(Usage {
                    prompt_tokens: words,
                    completion_tokens: n,
                    cached_tokens: FAKE_CACHED,
                }),
                timings: Some(Timings {
                    ttft_s: FAKE_SERVER_TTFT_S,
                    worker_id: FAKE_WORKER.into(),
                    e2e_s: 0.5,
                    ..Timings::default()
                }),
                stop_reason: String::new(),
            }),
            ..GenerateResponse::default()
        }));
        Ok(tonic::Response::new(Box::pin(tokio_stream::iter(msgs))))
    }

    async fn list_models(
        &self,
        _request: Request<ListModelsRequest>,
    ) -> Result<tonic::Response<ListModelsResponse>, Status> {
        Ok(tonic::Response::new(ListModelsResponse {
            models: vec![ModelInfo {
                id: FAKE_MODEL.into(),
                ..ModelInfo::default()
            }],
        }))
    }
}

/// Starts the fake gRPC router; returns its `grpc://` target.
pub async fn spawn_fake_grpc() -> anyhow::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(OrchardServer::new(FakeOrchard))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    Ok(format!("grpc://{addr}"))
}

async fn completions(Json(body): Json<Value>) -> Response {
    let prompt = body["prompt"].as_str().unwrap_or_default().to_owned();
    if prompt.contains("FAIL") {
        return (StatusCode::SERVICE_UNAVAILABLE, "fake is busy").into_response();
    }
    let n = body["max_tokens"].as_u64().unwrap_or(16);
    let chunk = |text: String, finish: Value| json!({"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish}]});
    let mut events: Vec<Value> = (0..n)
        .map(|i| chunk(format!(" t{i}"), Value::Null))
        .collect();
    events.push(chunk(String::new(), json!("length")));
    if !prompt.contains("NOUSAGE") {
        let words = prompt.split_whitespace().count();
        events.push(json!({"choices": [], "usage": {
            "prompt_tokens": words, "completion_tokens": n, "total_tokens": n + words as u64,
            "prompt_tokens_details": {"cached_tokens": FAKE_CACHED}}}));
    }
    let mut sse: Vec<Result<Event, Infallible>> = events
        .iter()
        .map(|v| Ok(Event::default().data(v.to_string())))
        .collect();
    sse.push(Ok(Event::default().data("[DONE]")));
    Sse::new(tokio_stream::iter(sse)).into_response()
}

async fn models() -> Json<Value> {
    Json(json!({"object": "list", "data": [{"id": FAKE_MODEL, "object": "model"}]}))
}

/// Starts the fake OpenAI-compatible server; returns its `http://` target.
pub async fn spawn_fake_openai() -> anyhow::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = listener.local_addr()?;
    let app = axum::Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(format!("http://{addr}"))
}

/// Connects a client to `target` with test defaults.
pub async fn connect(target: &str) -> anyhow::Result<Client> {
    let opts = ConnectOptions {
        model: None,
        connect_timeout: Duration::from_secs(10),
    };
    Ok(Client::connect(&Target::parse(target)?, &opts).await?)
}

/// Settings for tests: greedy, fixed lengths, no progress bar.
pub fn settings() -> Settings {
    Settings {
        temperature: 0.0,
        ignore_eos: true,
        request_timeout: Duration::from_secs(30),
        progress: ProgressMode::Hidden,
        seed: 11,
    }
}
