//! DEMO EXPORTER - the numbers it serves are made up, not measurements.
//!
//! Registers a router's and some workers' metrics, each on its own registry and port as
//! separate processes would, records synthetic requests with invented timings every 100 ms,
//! and serves `/metrics` until Ctrl-C (or `--seconds N`). It exists so the Grafana queries
//! and alert rules in `deploy/` can be checked against a real Prometheus
//! (`deploy/tests/prometheus_check.sh`) without a running cluster:
//!
//! ```text
//! cargo run -p orchard-common --example metrics_demo -- \
//!     --router 127.0.0.1:9400 --worker 127.0.0.1:9401 --worker 127.0.0.1:9402
//! ```
//!
//! Port 0 picks a free port; the bound addresses are printed as `router ADDR` and
//! `worker ID ADDR` lines on stdout.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use orchard_common::metrics::{
    serve_metrics, RouterMetrics, WorkerLoad, WorkerMetrics, WorkerState,
};
use orchard_common::{ErrorKind, FinishReason, RequestTimings, Usage};
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Command line: where to serve and for how long.
struct Args {
    router: SocketAddr,
    workers: Vec<SocketAddr>,
    seconds: Option<u64>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        router: SocketAddr::from(([127, 0, 0, 1], 0)),
        workers: Vec::new(),
        seconds: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--router" => args.router = value.parse()?,
            "--worker" => args.workers.push(value.parse()?),
            "--seconds" => args.seconds = Some(value.parse()?),
            _ => bail!("unknown flag {flag}; use --router ADDR --worker ADDR... [--seconds N]"),
        }
    }
    if args.workers.is_empty() {
        args.workers = vec![SocketAddr::from(([127, 0, 0, 1], 0)); 2];
    }
    Ok(args)
}

/// Binds `addr`, prints `label` and the bound address, and serves `registry` until shutdown.
async fn serve(
    label: String,
    addr: SocketAddr,
    registry: Registry,
    stop: watch::Receiver<bool>,
) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    println!("{label} {}", listener.local_addr()?);
    let mut stop = stop;
    tokio::spawn(serve_metrics(listener, registry, async move {
        let _ = stop.changed().await;
    }));
    Ok(())
}

/// One synthetic request on tick `i`: invented timings that vary with `i`.
fn synthetic_request(i: u64) -> (RequestTimings, Usage) {
    let completion_tokens = 8 + (i % 24) as u32;
    let ttft = Duration::from_millis(40 + (i % 7) * 15);
    let mean_tpot = Duration::from_millis(25 + (i % 5) * 5);
    let timings = RequestTimings {
        queue: Duration::from_millis((i % 4) * 10),
        prefill: ttft.saturating_sub(Duration::from_millis(5)),
        ttft,
        mean_tpot,
        e2e: ttft + mean_tpot * (completion_tokens - 1),
    };
    let usage = Usage {
        prompt_tokens: 32 + (i % 50) as u32,
        completion_tokens,
        cached_tokens: 16,
    };
    (timings, usage)
}

/// Records tick `i` on the worker that "served" it and on the router.
fn record_tick(i: u64, router: &RouterMetrics, workers: &[(String, WorkerMetrics)]) {
    let (id, worker) = &workers[(i as usize) % workers.len()];
    let (timings, usage) = synthetic_request(i);
    let reason = if i.is_multiple_of(3) {
        FinishReason::Length
    } else {
        FinishReason::Stop
    };
    worker.record_finished(&timings, &usage, reason);
    for _ in 1..usage.completion_tokens {
        worker.record_inter_token_latency(timings.mean_tpot);
        router.record_inter_token_latency(id, timings.mean_tpot + Duration::from_millis(1));
    }
    let at_router = RequestTimings {
        queue: Duration::from_millis(1),
        ttft: timings.ttft + Duration::from_millis(3),
        e2e: timings.e2e + Duration::from_millis(4),
        ..timings
    };
    router.record_finished(id, &at_router, &usage, reason);
    if i.is_multiple_of(20) {
        worker.record_error(ErrorKind::ResourceExhausted);
        router.record_error(ErrorKind::ResourceExhausted);
    }
    if i.is_multiple_of(30) {
        router.record_retry(ErrorKind::Unavailable);
    }
    for (n, (id, worker)) in workers.iter().enumerate() {
        let n = n as u64;
        worker.set_load(&WorkerLoad {
            running: ((i + n) % 5) as u32,
            waiting: ((i + n) % 3) as u32,
            kv_blocks_used: ((i * 7 + n * 13) % 200) as u32,
            kv_blocks_total: 256,
            prefix_cache_query_tokens: i * 48,
            prefix_cache_hit_tokens: i * 16,
            preemptions: i / 50,
        });
        router.set_in_flight(id, ((i + n) % 6) as u32);
        router.set_worker_state(id, WorkerState::Healthy);
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let (stop_tx, stop_rx) = watch::channel(false);

    let router_registry = Registry::new();
    let router = RouterMetrics::new(&router_registry)?;
    serve(
        "router".into(),
        args.router,
        router_registry,
        stop_rx.clone(),
    )
    .await?;
    let mut workers = Vec::new();
    for (n, addr) in args.workers.iter().enumerate() {
        let id = format!("demo-w{n}");
        let registry = Registry::new();
        workers.push((id.clone(), WorkerMetrics::new(&registry, &id)?));
        serve(format!("worker {id}"), *addr, registry, stop_rx.clone()).await?;
    }

    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let deadline = args
        .seconds
        .map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    for i in 0.. {
        tokio::select! {
            _ = tick.tick() => record_tick(i, &router, &workers),
            _ = tokio::signal::ctrl_c() => break,
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            break;
        }
    }
    let _ = stop_tx.send(true);
    Ok(())
}
