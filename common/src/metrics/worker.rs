//! The worker's recorder: request timings, token counts and the engine's load gauges.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus::{Gauge, Histogram, IntCounter, IntCounterVec, IntGauge, Registry};

use super::names::{self, MetricSpec, LABEL_CODE, LABEL_FINISH_REASON, LABEL_WORKER};
use super::{
    histogram_opts, opts, register, MetricsError, ERROR_KINDS, FINISH_REASONS,
    REQUEST_LATENCY_BUCKETS, TOKEN_LATENCY_BUCKETS, TTFT_BUCKETS,
};
use crate::{ErrorKind, FinishReason, RequestTimings, Usage};

/// The engine state a worker publishes after each step (the gauges and running totals of
/// the worker's `LoadSnapshot`), as plain data so `common` does not depend on the worker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerLoad {
    /// Sequences in the running batch.
    pub running: u32,
    /// Requests waiting to be scheduled.
    pub waiting: u32,
    /// KV blocks held by sequences.
    pub kv_blocks_used: u32,
    /// KV blocks in the pool.
    pub kv_blocks_total: u32,
    /// Running total of prompt tokens looked up in the prefix cache since engine start.
    pub prefix_cache_query_tokens: u64,
    /// Running total of prompt tokens found in the prefix cache since engine start.
    pub prefix_cache_hit_tokens: u64,
    /// Running total of preemptions since engine start.
    pub preemptions: u64,
}

impl WorkerLoad {
    /// Fraction of KV blocks in use; 0 for an empty pool rather than NaN.
    pub fn kv_usage(&self) -> f64 {
        if self.kv_blocks_total == 0 {
            0.0
        } else {
            f64::from(self.kv_blocks_used) / f64::from(self.kv_blocks_total)
        }
    }
}

/// The running totals last published, so [`WorkerMetrics::set_load`] can turn the engine's
/// cumulative counts into counter increments.
#[derive(Debug, Default)]
struct LastTotals {
    prefix_cache_query_tokens: u64,
    prefix_cache_hit_tokens: u64,
    preemptions: u64,
}

/// Advances `counter` by how far `total` moved past `last`. A total below `last` means the
/// engine reset its count (e.g. a prefix-cache reset), so the whole new total is new.
fn advance(counter: &IntCounter, last: &mut u64, total: u64) {
    let delta = if total >= *last { total - *last } else { total };
    counter.inc_by(delta);
    *last = total;
}

/// One worker's metrics. Cheap to clone (handles to shared series), so the gRPC service,
/// the stream relays and the load poller can each hold one.
#[derive(Clone)]
pub struct WorkerMetrics {
    ttft: Histogram,
    inter_token: Histogram,
    time_per_output_token: Histogram,
    e2e: Histogram,
    queue: Histogram,
    prefill: Histogram,
    decode: Histogram,
    prompt_tokens: IntCounter,
    generation_tokens: IntCounter,
    running: IntGauge,
    waiting: IntGauge,
    kv_usage: Gauge,
    kv_used_blocks: IntGauge,
    kv_capacity_blocks: IntGauge,
    prefix_queries: IntCounter,
    prefix_hits: IntCounter,
    preemptions: IntCounter,
    finished: IntCounterVec,
    errors: IntCounterVec,
    last_totals: Arc<Mutex<LastTotals>>,
}

impl WorkerMetrics {
    /// Registers the worker metrics in `registry`, every series carrying the const label
    /// `worker="<worker_id>"` so several workers can share one registry and dashboards can
    /// group by worker. Fails if this worker id is already registered there.
    pub fn new(registry: &Registry, worker_id: &str) -> Result<Self, MetricsError> {
        let reg = Registrar {
            registry,
            worker_id,
        };
        let metrics = Self {
            ttft: reg.histogram(names::WORKER_TIME_TO_FIRST_TOKEN, TTFT_BUCKETS)?,
            inter_token: reg.histogram(names::WORKER_INTER_TOKEN_LATENCY, TOKEN_LATENCY_BUCKETS)?,
            time_per_output_token: reg
                .histogram(names::WORKER_TIME_PER_OUTPUT_TOKEN, TOKEN_LATENCY_BUCKETS)?,
            e2e: reg.histogram(names::WORKER_E2E_LATENCY, REQUEST_LATENCY_BUCKETS)?,
            queue: reg.histogram(names::WORKER_QUEUE_TIME, REQUEST_LATENCY_BUCKETS)?,
            prefill: reg.histogram(names::WORKER_PREFILL_TIME, REQUEST_LATENCY_BUCKETS)?,
            decode: reg.histogram(names::WORKER_DECODE_TIME, REQUEST_LATENCY_BUCKETS)?,
            prompt_tokens: reg.counter(names::WORKER_PROMPT_TOKENS)?,
            generation_tokens: reg.counter(names::WORKER_GENERATION_TOKENS)?,
            running: reg.int_gauge(names::WORKER_REQUESTS_RUNNING)?,
            waiting: reg.int_gauge(names::WORKER_REQUESTS_WAITING)?,
            kv_usage: register(
                registry,
                Gauge::with_opts(reg.opts(names::WORKER_KV_CACHE_USAGE))?,
            )?,
            kv_used_blocks: reg.int_gauge(names::WORKER_KV_CACHE_USED_BLOCKS)?,
            kv_capacity_blocks: reg.int_gauge(names::WORKER_KV_CACHE_CAPACITY_BLOCKS)?,
            prefix_queries: reg.counter(names::WORKER_PREFIX_CACHE_QUERIES)?,
            prefix_hits: reg.counter(names::WORKER_PREFIX_CACHE_HITS)?,
            preemptions: reg.counter(names::WORKER_PREEMPTIONS)?,
            finished: reg.counter_vec(names::WORKER_REQUESTS_FINISHED, LABEL_FINISH_REASON)?,
            errors: reg.counter_vec(names::WORKER_REQUEST_ERRORS, LABEL_CODE)?,
            last_totals: Arc::default(),
        };
        for reason in FINISH_REASONS {
            metrics.finished.with_label_values(&[reason.as_str()]);
        }
        for kind in ERROR_KINDS {
            metrics.errors.with_label_values(&[kind.label()]);
        }
        Ok(metrics)
    }

    /// Records a request that reached the end of its stream (any [`FinishReason`]): its
    /// finish reason, token counts and the engine's timings. TTFT, prefill and decode time
    /// are observed only if a token was produced, TPOT only with two or more tokens, so an
    /// aborted-while-queued request does not drag latency percentiles to zero.
    pub fn record_finished(&self, timings: &RequestTimings, usage: &Usage, reason: FinishReason) {
        self.finished.with_label_values(&[reason.as_str()]).inc();
        self.prompt_tokens.inc_by(u64::from(usage.prompt_tokens));
        self.generation_tokens
            .inc_by(u64::from(usage.completion_tokens));
        self.queue.observe(timings.queue.as_secs_f64());
        self.e2e.observe(timings.e2e.as_secs_f64());
        if usage.completion_tokens > 0 {
            self.ttft.observe(timings.ttft.as_secs_f64());
            self.prefill.observe(timings.prefill.as_secs_f64());
            self.decode
                .observe(timings.e2e.saturating_sub(timings.ttft).as_secs_f64());
        }
        if usage.completion_tokens > 1 {
            self.time_per_output_token
                .observe(timings.mean_tpot.as_secs_f64());
        }
    }

    /// Records the gap between two consecutive output tokens of one request; call once per
    /// token after the first, as tokens leave the engine.
    pub fn record_inter_token_latency(&self, gap: Duration) {
        self.inter_token.observe(gap.as_secs_f64());
    }

    /// Records a request the worker refused or failed, classified once by its [`ErrorKind`].
    pub fn record_error(&self, kind: ErrorKind) {
        self.errors.with_label_values(&[kind.label()]).inc();
    }

    /// Publishes the engine's latest load: sets the gauges and advances the prefix-cache and
    /// preemption counters to the engine's running totals. Call after each step or on a
    /// short timer; calling twice with the same totals adds nothing.
    pub fn set_load(&self, load: &WorkerLoad) {
        self.running.set(i64::from(load.running));
        self.waiting.set(i64::from(load.waiting));
        self.kv_used_blocks.set(i64::from(load.kv_blocks_used));
        self.kv_capacity_blocks.set(i64::from(load.kv_blocks_total));
        self.kv_usage.set(load.kv_usage());
        let mut last = self
            .last_totals
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        advance(
            &self.prefix_queries,
            &mut last.prefix_cache_query_tokens,
            load.prefix_cache_query_tokens,
        );
        advance(
            &self.prefix_hits,
            &mut last.prefix_cache_hit_tokens,
            load.prefix_cache_hit_tokens,
        );
        advance(&self.preemptions, &mut last.preemptions, load.preemptions);
    }
}

/// Builds and registers metrics that all carry this worker's const `worker` label.
struct Registrar<'a> {
    registry: &'a Registry,
    worker_id: &'a str,
}

impl Registrar<'_> {
    fn opts(&self, spec: MetricSpec) -> prometheus::Opts {
        opts(spec).const_label(LABEL_WORKER, self.worker_id)
    }

    fn histogram(&self, spec: MetricSpec, buckets: &[f64]) -> Result<Histogram, MetricsError> {
        let opts = histogram_opts(spec, buckets).const_label(LABEL_WORKER, self.worker_id);
        register(self.registry, Histogram::with_opts(opts)?)
    }

    fn counter(&self, spec: MetricSpec) -> Result<IntCounter, MetricsError> {
        register(self.registry, IntCounter::with_opts(self.opts(spec))?)
    }

    fn int_gauge(&self, spec: MetricSpec) -> Result<IntGauge, MetricsError> {
        register(self.registry, IntGauge::with_opts(self.opts(spec))?)
    }

    fn counter_vec(&self, spec: MetricSpec, label: &str) -> Result<IntCounterVec, MetricsError> {
        register(
            self.registry,
            IntCounterVec::new(self.opts(spec), &[label])?,
        )
    }
}

#[cfg(test)]
mod tests;
