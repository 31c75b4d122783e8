//! The OpenAI-compatible HTTP front against a fake `Orchard` service: response and chunk
//! shapes, usage, parameter translation, error statuses, API keys and client disconnects.

mod http_fake;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use http_fake::{Fake, Script, BLOCKS_PER_REQUEST, FAKE_MODEL, FAKE_WORKER};
use orchard_proto::v1 as pb;
use orchard_router::http::{app, app_with_admin, serve, HttpOptions};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::Status;
use tower::ServiceExt;

/// Generous bound for things that happen within milliseconds; only hit when a test fails.
const WAIT: Duration = Duration::from_secs(10);

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

impl Reply {
    fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.body).with_context(|| format!("not JSON: {}", self.body))
    }

    /// `data:` payloads of a server-sent event stream, in order.
    fn events(&self) -> Vec<String> {
        self.body
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }

    /// The JSON events, without the `[DONE]` sentinel.
    fn chunks(&self) -> Result<Vec<Value>> {
        self.events()
            .iter()
            .filter(|e| *e != "[DONE]")
            .map(|e| serde_json::from_str(e).with_context(|| format!("bad chunk {e}")))
            .collect()
    }
}

async fn call(app: &Router, request: Request<Body>) -> Result<Reply> {
    let response = app.clone().oneshot(request).await?;
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await?;
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8(bytes.to_vec())?,
    })
}

fn post(path: &str, body: &Value) -> Request<Body> {
    Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .expect("static request is valid")
}

fn get(path: &str) -> Request<Body> {
    Request::get(path)
        .body(Body::empty())
        .expect("static request is valid")
}

fn tokens(pieces: &[&str]) -> Script {
    Script::Tokens {
        pieces: pieces.iter().map(|p| p.to_string()).collect(),
        finish: pb::FinishReason::Stop,
        cached_tokens: 0,
    }
}

fn chat_body(extra: Value) -> Value {
    let mut body = json!({
        "model": FAKE_MODEL,
        "messages": [{"role": "user", "content": "Say hello"}],
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    body
}

fn only_request(fake: &Fake) -> Result<pb::GenerateRequest> {
    let mut requests = fake.requests();
    match requests.len() {
        1 => Ok(requests.remove(0)),
        n => Err(anyhow!("expected one GenerateRequest, got {n}")),
    }
}

#[tokio::test]
async fn streamed_chat_sends_role_content_finish_and_done() -> Result<()> {
    let fake = Fake::new(tokens(&["Hello", ",", " world"]));
    let app = app(fake.clone(), HttpOptions::default());
    let reply = call(
        &app,
        post("/v1/chat/completions", &chat_body(json!({"stream": true}))),
    )
    .await?;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply
            .headers
            .get(header::CONTENT_TYPE)
            .map(|v| v.as_bytes()),
        Some(&b"text/event-stream"[..])
    );
    assert_eq!(reply.events().last().map(String::as_str), Some("[DONE]"));
    let chunks = reply.chunks()?;
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let id = chunks[0]["id"].as_str().context("id")?;
    assert!(id.starts_with("chatcmpl-"), "{id}");
    assert_eq!(only_request(&fake)?.request_id, id);
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], id);
        assert_eq!(c["model"], FAKE_MODEL);
        assert!(c.get("usage").is_none(), "usage without include_usage: {c}");
    }
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Hello, world");
    let last = chunks.last().context("no chunks")?;
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["orchard_timings"]["worker_id"], FAKE_WORKER);
    let finishes = chunks
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .count();
    assert_eq!(finishes, 1);
    Ok(())
}

#[tokio::test]
async fn include_usage_adds_a_usage_chunk_that_counts_the_streamed_tokens() -> Result<()> {
    let fake = Fake::new(Script::Tokens {
        pieces: vec!["a".into(), "b".into(), "c".into(), "d".into()],
        finish: pb::FinishReason::Length,
        cached_tokens: 2,
    });
    let app = app(fake, HttpOptions::default());
    let body = chat_body(json!({
        "stream": true, "stream_options": {"include_usage": true},
        "logprobs": true, "top_logprobs": 2,
    }));
    let reply = call(&app, post("/v1/chat/completions", &body)).await?;
    let chunks = reply.chunks()?;
    let streamed_tokens: usize = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array())
        .map(Vec::len)
        .sum();
    let usage_chunk = chunks.last().context("no chunks")?;
    assert_eq!(usage_chunk["choices"], json!([]));
    let usage = &usage_chunk["usage"];
    assert_eq!(usage["completion_tokens"], json!(streamed_tokens));
    assert_eq!(streamed_tokens, 4);
    // The fake counts one token per prompt word plus two per chat message.
    assert_eq!(usage["prompt_tokens"], 4);
    assert_eq!(usage["total_tokens"], 8);
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 2);
    assert_eq!(usage_chunk["orchard_timings"]["worker_id"], FAKE_WORKER);
    let finish_chunk = &chunks[chunks.len() - 2];
    assert_eq!(finish_chunk["choices"][0]["finish_reason"], "length");
    let top = &chunks[1]["choices"][0]["logprobs"]["content"][0]["top_logprobs"];
    assert_eq!(top.as_array().map(Vec::len), Some(2));
    Ok(())
}

#[tokio::test]
async fn non_streamed_completion_has_text_usage_logprobs_and_timings() -> Result<()> {
    let fake = Fake::new(Script::Tokens {
        pieces: vec!["One".into(), " two".into(), " three".into()],
        finish: pb::FinishReason::Length,
        cached_tokens: 0,
    });
    let app = app(fake, HttpOptions::default());
    let body = json!({"model": FAKE_MODEL, "prompt": "Count up", "max_tokens": 3, "logprobs": 1});
    let reply = call(&app, post("/v1/completions", &body)).await?;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let v = reply.json()?;
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().is_some_and(|id| id.starts_with("cmpl-")));
    let choice = &v["choices"][0];
    assert_eq!(choice["text"], "One two three");
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(
        choice["logprobs"]["tokens"],
        json!(["One", " two", " three"])
    );
    assert_eq!(choice["logprobs"]["text_offset"], json!([0, 3, 7]));
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["usage"]["prompt_tokens"], 2);
    assert_eq!(v["usage"]["total_tokens"], 5);
    assert_eq!(v["orchard_timings"]["worker_id"], FAKE_WORKER);
    Ok(())
}

#[tokio::test]
async fn non_streamed_chat_answers_with_one_assistant_message() -> Result<()> {
    let fake = Fake::new(tokens(&["Hi", "!"]));
    let app = app(fake, HttpOptions::default());
    let reply = call(&app, post("/v1/chat/completions", &chat_body(json!({})))).await?;
    let v = reply.json()?;
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(
        v["choices"][0]["message"],
        json!({"role": "assistant", "content": "Hi!"})
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 2);
    Ok(())
}

#[tokio::test]
async fn chat_parameters_reach_the_generate_request() -> Result<()> {
    let fake = Fake::new(tokens(&["ok"]));
    let app = app(fake.clone(), HttpOptions::default());
    let body = json!({
        "model": FAKE_MODEL,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
        ],
        "max_tokens": 50, "max_completion_tokens": 20, "temperature": 0.5, "top_p": 0.9,
        "top_k": 40, "min_p": 0.05, "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "repetition_penalty": 1.1, "seed": 7, "stop": ["\n\n", "END"], "n": 1,
        "logprobs": true, "top_logprobs": 3, "ignore_eos": true, "min_tokens": 2,
        "stop_token_ids": [2, 5], "user": "someone",
    });
    let reply = call(&app, post("/v1/chat/completions", &body)).await?;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let request = only_request(&fake)?;
    assert_eq!(request.model, FAKE_MODEL);
    let messages = match request.input {
        Some(pb::generate_request::Input::Chat(chat)) => chat.messages,
        other => return Err(anyhow!("expected chat input, got {other:?}")),
    };
    let pairs: Vec<(&str, &str)> = messages
        .iter()
        .map(|m| (m.role.as_str(), m.content.as_str()))
        .collect();
    assert_eq!(pairs, [("system", "Be brief."), ("user", "Hi there")]);
    let expected = pb::SamplingParams {
        temperature: Some(0.5),
        top_k: 40,
        top_p: Some(0.9),
        min_p: 0.05,
        repetition_penalty: Some(1.1),
        presence_penalty: 0.5,
        frequency_penalty: -0.5,
        seed: Some(7),
        max_tokens: Some(20),
        min_tokens: 2,
        ignore_eos: true,
        stop: vec!["\n\n".into(), "END".into()],
        stop_token_ids: vec![2, 5],
        logprobs: Some(3),
    };
    assert_eq!(request.sampling, Some(expected));
    Ok(())
}

#[tokio::test]
async fn completion_parameters_reach_the_generate_request() -> Result<()> {
    let fake = Fake::new(tokens(&["ok"]));
    let app = app(fake.clone(), HttpOptions::default());
    let body = json!({
        "model": FAKE_MODEL, "prompt": [1, 2, 3], "max_tokens": 9, "stop": "###",
        "logprobs": 0, "top_k": -1, "stream": true,
    });
    let reply = call(&app, post("/v1/completions", &body)).await?;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let request = only_request(&fake)?;
    assert_eq!(
        request.input,
        Some(pb::generate_request::Input::PromptTokenIds(pb::TokenIds {
            ids: vec![1, 2, 3]
        }))
    );
    let sampling = request.sampling.context("sampling")?;
    assert_eq!(sampling.max_tokens, Some(9));
    assert_eq!(sampling.stop, vec!["###".to_string()]);
    assert_eq!(sampling.logprobs, Some(0));
    assert_eq!(sampling.top_k, 0);
    // Unset parameters stay unset so the service applies its defaults.
    assert_eq!(sampling.temperature, None);
    assert_eq!(sampling.top_p, None);
    Ok(())
}

/// Asserts OpenAI's error shape and returns the error object.
fn error_object(reply: &Reply, status: StatusCode) -> Result<Value> {
    assert_eq!(reply.status, status, "{}", reply.body);
    let v = reply.json()?;
    let error = v.get("error").context("no `error` object")?.clone();
    for field in ["message", "type", "param", "code"] {
        assert!(error.get(field).is_some(), "missing {field}: {error}");
    }
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    Ok(error)
}

#[tokio::test]
async fn service_statuses_map_to_openai_errors() -> Result<()> {
    let cases = [
        (
            Status::invalid_argument("top_p: must be in (0, 1], got 3"),
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
        ),
        (
            Status::not_found("model `x` is not served"),
            StatusCode::NOT_FOUND,
            "invalid_request_error",
        ),
        (
            Status::resource_exhausted("every worker is full"),
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
        ),
        (
            Status::unavailable("no healthy worker"),
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
        ),
    ];
    for (status, http, kind) in cases {
        let message = status.message().to_string();
        let fake = Fake::new(Script::Reject(status));
        let options = HttpOptions {
            retry_after: Duration::from_secs(3),
            ..HttpOptions::default()
        };
        let app = app(fake, options);
        for stream in [false, true] {
            let body = chat_body(json!({"stream": stream}));
            let reply = call(&app, post("/v1/chat/completions", &body)).await?;
            let error = error_object(&reply, http)?;
            assert_eq!(error["type"], kind);
            assert_eq!(error["message"], message.as_str());
            let retry_after = reply.headers.get(header::RETRY_AFTER);
            if http == StatusCode::TOO_MANY_REQUESTS {
                assert_eq!(retry_after.map(|v| v.as_bytes()), Some(&b"3"[..]));
            } else {
                assert_eq!(retry_after, None);
            }
        }
    }
    Ok(())
}

#[tokio::test]
async fn values_the_shared_validation_refuses_are_400s_naming_the_parameter() -> Result<()> {
    // The fake validates with `SamplingParams::validate`, as the router does.
    let fake = Fake::new(Script::Generate {
        pace: Duration::ZERO,
    });
    let app = app(fake.clone(), HttpOptions::default());
    for (param, value) in [
        ("top_p", json!(1.5)),
        ("temperature", json!(-1.0)),
        ("max_tokens", json!(0)),
    ] {
        let body = chat_body(json!({ param: value }));
        let reply = call(&app, post("/v1/chat/completions", &body)).await?;
        let error = error_object(&reply, StatusCode::BAD_REQUEST)?;
        let message = error["message"].as_str().unwrap_or_default();
        assert!(message.starts_with(param), "{param}: {message}");
    }
    let ok = call(
        &app,
        post("/v1/chat/completions", &chat_body(json!({"max_tokens": 3}))),
    )
    .await?;
    assert_eq!(ok.json()?["usage"]["completion_tokens"], 3);
    Ok(())
}

#[tokio::test]
async fn unsupported_n_is_refused_before_reaching_the_service() -> Result<()> {
    let fake = Fake::new(tokens(&["x"]));
    let app = app(fake.clone(), HttpOptions::default());
    let reply = call(
        &app,
        post("/v1/chat/completions", &chat_body(json!({"n": 2}))),
    )
    .await?;
    let error = error_object(&reply, StatusCode::BAD_REQUEST)?;
    assert_eq!(error["param"], "n");
    assert!(error["message"].as_str().is_some_and(|m| m.contains('n')));
    assert!(fake.requests().is_empty());
    Ok(())
}

#[tokio::test]
async fn malformed_bodies_get_400_in_openai_shape() -> Result<()> {
    let fake = Fake::new(tokens(&["x"]));
    let app = app(fake.clone(), HttpOptions::default());
    let broken = Request::post("/v1/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{\"model\": "))?;
    error_object(&call(&app, broken).await?, StatusCode::BAD_REQUEST)?;
    let wrong_type = chat_body(json!({"temperature": "hot"}));
    let reply = call(&app, post("/v1/chat/completions", &wrong_type)).await?;
    let error = error_object(&reply, StatusCode::BAD_REQUEST)?;
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("temperature")),
        "{error}"
    );
    let unsupported = chat_body(json!({"logit_bias": {"50256": -100}}));
    let reply = call(&app, post("/v1/chat/completions", &unsupported)).await?;
    assert_eq!(
        error_object(&reply, StatusCode::BAD_REQUEST)?["param"],
        "logit_bias"
    );
    assert!(fake.requests().is_empty());
    Ok(())
}

#[tokio::test]
async fn an_error_after_the_first_token_ends_the_stream_with_an_error_event() -> Result<()> {
    let fake = Fake::new(Script::FailAfter {
        pieces: vec!["partial".into()],
        status: Status::unavailable("worker fake-0 went away"),
    });
    let app = app(fake, HttpOptions::default());
    let body = json!({"model": FAKE_MODEL, "prompt": "p", "stream": true});
    let reply = call(&app, post("/v1/completions", &body)).await?;
    assert_eq!(reply.status, StatusCode::OK);
    let events = reply.events();
    assert!(!events.iter().any(|e| e == "[DONE]"), "{events:?}");
    let chunks = reply.chunks()?;
    assert_eq!(chunks[0]["choices"][0]["text"], "partial");
    let last = chunks.last().context("no events")?;
    assert_eq!(last["error"]["message"], "worker fake-0 went away");
    assert_eq!(last["error"]["code"], "unavailable");
    Ok(())
}

#[tokio::test]
async fn api_key_guards_everything_but_health() -> Result<()> {
    let fake = Fake::new(tokens(&["x"]));
    let options = HttpOptions {
        api_key: Some("sekret".into()),
        ..HttpOptions::default()
    };
    let app = app(fake.clone(), options);
    let with_auth = |value: &str| {
        let mut request = post("/v1/chat/completions", &chat_body(json!({})));
        if let Ok(v) = value.parse() {
            request.headers_mut().insert(header::AUTHORIZATION, v);
        }
        request
    };
    let missing = call(&app, post("/v1/chat/completions", &chat_body(json!({})))).await?;
    assert_eq!(
        error_object(&missing, StatusCode::UNAUTHORIZED)?["type"],
        "authentication_error"
    );
    error_object(
        &call(&app, with_auth("Bearer wrong")).await?,
        StatusCode::UNAUTHORIZED,
    )?;
    error_object(
        &call(&app, get("/v1/models")).await?,
        StatusCode::UNAUTHORIZED,
    )?;
    assert!(fake.requests().is_empty());
    let ok = call(&app, with_auth("Bearer sekret")).await?;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    assert_eq!(call(&app, get("/health")).await?.status, StatusCode::OK);

    let open = orchard_router::http::app(fake, HttpOptions::default());
    let reply = call(&open, post("/v1/chat/completions", &chat_body(json!({})))).await?;
    assert_eq!(reply.status, StatusCode::OK);
    Ok(())
}

#[tokio::test]
async fn models_health_and_unknown_paths() -> Result<()> {
    let app = app(Fake::new(tokens(&["x"])), HttpOptions::default());
    let models = call(&app, get("/v1/models")).await?.json()?;
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], FAKE_MODEL);
    assert_eq!(models["data"][0]["object"], "model");
    let health = call(&app, get("/health")).await?;
    assert_eq!(health.json()?["status"], "ok");
    error_object(&call(&app, get("/v1/nope")).await?, StatusCode::NOT_FOUND)?;
    Ok(())
}

/// Reads from `socket` until `count` SSE `data:` events arrived.
async fn read_events(socket: &mut TcpStream, count: usize) -> Result<String> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&seen).matches("data: ").count() < count {
        let n = socket.read(&mut buf).await?;
        if n == 0 {
            return Err(anyhow!("connection closed early"));
        }
        seen.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&seen).into_owned())
}

async fn kv_blocks_used(app: &Router) -> Result<Value> {
    let workers = call(app, get("/v1/orchard/workers")).await?.json()?;
    Ok(workers["workers"][0]["load"]["kv_blocks_used"].clone())
}

#[tokio::test]
async fn client_disconnect_mid_stream_drops_the_service_stream() -> Result<()> {
    let fake = Fake::new(Script::Endless);
    let app = app_with_admin(fake.clone(), fake.clone(), HttpOptions::default());
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, app.clone(), async {
        let _ = stopped.await;
    }));

    let body = chat_body(json!({"stream": true})).to_string();
    let mut socket = TcpStream::connect(addr).await?;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await?;
    socket.write_all(body.as_bytes()).await?;
    let seen = read_events(&mut socket, 3).await?;
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    assert_eq!(kv_blocks_used(&app).await?, json!(BLOCKS_PER_REQUEST));
    drop(socket);

    let mut counts = fake.counts();
    let after = tokio::time::timeout(WAIT, counts.wait_for(|c| c.cancelled == 1))
        .await
        .context("the service stream was not dropped after the client left")??
        .to_owned();
    assert_eq!((after.opened, after.closed), (1, 1));
    assert_eq!(kv_blocks_used(&app).await?, json!(0));
    let _ = stop.send(());
    server.await??;
    Ok(())
}

#[tokio::test]
async fn finished_streams_are_not_counted_as_cancelled() -> Result<()> {
    let fake = Fake::new(tokens(&["a", "b"]));
    let app = app(fake.clone(), HttpOptions::default());
    let reply = call(
        &app,
        post("/v1/chat/completions", &chat_body(json!({"stream": true}))),
    )
    .await?;
    assert_eq!(reply.status, StatusCode::OK);
    let counts = *fake.counts().borrow();
    assert_eq!((counts.opened, counts.closed, counts.cancelled), (1, 1, 0));
    Ok(())
}

#[tokio::test]
async fn shared_service_instance_serves_concurrent_requests() -> Result<()> {
    let fake = Fake::new(tokens(&["x", "y"]));
    let app = app(Arc::clone(&fake), HttpOptions::default());
    let calls = (0..4).map(|_| call(&app, post("/v1/chat/completions", &chat_body(json!({})))));
    for reply in futures::future::join_all(calls).await {
        assert_eq!(reply?.json()?["choices"][0]["message"]["content"], "xy");
    }
    assert_eq!(fake.requests().len(), 4);
    let ids: std::collections::HashSet<String> =
        fake.requests().into_iter().map(|r| r.request_id).collect();
    assert_eq!(ids.len(), 4, "request ids must be unique");
    Ok(())
}
