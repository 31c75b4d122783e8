//! OpenAI-compatible HTTP client: `POST /v1/completions` with `stream: true`, read as
//! server-sent events. Each event with non-empty `choices[0].text` is one token chunk (vLLM,
//! llama.cpp's server and Orchard's HTTP front send one token per event); the final usage
//! event (`stream_options.include_usage`), when the server sends one, gives the exact token
//! counts. Servers that do not know `ignore_eos` ignore it.

use eventsource_stream::Eventsource;
use futures::StreamExt;
use reqwest::header::CONTENT_TYPE;
use serde_json::{json, Value};

use super::{ConnectOptions, RequestSpec};
use crate::error::RequestError;
use crate::metrics::{RequestRecord, StreamClock};

/// Most bytes of an error body kept in the error message.
const ERROR_BODY_LIMIT: usize = 300;

/// An HTTP client bound to one server and model.
#[derive(Debug, Clone)]
pub struct OpenAiClient {
    http: reqwest::Client,
    base_url: String,
    model: String,
}

/// Token counts from a usage event.
#[derive(Debug, Default)]
struct Usage {
    prompt_tokens: Option<u32>,
    completion_tokens: Option<u32>,
    cached_tokens: Option<u32>,
}

impl OpenAiClient {
    /// Checks the server answers `GET /v1/models` and picks the model (the given one, else
    /// the first listed).
    pub(super) async fn connect(base_url: &str, opts: &ConnectOptions) -> Result<Self, String> {
        // A fresh connection per request: a pooled keep-alive connection that the server closes
        // just as the next request goes out fails that request ("connection closed before
        // message completed"; llama.cpp's server did so to 1 of 8 sequential requests). A
        // loopback connect costs far less than the run's timing resolution matters.
        let http = reqwest::Client::builder()
            .connect_timeout(opts.connect_timeout)
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|e| e.to_string())?;
        let url = format!("{base_url}/v1/models");
        let resp = http.get(&url).send().await.map_err(|e| describe(&e))?;
        if !resp.status().is_success() {
            return Err(format!("GET {url} answered {}", resp.status()));
        }
        let listed = read_json(resp)
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        let first = listed["data"][0]["id"].as_str().map(str::to_owned);
        let model = opts
            .model
            .clone()
            .or(first)
            .ok_or_else(|| format!("GET {url} lists no model; pass --model"))?;
        Ok(Self {
            http,
            base_url: base_url.to_owned(),
            model,
        })
    }

    /// The model requests name.
    pub(super) fn model(&self) -> &str {
        &self.model
    }

    /// Sends one streamed completion and times its events.
    pub(super) async fn generate(&self, spec: &RequestSpec) -> Result<RequestRecord, RequestError> {
        let body = json!({
            "model": self.model,
            "prompt": spec.prompt,
            "max_tokens": spec.max_tokens,
            "temperature": spec.temperature,
            "ignore_eos": spec.ignore_eos,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        let mut clock = StreamClock::start();
        let resp = self
            .http
            .post(format!("{}/v1/completions", self.base_url))
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| RequestError::Transport(describe(&e)))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(RequestError::Http {
                status: status.as_u16(),
                body: text.chars().take(ERROR_BODY_LIMIT).collect(),
            });
        }
        let mut events = resp.bytes_stream().eventsource();
        let mut usage = Usage::default();
        let mut finish_reason = None;
        while let Some(event) = events.next().await {
            let event = event.map_err(|e| RequestError::Transport(e.to_string()))?;
            if event.data.trim() == "[DONE]" {
                break;
            }
            let chunk: Value = serde_json::from_str(&event.data)
                .map_err(|e| RequestError::Protocol(format!("bad event {:?}: {e}", event.data)))?;
            read_chunk(&chunk, &mut clock, &mut usage, &mut finish_reason)?;
        }
        let mut record = clock.finish()?;
        if let Some(n) = usage.completion_tokens {
            record.output_tokens = n;
        }
        record.prompt_tokens = usage.prompt_tokens;
        record.cached_tokens = usage.cached_tokens;
        record.finish_reason = finish_reason;
        Ok(record)
    }
}

/// Applies one event: an error object fails the request, text counts as a token chunk, usage
/// and finish reason are kept.
fn read_chunk(
    chunk: &Value,
    clock: &mut StreamClock,
    usage: &mut Usage,
    finish_reason: &mut Option<String>,
) -> Result<(), RequestError> {
    if let Some(err) = chunk.get("error") {
        return Err(RequestError::Protocol(format!("error event: {err}")));
    }
    let choice = &chunk["choices"][0];
    if choice["text"].as_str().is_some_and(|t| !t.is_empty()) {
        clock.on_tokens(1);
    }
    if let Some(reason) = choice["finish_reason"].as_str() {
        *finish_reason = Some(reason.to_owned());
    }
    let u = &chunk["usage"];
    let count = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
    if u.is_object() {
        usage.prompt_tokens = count(&u["prompt_tokens"]);
        usage.completion_tokens = count(&u["completion_tokens"]);
        usage.cached_tokens = count(&u["prompt_tokens_details"]["cached_tokens"]);
    }
    Ok(())
}

/// A reqwest error with its innermost cause ("Connection refused").
fn describe(err: &reqwest::Error) -> String {
    let mut text = err.to_string();
    let mut cause = std::error::Error::source(err);
    while let Some(c) = cause {
        text = format!("{text}: {c}");
        cause = c.source();
    }
    text
}

/// Reads a JSON body without reqwest's `json` feature.
async fn read_json(resp: reqwest::Response) -> Result<Value, String> {
    let bytes = resp.bytes().await.map_err(|e| describe(&e))?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}
