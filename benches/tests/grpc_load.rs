//! The load generator against a fake Orchard gRPC router: tokens counted, server timings
//! recorded, errors counted by kind, open loop and duration mode, unreachable targets.

mod common;

use std::time::Duration;

use anyhow::Result;
use common::{connect, settings, spawn_fake_grpc, FAKE_CACHED, FAKE_SERVER_TTFT_S, FAKE_WORKER};
use orchard_bench::client::{Client, ConnectOptions};
use orchard_bench::progress::{Progress, ProgressMode};
use orchard_bench::prompt::PromptSource;
use orchard_bench::runner::{run_load, Arrival, LoadSpec, StopCondition};
use orchard_bench::target::Target;
use orchard_bench::BenchError;

fn hidden() -> Progress {
    Progress::new(ProgressMode::Hidden, None, "test")
}

#[tokio::test]
async fn closed_loop_counts_every_token_the_fake_sent() -> Result<()> {
    let client = connect(&spawn_fake_grpc().await?).await?;
    let prompts = PromptSource::Synthetic {
        tokens: 20,
        seed: 1,
    };
    let spec = settings().closed(3, 6, prompts, 7);
    let progress = hidden();
    let run = run_load(&client, &spec, &progress).await?;
    assert_eq!(progress.position(), 6);
    assert!(run.errors.is_empty(), "{:?}", run.errors);
    let indices: Vec<usize> = run.records.iter().map(|r| r.index).collect();
    assert_eq!(indices, (0..6).collect::<Vec<_>>());
    for r in &run.records {
        assert_eq!(r.output_tokens, 7);
        assert_eq!(r.itl_s.len(), 6, "one gap between each of 7 token messages");
        assert_eq!(r.prompt_tokens, Some(20));
        assert_eq!(r.prompt_tokens_requested, Some(20));
        assert_eq!(r.cached_tokens, Some(FAKE_CACHED));
        assert_eq!(r.finish_reason.as_deref(), Some("FINISH_REASON_LENGTH"));
        let server = r
            .server
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no server timings"))?;
        assert_eq!(server.worker_id, FAKE_WORKER);
        assert_eq!(server.ttft_s, FAKE_SERVER_TTFT_S);
        assert!(r.ttft_s <= r.e2e_s);
    }
    let s = run.summary();
    assert_eq!(
        (s.requests_ok, s.output_tokens, s.prompt_tokens),
        (6, 42, 120)
    );
    assert_eq!(s.itl_ms.map(|p| p.count), Some(36));
    assert_eq!(
        s.server_ttft_ms.map(|p| p.p50),
        Some(FAKE_SERVER_TTFT_S * 1e3)
    );
    assert_eq!(s.cached_tokens, Some(6 * u64::from(FAKE_CACHED)));
    Ok(())
}

#[tokio::test]
async fn refused_requests_are_counted_by_kind_and_left_out_of_latency() -> Result<()> {
    let client = connect(&spawn_fake_grpc().await?).await?;
    let prompts = PromptSource::List(vec!["hello there".into(), "FAIL now".into()]);
    let spec = settings().closed(2, 6, prompts, 4);
    let run = run_load(&client, &spec, &hidden()).await?;
    let s = run.summary();
    assert_eq!((s.requests_ok, s.requests_failed), (3, 3));
    assert_eq!(s.errors_by_kind.get("grpc:ResourceExhausted"), Some(&3));
    assert_eq!(s.ttft_ms.map(|p| p.count), Some(3));
    assert!(run.errors.iter().all(|e| e.index % 2 == 1));
    Ok(())
}

#[tokio::test]
async fn open_loop_and_duration_modes_send_the_planned_requests() -> Result<()> {
    let client = connect(&spawn_fake_grpc().await?).await?;
    let mut spec = settings().closed(1, 10, PromptSource::Synthetic { tokens: 8, seed: 2 }, 3);
    spec.arrival = Arrival::Poisson {
        rate: 500.0,
        seed: 9,
    };
    let run = run_load(&client, &spec, &hidden()).await?;
    assert_eq!(run.records.len(), 10);
    assert!(run.records.iter().all(|r| r.output_tokens == 3));

    let window = Duration::from_millis(300);
    spec.arrival = Arrival::Closed { concurrency: 2 };
    spec.stop = StopCondition::Duration(window);
    let run = run_load(&client, &spec, &hidden()).await?;
    assert!(!run.records.is_empty());
    assert!(run.records.iter().all(|r| r.start_s < window.as_secs_f64()));
    Ok(())
}

#[tokio::test]
async fn bad_specs_are_rejected_before_any_request() -> Result<()> {
    let client = connect(&spawn_fake_grpc().await?).await?;
    let base: LoadSpec = settings().closed(1, 1, PromptSource::Synthetic { tokens: 8, seed: 0 }, 3);
    let zero_conc = LoadSpec {
        arrival: Arrival::Closed { concurrency: 0 },
        ..base.clone()
    };
    let zero_rate = LoadSpec {
        arrival: Arrival::Poisson { rate: 0.0, seed: 0 },
        ..base.clone()
    };
    let zero_requests = LoadSpec {
        stop: StopCondition::Requests(0),
        ..base
    };
    for spec in [zero_conc, zero_rate, zero_requests] {
        let err = run_load(&client, &spec, &hidden()).await;
        assert!(matches!(err, Err(BenchError::BadArgument(_))), "{err:?}");
    }
    Ok(())
}

#[tokio::test]
async fn unreachable_targets_fail_with_the_address_in_the_message() -> Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    drop(listener);
    let opts = ConnectOptions {
        model: None,
        connect_timeout: Duration::from_secs(5),
    };
    for raw in [format!("grpc://{addr}"), format!("http://{addr}")] {
        let err = Client::connect(&Target::parse(&raw)?, &opts).await;
        match err {
            Err(e @ BenchError::Unreachable { .. }) => {
                assert!(e.to_string().contains(&addr.to_string()), "{e}");
            }
            other => panic!("expected Unreachable for {raw}, got {other:?}"),
        }
    }
    Ok(())
}
