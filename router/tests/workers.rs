//! Worker management through the Admin service: drain, registration leases, heartbeats and
//! the circuit breaker.

mod common;

use anyhow::{ensure, Result};
use common::*;
use orchard_common::config::PolicyConfig;
use orchard_proto::v1 as pb;
use tonic::Code;

#[tokio::test]
async fn draining_worker_gets_no_new_requests_while_its_stream_finishes() -> Result<()> {
    let (a, b) = (spawn_fake("a").await?, spawn_fake("b").await?);
    a.state.set_behavior(Behavior::HoldAfter(2));
    let router = spawn_router(router_config(&[&a, &b], PolicyConfig::RoundRobin)).await?;
    wait_healthy(&router, 2).await?;
    // Put one held stream on `a` (round robin alternates, so at most two tries).
    let mut held = None;
    for _ in 0..2 {
        let mut s = router
            .orchard
            .clone()
            .generate(prompt_request("x", 5))
            .await?
            .into_inner();
        ensure!(s.message().await?.is_some());
        if a.state.active() == 1 {
            held = Some(s);
            break;
        }
        while s.message().await?.is_some() {}
    }
    let mut held = held.ok_or_else(|| anyhow::anyhow!("no request reached worker a"))?;
    let drained = router
        .admin
        .clone()
        .drain(pb::DrainRequest { id: "a".into() })
        .await?;
    let status = drained
        .into_inner()
        .worker
        .ok_or_else(|| anyhow::anyhow!("no status"))?;
    ensure!(
        status.state() == pb::WorkerState::Draining && status.in_flight == 1,
        "{status:?}"
    );

    let calls_a = a.state.calls();
    for _ in 0..4 {
        let out = generate(&router, prompt_request("y", 2)).await?;
        ensure!(out.error.is_none(), "{:?}", out.error);
    }
    ensure!(
        a.state.calls() == calls_a,
        "a draining worker got new requests"
    );

    a.state.release();
    let mut final_seen = false;
    while let Some(msg) = held.message().await? {
        final_seen |= msg.r#final.is_some();
    }
    ensure!(
        final_seen,
        "the in-flight request on the draining worker did not finish"
    );

    router
        .admin
        .clone()
        .undrain(pb::DrainRequest { id: "a".into() })
        .await?;
    a.state.set_behavior(Behavior::Normal);
    for _ in 0..2 {
        generate(&router, prompt_request("z", 2)).await?;
    }
    ensure!(a.state.calls() > calls_a, "undrained worker got no traffic");

    let unknown = router
        .admin
        .clone()
        .drain(pb::DrainRequest { id: "nope".into() })
        .await;
    ensure!(matches!(unknown, Err(s) if s.code() == Code::NotFound));
    Ok(())
}

#[tokio::test]
async fn registered_worker_disappears_when_its_lease_lapses() -> Result<()> {
    let a = spawn_fake("dyn").await?;
    let mut config = router_config(&[], PolicyConfig::RoundRobin);
    config.max_lease = std::time::Duration::from_millis(1500);
    let router = spawn_router(config).await?;
    let mut admin = router.admin.clone();
    let granted = admin
        .register(pb::RegisterRequest {
            id: "dyn".into(),
            address: a.url(),
            weight: 1.0,
            lease_s: 3600.0,
        })
        .await?
        .into_inner();
    ensure!(
        (granted.lease_s - 1.5).abs() < 1e-9,
        "lease not capped: {granted:?}"
    );
    wait_healthy(&router, 1).await?;
    let out = generate(&router, prompt_request("x", 2)).await?;
    ensure!(out.error.is_none() && a.state.calls() == 1);

    let renewed = admin
        .heartbeat(pb::HeartbeatRequest { id: "dyn".into() })
        .await?;
    ensure!(renewed.into_inner().lease_s > 0.0);

    wait_until("the lapsed worker leaves ListWorkers", || async {
        Ok(worker_states(&router).await?.is_empty())
    })
    .await?;
    let status = admin
        .heartbeat(pb::HeartbeatRequest { id: "dyn".into() })
        .await
        .err();
    ensure!(
        matches!(status, Some(s) if s.code() == Code::NotFound),
        "heartbeat after lapse"
    );
    let status = generate(&router, prompt_request("x", 2)).await.err();
    ensure!(
        matches!(status, Some(s) if s.code() == Code::Unavailable),
        "routed to a lapsed worker"
    );

    let bad = admin
        .register(pb::RegisterRequest {
            id: "bad".into(),
            address: "127.0.0.1:1".into(),
            weight: 1.0,
            lease_s: 1.0,
        })
        .await
        .err();
    ensure!(
        matches!(bad, Some(s) if s.code() == Code::InvalidArgument && s.message().contains("address"))
    );
    Ok(())
}

#[tokio::test]
async fn breaker_opens_on_failing_polls_and_closes_on_recovery() -> Result<()> {
    let (a, b) = (spawn_fake("a").await?, spawn_fake("b").await?);
    let router = spawn_router(router_config(&[&a, &b], PolicyConfig::RoundRobin)).await?;
    wait_healthy(&router, 2).await?;
    a.state.set_fail_polls(true);
    wait_until("worker a is unhealthy", || async {
        let states = worker_states(&router).await?;
        Ok(states.contains(&("a".to_string(), pb::WorkerState::Unhealthy)))
    })
    .await?;
    let calls_a = a.state.calls();
    for _ in 0..4 {
        let out = generate(&router, prompt_request("x", 2)).await?;
        ensure!(out.error.is_none());
    }
    ensure!(
        a.state.calls() == calls_a,
        "an open breaker still sent traffic"
    );

    b.state.set_fail_polls(true);
    wait_until("both workers are unhealthy", || async {
        let states = worker_states(&router).await?;
        Ok(states.iter().all(|(_, s)| *s == pb::WorkerState::Unhealthy))
    })
    .await?;
    let status = generate(&router, prompt_request("x", 2)).await.err();
    ensure!(
        matches!(status, Some(s) if s.code() == Code::Unavailable),
        "no healthy worker"
    );

    a.state.set_fail_polls(false);
    b.state.set_fail_polls(false);
    wait_healthy(&router, 2).await?;
    for _ in 0..2 {
        generate(&router, prompt_request("x", 2)).await?;
    }
    ensure!(a.state.calls() > calls_a, "recovered worker got no traffic");
    Ok(())
}
