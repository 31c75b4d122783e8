//! Prometheus metrics of the worker and the router: names, histogram buckets, recorders and
//! the `/metrics` endpoint.
//!
//! Each process owns one [`prometheus::Registry`] (never the crate's global default), so
//! in-process tests that start several workers and a router do not collide, and a process
//! that hosts several simulated workers can register one [`WorkerMetrics`] per worker id.
//! Callers record plain data ([`crate::RequestTimings`], [`crate::Usage`],
//! [`crate::FinishReason`], [`crate::ErrorKind`], [`WorkerLoad`]) through small methods and
//! never touch `prometheus` types themselves.
//!
//! Histogram boundaries are vLLM's (`vllm/v1/metrics/loggers.py`, `PrometheusStatLogger`),
//! so TTFT / TPOT / e2e panels and SLO thresholds written for vLLM apply unchanged.

pub mod names;
mod router;
mod server;
#[cfg(test)]
mod test_util;
mod worker;

pub use names::MetricSpec;
/// Re-exported so the worker and router build their registry without naming the crate.
pub use prometheus::Registry;
pub use router::{RouterMetrics, WorkerState};
pub use server::{metrics_router, render, sample_value, serve_metrics};
pub use worker::{WorkerLoad, WorkerMetrics};

use prometheus::core::Collector;
use prometheus::{HistogramOpts, Opts};
use thiserror::Error;

use crate::{ErrorKind, FinishReason};

/// vLLM's `vllm:time_to_first_token_seconds` buckets: 1 ms .. 2560 s, dense below 100 ms.
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// vLLM's `vllm:inter_token_latency_seconds` and `vllm:request_time_per_output_token_seconds`
/// buckets (also the deprecated `vllm:time_per_output_token_seconds`): 10 ms .. 80 s.
pub const TOKEN_LATENCY_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];

/// vLLM's `request_latency_buckets`, shared by `e2e_request_latency_seconds`,
/// `request_queue_time_seconds`, `request_prefill_time_seconds` and
/// `request_decode_time_seconds`: 0.3 s .. 7680 s.
pub const REQUEST_LATENCY_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// Every [`ErrorKind`]; error and retry counters start at zero for each so that `rate()`
/// and the dashboard see a series before the first failure.
const ERROR_KINDS: [ErrorKind; 8] = [
    ErrorKind::InvalidArgument,
    ErrorKind::NotFound,
    ErrorKind::ResourceExhausted,
    ErrorKind::Unavailable,
    ErrorKind::DeadlineExceeded,
    ErrorKind::Cancelled,
    ErrorKind::Unauthenticated,
    ErrorKind::Internal,
];

/// Every [`FinishReason`], pre-initialised on the finished-request counters for the same reason.
const FINISH_REASONS: [FinishReason; 4] = [
    FinishReason::Stop,
    FinishReason::Length,
    FinishReason::Abort,
    FinishReason::Error,
];

/// Why metrics could not be set up or served.
#[derive(Debug, Error)]
pub enum MetricsError {
    /// A metric clashes with one already in the registry (same name, other labels or help),
    /// e.g. the same worker id registered twice in one process.
    #[error("registering metrics: {0}")]
    Register(#[from] prometheus::Error),
    /// The `/metrics` HTTP server failed.
    #[error("serving /metrics: {0}")]
    Serve(#[from] std::io::Error),
}

/// Registers a clone of `collector` in `registry` and hands the collector back for recording.
fn register<C: Collector + Clone + 'static>(
    registry: &Registry,
    collector: C,
) -> Result<C, MetricsError> {
    registry.register(Box::new(collector.clone()))?;
    Ok(collector)
}

/// Options of a counter or gauge named by `spec`.
fn opts(spec: MetricSpec) -> Opts {
    Opts::new(spec.name, spec.help)
}

/// Options of a histogram named by `spec` with the given bucket boundaries.
fn histogram_opts(spec: MetricSpec, buckets: &[f64]) -> HistogramOpts {
    HistogramOpts::new(spec.name, spec.help).buckets(buckets.to_vec())
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::Duration;

    use anyhow::{ensure, Result};

    use super::*;
    use crate::{RequestTimings, Usage};

    #[test]
    fn names_are_unique_prefixed_and_carry_a_unit() {
        let mut seen = HashSet::new();
        for spec in names::ALL {
            assert!(seen.insert(spec.name), "{} defined twice", spec.name);
            assert!(
                spec.name.starts_with("orchard_worker_")
                    || spec.name.starts_with("orchard_router_")
            );
            assert!(!spec.help.is_empty(), "{} has no help", spec.name);
        }
        for spec in [names::WORKER_TIME_TO_FIRST_TOKEN, names::ROUTER_E2E_LATENCY] {
            assert!(spec.name.ends_with("_seconds"), "{}", spec.name);
        }
    }

    #[test]
    fn every_named_metric_is_exported_by_a_recorder() -> Result<()> {
        let registry = Registry::new();
        let worker = WorkerMetrics::new(&registry, "w")?;
        let router = RouterMetrics::new(&registry)?;
        let timings = RequestTimings {
            ttft: Duration::from_millis(5),
            e2e: Duration::from_millis(9),
            ..RequestTimings::default()
        };
        let usage = Usage {
            prompt_tokens: 1,
            completion_tokens: 2,
            cached_tokens: 0,
        };
        worker.record_finished(&timings, &usage, FinishReason::Stop);
        worker.record_inter_token_latency(Duration::from_millis(2));
        worker.set_load(&WorkerLoad::default());
        router.record_finished("w", &timings, &usage, FinishReason::Stop);
        router.record_inter_token_latency("w", Duration::from_millis(2));
        router.set_worker_state("w", WorkerState::Healthy);
        router.set_in_flight("w", 1);
        let exported: HashSet<String> = registry
            .gather()
            .iter()
            .map(|family| family.name().to_string())
            .collect();
        let named: HashSet<String> = names::ALL.iter().map(|s| s.name.to_string()).collect();
        ensure!(exported == named, "exported {exported:?}\nnamed {named:?}");
        Ok(())
    }
}
