use std::time::Duration;

use anyhow::{ensure, Result};
use prometheus::Registry;

use super::*;
use crate::metrics::render;
use crate::metrics::test_util::sample;

fn served(ttft_ms: u64, e2e_ms: u64) -> RequestTimings {
    RequestTimings {
        queue: Duration::from_millis(2),
        prefill: Duration::ZERO,
        ttft: Duration::from_millis(ttft_ms),
        mean_tpot: Duration::from_millis(30),
        e2e: Duration::from_millis(e2e_ms),
    }
}

fn usage(completion_tokens: u32) -> Usage {
    Usage {
        prompt_tokens: 10,
        completion_tokens,
        cached_tokens: 0,
    }
}

#[test]
fn timings_are_split_by_serving_worker() -> Result<()> {
    let registry = Registry::new();
    let m = RouterMetrics::new(&registry)?;
    m.record_finished("w1", &served(80, 400), &usage(9), FinishReason::Stop);
    m.record_finished("w1", &served(90, 500), &usage(9), FinishReason::Stop);
    m.record_finished("w2", &served(700, 1500), &usage(9), FinishReason::Length);
    m.record_inter_token_latency("w2", Duration::from_millis(40));
    let text = render(&registry)?;
    let ttft = "orchard_router_time_to_first_token_seconds";
    ensure!(sample(&text, &format!("{ttft}_count{{worker=\"w1\"}}"))? == 2.0);
    ensure!(sample(&text, &format!("{ttft}_count{{worker=\"w2\"}}"))? == 1.0);
    ensure!(sample(&text, &format!("{ttft}_bucket{{worker=\"w2\",le=\"0.5\"}}"))? == 0.0);
    ensure!(
        sample(
            &text,
            &format!("{ttft}_bucket{{worker=\"w2\",le=\"0.75\"}}")
        )? == 1.0
    );
    let tpot = "orchard_router_request_time_per_output_token_seconds_sum{worker=\"w1\"}";
    ensure!((sample(&text, tpot)? - 0.06).abs() < 1e-9);
    let itl = "orchard_router_inter_token_latency_seconds_count{worker=\"w2\"}";
    ensure!(sample(&text, itl)? == 1.0);
    let finished = "orchard_router_requests_finished_total";
    ensure!(sample(&text, &format!("{finished}{{finish_reason=\"stop\"}}"))? == 2.0);
    ensure!(sample(&text, &format!("{finished}{{finish_reason=\"length\"}}"))? == 1.0);
    Ok(())
}

#[test]
fn errors_and_retries_count_by_code_from_zero() -> Result<()> {
    let registry = Registry::new();
    let m = RouterMetrics::new(&registry)?;
    m.record_retry(ErrorKind::Unavailable);
    m.record_error(ErrorKind::ResourceExhausted);
    let text = render(&registry)?;
    let retries = "orchard_router_retries_total";
    ensure!(sample(&text, &format!("{retries}{{code=\"unavailable\"}}"))? == 1.0);
    ensure!(sample(&text, &format!("{retries}{{code=\"internal\"}}"))? == 0.0);
    let errors = "orchard_router_request_errors_total";
    ensure!(sample(&text, &format!("{errors}{{code=\"resource_exhausted\"}}"))? == 1.0);
    ensure!(sample(&text, &format!("{errors}{{code=\"unavailable\"}}"))? == 0.0);
    Ok(())
}

#[test]
fn worker_state_is_one_hot_and_forgotten_workers_disappear() -> Result<()> {
    let registry = Registry::new();
    let m = RouterMetrics::new(&registry)?;
    m.set_worker_state("w1", WorkerState::Healthy);
    m.set_worker_state("w1", WorkerState::CircuitOpen);
    m.set_in_flight("w1", 7);
    m.record_finished("w1", &served(80, 400), &usage(3), FinishReason::Stop);
    let text = render(&registry)?;
    let state = |s: &str| {
        sample(
            &text,
            &format!("orchard_router_worker_state{{state=\"{s}\",worker=\"w1\"}}"),
        )
    };
    ensure!(state("circuit_open")? == 1.0);
    ensure!(state("healthy")? == 0.0);
    ensure!(state("draining")? == 0.0);
    let in_flight = "orchard_router_worker_in_flight_requests{worker=\"w1\"}";
    ensure!(sample(&text, in_flight)? == 7.0);

    m.forget_worker("w1");
    let text = render(&registry)?;
    ensure!(!text.contains("worker=\"w1\""), "{text}");
    Ok(())
}
