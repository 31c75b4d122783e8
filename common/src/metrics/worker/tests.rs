use std::time::Duration;

use anyhow::{ensure, Result};
use prometheus::Registry;

use super::*;
use crate::metrics::render;
use crate::metrics::test_util::sample;

fn timings(ttft_ms: u64, e2e_ms: u64) -> RequestTimings {
    RequestTimings {
        queue: Duration::from_millis(10),
        prefill: Duration::from_millis(ttft_ms - 10),
        ttft: Duration::from_millis(ttft_ms),
        mean_tpot: Duration::from_millis(20),
        e2e: Duration::from_millis(e2e_ms),
    }
}

fn usage(prompt_tokens: u32, completion_tokens: u32) -> Usage {
    Usage {
        prompt_tokens,
        completion_tokens,
        cached_tokens: 0,
    }
}

#[test]
fn finished_request_lands_in_vllm_buckets_and_counters() -> Result<()> {
    let registry = Registry::new();
    let m = WorkerMetrics::new(&registry, "w0")?;
    m.record_finished(&timings(50, 250), &usage(12, 11), FinishReason::Stop);
    m.record_finished(&timings(300, 900), &usage(8, 4), FinishReason::Length);
    let text = render(&registry)?;

    let ttft = "orchard_worker_time_to_first_token_seconds";
    ensure!(sample(&text, &format!("{ttft}_count{{worker=\"w0\"}}"))? == 2.0);
    ensure!((sample(&text, &format!("{ttft}_sum{{worker=\"w0\"}}"))? - 0.35).abs() < 1e-9);
    // 50 ms falls in vLLM's (0.04, 0.06] bucket; 300 ms in (0.25, 0.5].
    ensure!(
        sample(
            &text,
            &format!("{ttft}_bucket{{worker=\"w0\",le=\"0.04\"}}")
        )? == 0.0
    );
    ensure!(
        sample(
            &text,
            &format!("{ttft}_bucket{{worker=\"w0\",le=\"0.06\"}}")
        )? == 1.0
    );
    ensure!(sample(&text, &format!("{ttft}_bucket{{worker=\"w0\",le=\"0.5\"}}"))? == 2.0);
    ensure!(
        sample(
            &text,
            &format!("{ttft}_bucket{{worker=\"w0\",le=\"2560\"}}")
        )? == 2.0
    );

    // Decode time is e2e - TTFT: 0.2 s and 0.6 s.
    let decode = "orchard_worker_request_decode_time_seconds_sum{worker=\"w0\"}";
    ensure!((sample(&text, decode)? - 0.8).abs() < 1e-9);
    let tokens_in = "orchard_worker_prompt_tokens_total{worker=\"w0\"}";
    ensure!(sample(&text, tokens_in)? == 20.0);
    let tokens_out = "orchard_worker_generation_tokens_total{worker=\"w0\"}";
    ensure!(sample(&text, tokens_out)? == 15.0);
    let finished = "orchard_worker_requests_finished_total";
    ensure!(
        sample(
            &text,
            &format!("{finished}{{finish_reason=\"stop\",worker=\"w0\"}}")
        )? == 1.0
    );
    ensure!(
        sample(
            &text,
            &format!("{finished}{{finish_reason=\"length\",worker=\"w0\"}}")
        )? == 1.0
    );
    ensure!(
        sample(
            &text,
            &format!("{finished}{{finish_reason=\"abort\",worker=\"w0\"}}")
        )? == 0.0
    );
    Ok(())
}

#[test]
fn latencies_without_tokens_are_not_observed() -> Result<()> {
    let registry = Registry::new();
    let m = WorkerMetrics::new(&registry, "w0")?;
    m.record_finished(&timings(40, 40), &usage(7, 0), FinishReason::Abort);
    m.record_finished(&timings(40, 40), &usage(7, 1), FinishReason::Length);
    let text = render(&registry)?;
    let count = |name: &str| sample(&text, &format!("{name}_count{{worker=\"w0\"}}"));
    ensure!(count("orchard_worker_e2e_request_latency_seconds")? == 2.0);
    ensure!(count("orchard_worker_request_queue_time_seconds")? == 2.0);
    ensure!(count("orchard_worker_time_to_first_token_seconds")? == 1.0);
    ensure!(count("orchard_worker_request_time_per_output_token_seconds")? == 0.0);
    Ok(())
}

#[test]
fn load_sets_gauges_and_turns_totals_into_increments() -> Result<()> {
    let registry = Registry::new();
    let m = WorkerMetrics::new(&registry, "w0")?;
    let mut load = WorkerLoad {
        running: 3,
        waiting: 2,
        kv_blocks_used: 48,
        kv_blocks_total: 64,
        prefix_cache_query_tokens: 100,
        prefix_cache_hit_tokens: 32,
        preemptions: 1,
    };
    m.set_load(&load);
    m.set_load(&load); // same totals again: no double counting
    load.prefix_cache_query_tokens = 150;
    load.prefix_cache_hit_tokens = 48;
    m.set_load(&load);
    let text = render(&registry)?;
    let value = |name: &str| sample(&text, &format!("{name}{{worker=\"w0\"}}"));
    ensure!(value("orchard_worker_requests_running")? == 3.0);
    ensure!(value("orchard_worker_requests_waiting")? == 2.0);
    ensure!(value("orchard_worker_kv_cache_usage_ratio")? == 0.75);
    ensure!(value("orchard_worker_kv_cache_used_blocks")? == 48.0);
    ensure!(value("orchard_worker_kv_cache_capacity_blocks")? == 64.0);
    ensure!(value("orchard_worker_prefix_cache_query_tokens_total")? == 150.0);
    ensure!(value("orchard_worker_prefix_cache_hit_tokens_total")? == 48.0);
    ensure!(value("orchard_worker_preemptions_total")? == 1.0);

    // The engine reset its prefix-cache counts: the new total counts as fresh increments.
    load.prefix_cache_query_tokens = 10;
    m.set_load(&load);
    let text = render(&registry)?;
    let queries = "orchard_worker_prefix_cache_query_tokens_total{worker=\"w0\"}";
    ensure!(sample(&text, queries)? == 160.0);
    Ok(())
}

#[test]
fn errors_start_at_zero_and_count_by_code() -> Result<()> {
    let registry = Registry::new();
    let m = WorkerMetrics::new(&registry, "w0")?;
    m.record_error(ErrorKind::ResourceExhausted);
    m.record_error(ErrorKind::ResourceExhausted);
    let text = render(&registry)?;
    let errors = "orchard_worker_request_errors_total";
    ensure!(
        sample(
            &text,
            &format!("{errors}{{code=\"resource_exhausted\",worker=\"w0\"}}")
        )? == 2.0
    );
    ensure!(
        sample(
            &text,
            &format!("{errors}{{code=\"internal\",worker=\"w0\"}}")
        )? == 0.0
    );
    Ok(())
}

#[test]
fn workers_share_a_registry_but_not_an_id() -> Result<()> {
    let registry = Registry::new();
    let a = WorkerMetrics::new(&registry, "a")?;
    let b = WorkerMetrics::new(&registry, "b")?;
    a.record_inter_token_latency(Duration::from_millis(30));
    b.record_inter_token_latency(Duration::from_millis(30));
    b.record_inter_token_latency(Duration::from_millis(30));
    let text = render(&registry)?;
    let itl = "orchard_worker_inter_token_latency_seconds_count";
    ensure!(sample(&text, &format!("{itl}{{worker=\"a\"}}"))? == 1.0);
    ensure!(sample(&text, &format!("{itl}{{worker=\"b\"}}"))? == 2.0);
    ensure!(
        WorkerMetrics::new(&registry, "a").is_err(),
        "registering worker `a` twice must fail"
    );
    Ok(())
}
