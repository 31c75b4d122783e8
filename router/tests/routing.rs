//! The request path through a real router over fake workers: concurrency, validation,
//! retries, mid-stream failures, cancellation, saturation and prefix affinity.

mod common;

use std::collections::HashSet;

use anyhow::{ensure, Result};
use common::*;
use orchard_common::config::PolicyConfig;
use orchard_proto::v1 as pb;
use orchard_proto::v1::generate_request::Input;
use tonic::Code;

fn expected_text(n: usize) -> String {
    (0..n).map(fake_token_text).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_complete_across_both_workers() -> Result<()> {
    let (a, b) = (spawn_fake("a").await?, spawn_fake("b").await?);
    let router = spawn_router(router_config(&[&a, &b], PolicyConfig::RoundRobin)).await?;
    wait_healthy(&router, 2).await?;

    let mut tasks = Vec::new();
    for i in 0..16 {
        let req = prompt_request(&format!("prompt {i}"), 12);
        let router_ref = &router;
        tasks.push(async move { generate(router_ref, req).await });
    }
    let results = futures::future::join_all(tasks).await;
    let mut served_by = HashSet::new();
    for r in results {
        let out = r?;
        ensure!(out.error.is_none(), "stream failed: {:?}", out.error);
        ensure!(out.text == expected_text(12), "text {:?}", out.text);
        let fin = out
            .final_info
            .ok_or_else(|| anyhow::anyhow!("no final message"))?;
        let t = fin.timings.ok_or_else(|| anyhow::anyhow!("no timings"))?;
        ensure!(
            t.router_ttft_s > 0.0 && t.router_e2e_s >= t.router_ttft_s,
            "{t:?}"
        );
        ensure!(t.ttft_s > 0.0, "worker timings kept: {t:?}");
        ensure!(t.retries == 0);
        served_by.insert(t.worker_id);
    }
    ensure!(served_by.len() == 2, "served by {served_by:?}");
    ensure!(a.state.completed() > 0 && b.state.completed() > 0);
    ensure!(a.state.completed() + b.state.completed() == 16);
    // Every in-flight slot is returned.
    wait_until("in-flight counts are back to 0", || async {
        let list = router
            .admin
            .clone()
            .list_workers(pb::ListWorkersRequest {})
            .await?;
        Ok(list.into_inner().workers.iter().all(|w| w.in_flight == 0))
    })
    .await
}

#[tokio::test]
async fn invalid_requests_get_named_errors() -> Result<()> {
    let a = spawn_fake("a").await?;
    let router = spawn_router(router_config(&[&a], PolicyConfig::RoundRobin)).await?;
    wait_healthy(&router, 1).await?;
    let cases = [
        (
            Some(Input::Prompt(String::new())),
            None,
            Code::InvalidArgument,
            "prompt",
        ),
        (
            Some(Input::PromptTokenIds(pb::TokenIds { ids: vec![] })),
            None,
            Code::InvalidArgument,
            "prompt_token_ids",
        ),
        (
            Some(Input::Chat(pb::ChatMessages { messages: vec![] })),
            None,
            Code::InvalidArgument,
            "chat",
        ),
        (
            Some(Input::Prompt("hi".into())),
            Some(pb::SamplingParams {
                top_p: Some(1.5),
                ..Default::default()
            }),
            Code::InvalidArgument,
            "top_p",
        ),
    ];
    for (input, sampling, code, name) in cases {
        let req = pb::GenerateRequest {
            input,
            sampling,
            ..Default::default()
        };
        let status = generate(&router, req).await.err();
        let status = status.ok_or_else(|| anyhow::anyhow!("{name}: accepted"))?;
        ensure!(status.code() == code, "{name}: {status:?}");
        ensure!(
            status.message().contains(name),
            "{name}: {}",
            status.message()
        );
    }
    let mut req = prompt_request("hi", 2);
    req.model = "no-such-model".into();
    let status = generate(&router, req).await.err();
    let status = status.ok_or_else(|| anyhow::anyhow!("unknown model accepted"))?;
    ensure!(status.code() == Code::NotFound, "{status:?}");
    ensure!(
        status.message().contains("no-such-model"),
        "{}",
        status.message()
    );
    ensure!(a.state.calls() == 0, "invalid requests reached the worker");

    let mut req = prompt_request("hi", 2);
    req.model = FAKE_MODEL.into();
    let out = generate(&router, req).await?;
    ensure!(out.text == expected_text(2));
    let models = router
        .orchard
        .clone()
        .list_models(pb::ListModelsRequest {})
        .await?;
    let ids: Vec<String> = models
        .into_inner()
        .models
        .into_iter()
        .map(|m| m.id)
        .collect();
    ensure!(ids == [FAKE_MODEL], "{ids:?}");
    Ok(())
}

#[tokio::test]
async fn worker_invalid_argument_is_relayed_not_retried() -> Result<()> {
    let (a, b) = (spawn_fake("a").await?, spawn_fake("b").await?);
    a.state.set_behavior(Behavior::RejectInvalid);
    b.state.set_behavior(Behavior::RejectInvalid);
    let router = spawn_router(router_config(&[&a, &b], PolicyConfig::RoundRobin)).await?;
    wait_healthy(&router, 2).await?;
    let status = generate(&router, prompt_request("long", 5)).await.err();
    let status = status.ok_or_else(|| anyhow::anyhow!("accepted"))?;
    ensure!(status.code() == Code::InvalidArgument, "{status:?}");
    ensure!(
        status.message().contains("context length"),
        "{}",
        status.message()
    );
    ensure!(
        a.state.calls() + b.state.calls() == 1,
        "retried an invalid request"
    );
    Ok(())
}

#[tokio::test]
async fn failure_before_first_token_is_retried_on_the_other_worker() -> Result<()> {
    let (a, b) = (spawn_fake("a").await?, spawn_fake("b").await?);
    a.state.set_behavior(Behavior::FailBeforeFirst);
    b.state.set_behavior(Behavior::FailBeforeFirst);
    let router = spawn_router(router_config(&[&a, &b], PolicyConfig::RoundRobin)).await?;
    wait_healthy(&router, 2).await?;
    // Both fail: the client gets the worker's failure after one retry.
    let status = generate(&router, prompt_request("x", 3)).await.err();
    let status = status.ok_or_else(|| anyhow::anyhow!("both workers failed yet it succeeded"))?;
    ensure!(status.code() == Code::Unavailable, "{status:?}");
    ensure!(a.state.calls() == 1 && b.state.calls() == 1);

    // Only `a` fails: whichever the policy picks first, the request succeeds on `b`.
    b.state.set_behavior(Behavior::Normal);
    for _ in 0..2 {
        let out = generate(&router, prompt_request("x", 3)).await?;
        ensure!(out.error.is_none(), "{:?}", out.error);
        ensure!(out.text == expected_text(3));
        let t = out
            .final_info
            .and_then(|f| f.timings)
            .ok_or_else(|| anyhow::anyhow!("no timings"))?;
        ensure!(t.worker_id == "b", "{t:?}");
        if a.state.calls() == 2 {
            ensure!(t.retries == 1, "retried request reports {t:?}");
            return Ok(());
        }
        ensure!(t.retries == 0, "{t:?}");
    }
    anyhow::bail!("round robin never sent a request to the failing worker")
}

#[tokio::test]
async fn mid_stream_failure_gives_partial_output_then_unavailable() -> Result<()> {
    let a = spawn_fake("a").await?;
    a.state.set_behavior(Behavior::FailAfter(3));
    let router = spawn_router(router_config(&[&a], PolicyConfig::RoundRobin)).await?;
    wait_healthy(&router, 1).await?;
    let out = generate(&router, prompt_request("x", 10)).await?;
    ensure!(out.text == expected_text(3), "partial text {:?}", out.text);
    let status = out
        .error
        .ok_or_else(|| anyhow::anyhow!("stream ended cleanly"))?;
    ensure!(status.code() == Code::Unavailable, "{status:?}");
    ensure!(
        status.message().contains("after 3 tokens"),
        "{}",
        status.message()
    );
    ensure!(a.state.calls() == 1, "retried after output was sent");
    Ok(())
}

#[tokio::test]
async fn client_cancel_drops_the_worker_stream() -> Result<()> {
    let a = spawn_fake("a").await?;
    a.state.set_behavior(Behavior::HoldAfter(3));
    let router = spawn_router(router_config(&[&a], PolicyConfig::RoundRobin)).await?;
    wait_healthy(&router, 1).await?;
    let mut stream = router
        .orchard
        .clone()
        .generate(prompt_request("x", 10))
        .await?
        .into_inner();
    for _ in 0..3 {
        ensure!(stream.message().await?.is_some());
    }
    ensure!(a.state.active() == 1);
    drop(stream);
    wait_until("the worker sees its stream dropped", || async {
        Ok(a.state.dropped() == 1 && a.state.active() == 0)
    })
    .await?;
    wait_until("the router frees the in-flight slot", || async {
        let list = router
            .admin
            .clone()
            .list_workers(pb::ListWorkersRequest {})
            .await?;
        Ok(list.into_inner().workers.iter().all(|w| w.in_flight == 0))
    })
    .await
}

#[tokio::test]
async fn saturated_workers_answer_resource_exhausted_at_once() -> Result<()> {
    let (a, b) = (spawn_fake("a").await?, spawn_fake("b").await?);
    a.state.set_behavior(Behavior::HoldAfter(1));
    b.state.set_behavior(Behavior::HoldAfter(1));
    let mut config = router_config(&[&a, &b], PolicyConfig::LeastOutstanding);
    config.max_in_flight_per_worker = 2;
    let router = spawn_router(config).await?;
    wait_healthy(&router, 2).await?;
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = router
            .orchard
            .clone()
            .generate(prompt_request("x", 4))
            .await?
            .into_inner();
        ensure!(s.message().await?.is_some());
        held.push(s);
    }
    let status = generate(&router, prompt_request("x", 4)).await.err();
    let status = status.ok_or_else(|| anyhow::anyhow!("a fifth request was admitted"))?;
    ensure!(status.code() == Code::ResourceExhausted, "{status:?}");
    ensure!(
        a.state.calls() + b.state.calls() == 4,
        "the refused request reached a worker"
    );

    // Released streams finish and free their slots; new requests are admitted again.
    a.state.release();
    b.state.release();
    for mut s in held {
        while let Some(msg) = s.message().await? {
            if msg.r#final.is_some() {
                break;
            }
        }
    }
    a.state.set_behavior(Behavior::Normal);
    b.state.set_behavior(Behavior::Normal);
    wait_until("slots are free again", || async {
        Ok(generate(&router, prompt_request("x", 2)).await.is_ok())
    })
    .await
}

#[tokio::test]
async fn prefix_affinity_keeps_a_prefix_on_one_worker() -> Result<()> {
    let (a, b) = (spawn_fake("a").await?, spawn_fake("b").await?);
    let policy = PolicyConfig::PrefixAffinity {
        block_size: 4,
        overload_factor: 2.0,
    };
    let router = spawn_router(router_config(&[&a, &b], policy)).await?;
    wait_healthy(&router, 2).await?;
    let shared = "You are a helpful assistant. Answer briefly and precisely.";
    let mut owners = HashSet::new();
    for i in 0..6 {
        let out = generate(
            &router,
            prompt_request(&format!("{shared} Question {i}?"), 2),
        )
        .await?;
        let t = out
            .final_info
            .and_then(|f| f.timings)
            .ok_or_else(|| anyhow::anyhow!("no timings"))?;
        owners.insert(t.worker_id);
    }
    ensure!(owners.len() == 1, "one prefix went to {owners:?}");
    Ok(())
}
