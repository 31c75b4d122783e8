//! The router's recorder: client-visible request timings per serving worker, outcomes,
//! retries and the router's view of its worker pool.

use std::time::Duration;

use prometheus::{HistogramVec, IntCounterVec, IntGaugeVec, Registry};

use super::names::{self, LABEL_CODE, LABEL_FINISH_REASON, LABEL_STATE, LABEL_WORKER};
use super::{
    histogram_opts, opts, register, MetricsError, ERROR_KINDS, FINISH_REASONS,
    REQUEST_LATENCY_BUCKETS, TOKEN_LATENCY_BUCKETS, TTFT_BUCKETS,
};
use crate::{ErrorKind, FinishReason, RequestTimings, Usage};

/// How the router currently treats a worker; exported one-hot on `orchard_router_worker_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkerState {
    /// Takes new requests.
    Healthy,
    /// Finishes its in-flight requests but takes no new ones (operator drain).
    Draining,
    /// Failing health checks or unreachable; takes no requests.
    Unhealthy,
    /// Circuit breaker open after repeated failures; retried after a cool-down.
    CircuitOpen,
}

impl WorkerState {
    /// Every state, so the one-hot gauge can zero the states a worker is not in.
    pub const ALL: [WorkerState; 4] = [
        Self::Healthy,
        Self::Draining,
        Self::Unhealthy,
        Self::CircuitOpen,
    ];

    /// Value of the `state` label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Draining => "draining",
            Self::Unhealthy => "unhealthy",
            Self::CircuitOpen => "circuit_open",
        }
    }
}

/// The router's metrics. Cheap to clone, so the request path, the RouterActor and each
/// WorkerLink can hold one.
#[derive(Clone)]
pub struct RouterMetrics {
    ttft: HistogramVec,
    inter_token: HistogramVec,
    time_per_output_token: HistogramVec,
    e2e: HistogramVec,
    queue: HistogramVec,
    finished: IntCounterVec,
    errors: IntCounterVec,
    retries: IntCounterVec,
    worker_state: IntGaugeVec,
    in_flight: IntGaugeVec,
}

impl RouterMetrics {
    /// Registers the router metrics in `registry`. Fails if they are already registered there.
    pub fn new(registry: &Registry) -> Result<Self, MetricsError> {
        let per_worker = |spec, buckets| {
            register(
                registry,
                HistogramVec::new(histogram_opts(spec, buckets), &[LABEL_WORKER])?,
            )
        };
        let counter = |spec, label| register(registry, IntCounterVec::new(opts(spec), &[label])?);
        let metrics = Self {
            ttft: per_worker(names::ROUTER_TIME_TO_FIRST_TOKEN, TTFT_BUCKETS)?,
            inter_token: per_worker(names::ROUTER_INTER_TOKEN_LATENCY, TOKEN_LATENCY_BUCKETS)?,
            time_per_output_token: per_worker(
                names::ROUTER_TIME_PER_OUTPUT_TOKEN,
                TOKEN_LATENCY_BUCKETS,
            )?,
            e2e: per_worker(names::ROUTER_E2E_LATENCY, REQUEST_LATENCY_BUCKETS)?,
            queue: per_worker(names::ROUTER_QUEUE_TIME, REQUEST_LATENCY_BUCKETS)?,
            finished: counter(names::ROUTER_REQUESTS_FINISHED, LABEL_FINISH_REASON)?,
            errors: counter(names::ROUTER_REQUEST_ERRORS, LABEL_CODE)?,
            retries: counter(names::ROUTER_RETRIES, LABEL_CODE)?,
            worker_state: register(
                registry,
                IntGaugeVec::new(
                    opts(names::ROUTER_WORKER_STATE),
                    &[LABEL_WORKER, LABEL_STATE],
                )?,
            )?,
            in_flight: register(
                registry,
                IntGaugeVec::new(opts(names::ROUTER_WORKER_IN_FLIGHT), &[LABEL_WORKER])?,
            )?,
        };
        for reason in FINISH_REASONS {
            metrics.finished.with_label_values(&[reason.as_str()]);
        }
        for kind in ERROR_KINDS {
            metrics.errors.with_label_values(&[kind.label()]);
            metrics.retries.with_label_values(&[kind.label()]);
        }
        Ok(metrics)
    }

    /// Records a request whose stream reached its end (any [`FinishReason`]) as the client saw
    /// it: `timings` are measured at the router (arrival at the router -> first / last token
    /// relayed; `queue` = arrival -> accepted by `worker`, retries included; `prefill` is the
    /// worker's business and not read here). TTFT only with a token, TPOT only with two.
    pub fn record_finished(
        &self,
        worker: &str,
        timings: &RequestTimings,
        usage: &Usage,
        reason: FinishReason,
    ) {
        let labels = [worker];
        self.finished.with_label_values(&[reason.as_str()]).inc();
        self.queue
            .with_label_values(&labels)
            .observe(timings.queue.as_secs_f64());
        self.e2e
            .with_label_values(&labels)
            .observe(timings.e2e.as_secs_f64());
        if usage.completion_tokens > 0 {
            self.ttft
                .with_label_values(&labels)
                .observe(timings.ttft.as_secs_f64());
        }
        if usage.completion_tokens > 1 {
            self.time_per_output_token
                .with_label_values(&labels)
                .observe(timings.mean_tpot.as_secs_f64());
        }
    }

    /// Records the gap between two consecutive tokens relayed to a client from `worker`.
    pub fn record_inter_token_latency(&self, worker: &str, gap: Duration) {
        self.inter_token
            .with_label_values(&[worker])
            .observe(gap.as_secs_f64());
    }

    /// Records a request that ended in an error for the client.
    pub fn record_error(&self, kind: ErrorKind) {
        self.errors.with_label_values(&[kind.label()]).inc();
    }

    /// Records that a request is being re-sent to another worker after a failure of `kind`
    /// before its first token.
    pub fn record_retry(&self, kind: ErrorKind) {
        self.retries.with_label_values(&[kind.label()]).inc();
    }

    /// Publishes the router's current view of `worker`: 1 on `state`, 0 on the others.
    pub fn set_worker_state(&self, worker: &str, state: WorkerState) {
        for s in WorkerState::ALL {
            self.worker_state
                .with_label_values(&[worker, s.label()])
                .set(i64::from(s == state));
        }
    }

    /// Publishes how many requests the router has in flight on `worker`.
    pub fn set_in_flight(&self, worker: &str, in_flight: u32) {
        self.in_flight
            .with_label_values(&[worker])
            .set(i64::from(in_flight));
    }

    /// Drops every series of a worker that left the pool (lease lapsed, removed), so a
    /// departed worker does not linger on dashboards or trip alerts.
    pub fn forget_worker(&self, worker: &str) {
        let labels = [worker];
        for histogram in [
            &self.ttft,
            &self.inter_token,
            &self.time_per_output_token,
            &self.e2e,
            &self.queue,
        ] {
            // Err only means the worker never got a series of this histogram.
            let _ = histogram.remove_label_values(&labels);
        }
        let _ = self.in_flight.remove_label_values(&labels);
        for s in WorkerState::ALL {
            let _ = self.worker_state.remove_label_values(&[worker, s.label()]);
        }
    }
}

#[cfg(test)]
mod tests;
