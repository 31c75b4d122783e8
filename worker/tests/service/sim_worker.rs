//! A simulated worker served in-process, driven with tonic clients.

use std::time::Duration;

use anyhow::{Context, Result};
use orchard_proto::v1 as pb;
use tokio_stream::StreamExt;
use tonic::Code;

use orchard_worker::sim::test_worker_config;

use crate::support::{
    chat_request, generate_all, poll_load, prompt_request, tokens_and_final, TestWorker,
};

#[tokio::test]
async fn stream_ends_with_final_info_matching_what_was_streamed() -> Result<()> {
    let worker = TestWorker::serving(test_worker_config("sim-final")).await?;
    let mut client = worker.client();
    let prompt = "The quick brown fox";
    let msgs = generate_all(&mut client, prompt_request(prompt, 12)).await?;
    let (tokens, info) = tokens_and_final(&msgs)?;
    assert_eq!(tokens.len(), 12);
    assert!(msgs[..msgs.len() - 1].iter().all(|m| m.r#final.is_none()));
    assert_eq!(info.finish_reason, pb::FinishReason::Length as i32);
    let usage = info.usage.context("usage")?;
    assert_eq!(usage.completion_tokens as usize, tokens.len());
    let tokenized = client
        .tokenize(pb::TokenizeRequest {
            input: Some(pb::tokenize_request::Input::Prompt(prompt.into())),
        })
        .await?
        .into_inner();
    assert_eq!(usage.prompt_tokens as usize, tokenized.ids.len());
    let timings = info.timings.context("timings")?;
    assert_eq!(timings.worker_id, "sim-final");
    assert!(
        timings.ttft_s > 0.0 && timings.e2e_s >= timings.ttft_s,
        "{timings:?}"
    );
    let text: String = msgs.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(
        text.len(),
        12,
        "one ASCII character per simulated token: {text:?}"
    );
    Ok(())
}

#[tokio::test]
async fn greedy_output_is_reproducible_and_chat_works() -> Result<()> {
    let worker = TestWorker::serving(test_worker_config("sim-greedy")).await?;
    let mut client = worker.client();
    let first = tokens_and_final(&generate_all(&mut client, chat_request("hi there", 8)).await?)?;
    let again = tokens_and_final(&generate_all(&mut client, chat_request("hi there", 8)).await?)?;
    assert_eq!(first.0, again.0);
    let other = tokens_and_final(&generate_all(&mut client, chat_request("bye now", 8)).await?)?;
    assert_ne!(
        first.0, other.0,
        "a different prompt gives a different continuation"
    );
    Ok(())
}

#[tokio::test]
async fn invalid_sampling_is_rejected_naming_the_parameter() -> Result<()> {
    let worker = TestWorker::serving(test_worker_config("sim-invalid")).await?;
    let mut client = worker.client();
    let cases = [
        (
            "top_p",
            pb::SamplingParams {
                top_p: Some(1.5),
                ..Default::default()
            },
        ),
        (
            "temperature",
            pb::SamplingParams {
                temperature: Some(-1.0),
                ..Default::default()
            },
        ),
        (
            "max_tokens",
            pb::SamplingParams {
                max_tokens: Some(0),
                ..Default::default()
            },
        ),
    ];
    for (name, sampling) in cases {
        let request = pb::GenerateRequest {
            sampling: Some(sampling),
            ..prompt_request("hello", 4)
        };
        let status = client.generate(request).await.err().context("accepted")?;
        assert_eq!(status.code(), Code::InvalidArgument, "{name}");
        assert!(
            status.message().contains(name),
            "{name}: {}",
            status.message()
        );
    }
    Ok(())
}

#[tokio::test]
async fn empty_or_missing_input_is_invalid() -> Result<()> {
    let worker = TestWorker::serving(test_worker_config("sim-empty")).await?;
    let mut client = worker.client();
    let empty = client
        .generate(prompt_request("", 4))
        .await
        .err()
        .context("accepted")?;
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert!(empty.message().contains("prompt"), "{}", empty.message());
    let ids = pb::GenerateRequest {
        input: Some(pb::generate_request::Input::PromptTokenIds(pb::TokenIds {
            ids: vec![],
        })),
        ..prompt_request("", 4)
    };
    let status = client.generate(ids).await.err().context("accepted")?;
    assert_eq!(status.code(), Code::InvalidArgument);
    let none = pb::GenerateRequest {
        input: None,
        ..prompt_request("", 4)
    };
    let status = client.generate(none).await.err().context("accepted")?;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("input"), "{}", status.message());
    let too_big = pb::GenerateRequest {
        input: Some(pb::generate_request::Input::PromptTokenIds(pb::TokenIds {
            ids: vec![1_000_000],
        })),
        ..prompt_request("", 4)
    };
    let status = client.generate(too_big).await.err().context("accepted")?;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("prompt_token_ids"),
        "{}",
        status.message()
    );
    Ok(())
}

#[tokio::test]
async fn cancel_after_three_tokens_frees_the_sequence_and_its_blocks() -> Result<()> {
    let mut cfg = test_worker_config("sim-cancel");
    // Slow enough that the request is still running when the client goes away.
    cfg.sim.per_decode_seq = Duration::from_millis(5);
    let worker = TestWorker::serving(cfg).await?;
    let mut client = worker.client();
    let mut request = prompt_request(&"a long prompt ".repeat(20), 1000);
    if let Some(s) = request.sampling.as_mut() {
        s.ignore_eos = true;
    }
    let mut stream = client.generate(request).await?.into_inner();
    let mut tokens = 0;
    while tokens < 3 {
        let msg = stream.next().await.context("stream ended early")??;
        tokens += msg.token_ids.len();
    }
    let busy = client.get_load(pb::GetLoadRequest {}).await?.into_inner();
    assert_eq!(busy.running, 1);
    assert!(busy.kv_blocks_used > 0);
    drop(stream);
    let load = poll_load(&mut client, Duration::from_secs(1), |l| {
        l.running == 0 && l.kv_blocks_used == 0
    })
    .await?;
    assert_eq!((load.running, load.kv_blocks_used), (0, 0), "{load:?}");
    assert_eq!(load.waiting, 0);
    Ok(())
}

#[tokio::test]
async fn abort_ends_the_stream_with_reason_abort() -> Result<()> {
    let mut cfg = test_worker_config("sim-abort");
    cfg.sim.per_decode_seq = Duration::from_millis(5);
    let worker = TestWorker::serving(cfg).await?;
    let mut client = worker.client();
    let request = pb::GenerateRequest {
        request_id: "req-to-abort".into(),
        ..prompt_request("abort me", 1000)
    };
    let mut stream = client.generate(request).await?.into_inner();
    let first = stream.next().await.context("no first chunk")??;
    assert_eq!(first.request_id, "req-to-abort");
    let found = client
        .abort(pb::AbortRequest {
            request_id: "req-to-abort".into(),
        })
        .await?
        .into_inner()
        .found;
    assert!(found);
    let mut last = first;
    while let Some(msg) = stream.next().await {
        last = msg?;
    }
    let info = last.r#final.context("no final info after abort")?;
    assert_eq!(info.finish_reason, pb::FinishReason::Abort as i32);
    let unknown = client
        .abort(pb::AbortRequest {
            request_id: "no-such-request".into(),
        })
        .await?
        .into_inner();
    assert!(!unknown.found);
    Ok(())
}

#[tokio::test]
async fn model_info_and_load_describe_the_simulated_engine() -> Result<()> {
    let worker = TestWorker::serving(test_worker_config("sim-info")).await?;
    let mut client = worker.client();
    let info = client
        .get_model_info(pb::GetModelInfoRequest {})
        .await?
        .into_inner();
    assert_eq!(info.id, "simulated");
    assert_eq!(info.context_length, 2048);
    assert_eq!(info.vocab_size, 259);
    assert!(info.chat);
    let load = client.get_load(pb::GetLoadRequest {}).await?.into_inner();
    assert_eq!(load.kv_blocks_total, 256);
    assert_eq!(load.block_size, 16);
    assert_eq!(load.max_num_seqs, 32);
    Ok(())
}

#[tokio::test]
async fn reflection_lists_the_worker_service() -> Result<()> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let worker = TestWorker::serving(test_worker_config("sim-reflect")).await?;
    let mut client = ServerReflectionClient::new(worker.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let reply = replies.next().await.context("no reflection reply")??;
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        anyhow::bail!("unexpected reflection reply {reply:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.iter().any(|n| n == "orchard.v1.Worker"), "{names:?}");
    assert!(
        names.iter().any(|n| n == "grpc.health.v1.Health"),
        "{names:?}"
    );
    Ok(())
}

#[tokio::test]
async fn eos_ends_a_request_with_stop() -> Result<()> {
    let mut cfg = test_worker_config("sim-eos");
    cfg.sim.eos_at_position = Some(40);
    let worker = TestWorker::serving(cfg).await?;
    let mut client = worker.client();
    let ids: Vec<u32> = (100..130).collect();
    let request = pb::GenerateRequest {
        input: Some(pb::generate_request::Input::PromptTokenIds(pb::TokenIds {
            ids,
        })),
        ..prompt_request("", 100)
    };
    let (tokens, info) = tokens_and_final(&generate_all(&mut client, request).await?)?;
    assert_eq!(info.finish_reason, pb::FinishReason::Stop as i32);
    // Prompt positions 0..30, output positions 30..40; the EOS token (position 40) is the
    // last output token, counted like vLLM does (its text is not streamed).
    assert_eq!(tokens.len(), 11, "{tokens:?}");
    assert_eq!(
        tokens.last(),
        Some(&orchard_worker::sim::tokenizer::EOS_TOKEN_ID)
    );
    Ok(())
}

#[tokio::test]
async fn shutdown_returns_ok_and_a_broken_model_fails_start_up() -> Result<()> {
    let worker = TestWorker::serving(test_worker_config("sim-stop")).await?;
    worker.stop().await?;

    let mut broken = test_worker_config("broken");
    broken.engine_kind = orchard_common::config::EngineKind::Model;
    broken.model.path = "/nonexistent/model.gguf".into();
    let worker = TestWorker::start(broken).await?;
    let outcome = tokio::time::timeout(Duration::from_secs(30), worker.exited()).await?;
    assert!(
        outcome.is_err(),
        "a worker whose model cannot load must not report success"
    );
    Ok(())
}
