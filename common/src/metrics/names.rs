//! Every Prometheus metric name Orchard exports, with its help text and label names.
//!
//! One source of truth (dynamo's `prometheus_names.rs` habit): the recorders in
//! [`super::worker`] and [`super::router`] register exactly these specs, and the Grafana
//! dashboard and alert rules in `deploy/` may only use names listed in [`ALL`] (a test in
//! `common/tests/deploy_metric_names.rs` enforces it). Names carry the `orchard_` prefix,
//! the component (`worker` / `router`) and their unit (`_seconds`, `_ratio`, `_blocks`,
//! `_tokens_total`, `_total`), following the Prometheus naming guide. Where vLLM has the
//! same quantity the suffix matches vLLM's (`time_to_first_token_seconds`,
//! `e2e_request_latency_seconds`, ...) so vLLM dashboards translate by swapping the prefix.

/// A metric's name and the help text Prometheus shows for it; registered once per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricSpec {
    /// Full exposition name, e.g. `orchard_worker_time_to_first_token_seconds`.
    pub name: &'static str,
    /// `# HELP` text: what is measured and between which two instants.
    pub help: &'static str,
}

/// Label naming the worker a series belongs to (a const label on worker metrics, a
/// variable label on the router's per-worker metrics) so dashboards group `by (worker)`.
pub const LABEL_WORKER: &str = "worker";
/// Label carrying [`crate::ErrorKind::label`] on error and retry counters.
pub const LABEL_CODE: &str = "code";
/// Label carrying [`crate::FinishReason::as_str`] on finished-request counters.
pub const LABEL_FINISH_REASON: &str = "finish_reason";
/// Label carrying [`super::WorkerState::label`] on the router's worker-state gauge.
pub const LABEL_STATE: &str = "state";

// ---- Worker: request-level histograms (observed once per request, except inter-token) ----

/// Worker TTFT: arrival at the engine -> first output token.
pub const WORKER_TIME_TO_FIRST_TOKEN: MetricSpec = MetricSpec {
    name: "orchard_worker_time_to_first_token_seconds",
    help: "Time from a request's arrival at the worker engine to its first output token.",
};
/// Worker inter-token latency: gap between consecutive output tokens of one request.
pub const WORKER_INTER_TOKEN_LATENCY: MetricSpec = MetricSpec {
    name: "orchard_worker_inter_token_latency_seconds",
    help: "Time between two consecutive output tokens of one request, at the worker.",
};
/// Worker per-request mean TPOT: (e2e - TTFT) / (output tokens - 1).
pub const WORKER_TIME_PER_OUTPUT_TOKEN: MetricSpec = MetricSpec {
    name: "orchard_worker_request_time_per_output_token_seconds",
    help: "Mean time per output token after the first, one observation per request, at the worker.",
};
/// Worker end-to-end latency: arrival -> last token.
pub const WORKER_E2E_LATENCY: MetricSpec = MetricSpec {
    name: "orchard_worker_e2e_request_latency_seconds",
    help: "Time from a request's arrival at the worker engine to its last token.",
};
/// Worker queue time: arrival -> first scheduled.
pub const WORKER_QUEUE_TIME: MetricSpec = MetricSpec {
    name: "orchard_worker_request_queue_time_seconds",
    help: "Time a request waited in the worker's queue before it was first scheduled.",
};
/// Worker prefill time: first scheduled -> prompt fully processed.
pub const WORKER_PREFILL_TIME: MetricSpec = MetricSpec {
    name: "orchard_worker_request_prefill_time_seconds",
    help: "Time from first scheduling to the end of the prompt's prefill, at the worker.",
};
/// Worker decode time: first token -> last token.
pub const WORKER_DECODE_TIME: MetricSpec = MetricSpec {
    name: "orchard_worker_request_decode_time_seconds",
    help: "Time from a request's first output token to its last, at the worker.",
};

// ---- Worker: token counters ----

/// Prompt tokens of finished requests (cached ones included).
pub const WORKER_PROMPT_TOKENS: MetricSpec = MetricSpec {
    name: "orchard_worker_prompt_tokens_total",
    help: "Prompt tokens of requests that finished on this worker, prefix-cache hits included.",
};
/// Output tokens of finished requests.
pub const WORKER_GENERATION_TOKENS: MetricSpec = MetricSpec {
    name: "orchard_worker_generation_tokens_total",
    help: "Output tokens of requests that finished on this worker.",
};

// ---- Worker: scheduler and KV-cache state (from the engine's load snapshot) ----

/// Sequences in the running batch.
pub const WORKER_REQUESTS_RUNNING: MetricSpec = MetricSpec {
    name: "orchard_worker_requests_running",
    help: "Sequences in the worker's running batch at the last engine step.",
};
/// Requests waiting to be scheduled.
pub const WORKER_REQUESTS_WAITING: MetricSpec = MetricSpec {
    name: "orchard_worker_requests_waiting",
    help: "Requests in the worker's waiting queue at the last engine step.",
};
/// Fraction of KV blocks in use.
pub const WORKER_KV_CACHE_USAGE: MetricSpec = MetricSpec {
    name: "orchard_worker_kv_cache_usage_ratio",
    help: "Fraction (0..1) of the worker's KV-cache blocks held by sequences.",
};
/// KV blocks in use.
pub const WORKER_KV_CACHE_USED_BLOCKS: MetricSpec = MetricSpec {
    name: "orchard_worker_kv_cache_used_blocks",
    help: "KV-cache blocks held by sequences on the worker.",
};
/// KV blocks in the pool.
pub const WORKER_KV_CACHE_CAPACITY_BLOCKS: MetricSpec = MetricSpec {
    name: "orchard_worker_kv_cache_capacity_blocks",
    help: "KV-cache blocks in the worker's pool.",
};
/// Prompt tokens looked up in the prefix cache.
pub const WORKER_PREFIX_CACHE_QUERIES: MetricSpec = MetricSpec {
    name: "orchard_worker_prefix_cache_query_tokens_total",
    help: "Prompt tokens looked up in the worker's prefix cache.",
};
/// Prompt tokens served from the prefix cache.
pub const WORKER_PREFIX_CACHE_HITS: MetricSpec = MetricSpec {
    name: "orchard_worker_prefix_cache_hit_tokens_total",
    help: "Prompt tokens found in the worker's prefix cache (not recomputed).",
};
/// Preemptions (a running sequence evicted for lack of KV blocks, to be recomputed).
pub const WORKER_PREEMPTIONS: MetricSpec = MetricSpec {
    name: "orchard_worker_preemptions_total",
    help: "Running sequences preempted on the worker because KV blocks ran out.",
};

// ---- Worker: outcomes ----

/// Finished requests by finish reason.
pub const WORKER_REQUESTS_FINISHED: MetricSpec = MetricSpec {
    name: "orchard_worker_requests_finished_total",
    help: "Requests that finished on the worker, by finish reason.",
};
/// Failed requests by error code.
pub const WORKER_REQUEST_ERRORS: MetricSpec = MetricSpec {
    name: "orchard_worker_request_errors_total",
    help: "Requests the worker refused or failed, by error code.",
};

// ---- Router: client-visible request histograms, labelled by the serving worker ----

/// Router TTFT: arrival at the router -> first token relayed to the client.
pub const ROUTER_TIME_TO_FIRST_TOKEN: MetricSpec = MetricSpec {
    name: "orchard_router_time_to_first_token_seconds",
    help: "Time from a request's arrival at the router to its first token, by serving worker.",
};
/// Router inter-token latency: gap between consecutive tokens relayed to the client.
pub const ROUTER_INTER_TOKEN_LATENCY: MetricSpec = MetricSpec {
    name: "orchard_router_inter_token_latency_seconds",
    help: "Time between two consecutive tokens relayed to a client, by serving worker.",
};
/// Router per-request mean TPOT.
pub const ROUTER_TIME_PER_OUTPUT_TOKEN: MetricSpec = MetricSpec {
    name: "orchard_router_request_time_per_output_token_seconds",
    help: "Mean time per output token after the first as the client saw it, by serving worker.",
};
/// Router end-to-end latency.
pub const ROUTER_E2E_LATENCY: MetricSpec = MetricSpec {
    name: "orchard_router_e2e_request_latency_seconds",
    help: "Time from a request's arrival at the router to its last token, by serving worker.",
};
/// Router queue time: arrival -> stream opened on the serving worker (retries included).
pub const ROUTER_QUEUE_TIME: MetricSpec = MetricSpec {
    name: "orchard_router_request_queue_time_seconds",
    help: "Time from a request's arrival at the router until the serving worker accepted it, retries included.",
};

// ---- Router: outcomes, retries and the worker pool ----

/// Finished requests by finish reason.
pub const ROUTER_REQUESTS_FINISHED: MetricSpec = MetricSpec {
    name: "orchard_router_requests_finished_total",
    help: "Requests the router completed to the client, by finish reason.",
};
/// Failed requests by error code (what the client received).
pub const ROUTER_REQUEST_ERRORS: MetricSpec = MetricSpec {
    name: "orchard_router_request_errors_total",
    help: "Requests that ended in an error for the client, by error code.",
};
/// Retries on another worker, by the error code that caused them.
pub const ROUTER_RETRIES: MetricSpec = MetricSpec {
    name: "orchard_router_retries_total",
    help:
        "Requests re-sent to another worker after a failure before the first token, by error code.",
};
/// One-hot worker state: 1 for the worker's current state, 0 for the others.
pub const ROUTER_WORKER_STATE: MetricSpec = MetricSpec {
    name: "orchard_router_worker_state",
    help: "Router's view of each worker: 1 for its current state, 0 for the other states.",
};
/// Requests in flight per worker.
pub const ROUTER_WORKER_IN_FLIGHT: MetricSpec = MetricSpec {
    name: "orchard_router_worker_in_flight_requests",
    help: "Requests the router has sent to a worker and not yet seen finish.",
};

/// Every metric Orchard exports; the deploy files may use no other `orchard_` name.
pub const ALL: &[MetricSpec] = &[
    WORKER_TIME_TO_FIRST_TOKEN,
    WORKER_INTER_TOKEN_LATENCY,
    WORKER_TIME_PER_OUTPUT_TOKEN,
    WORKER_E2E_LATENCY,
    WORKER_QUEUE_TIME,
    WORKER_PREFILL_TIME,
    WORKER_DECODE_TIME,
    WORKER_PROMPT_TOKENS,
    WORKER_GENERATION_TOKENS,
    WORKER_REQUESTS_RUNNING,
    WORKER_REQUESTS_WAITING,
    WORKER_KV_CACHE_USAGE,
    WORKER_KV_CACHE_USED_BLOCKS,
    WORKER_KV_CACHE_CAPACITY_BLOCKS,
    WORKER_PREFIX_CACHE_QUERIES,
    WORKER_PREFIX_CACHE_HITS,
    WORKER_PREEMPTIONS,
    WORKER_REQUESTS_FINISHED,
    WORKER_REQUEST_ERRORS,
    ROUTER_TIME_TO_FIRST_TOKEN,
    ROUTER_INTER_TOKEN_LATENCY,
    ROUTER_TIME_PER_OUTPUT_TOKEN,
    ROUTER_E2E_LATENCY,
    ROUTER_QUEUE_TIME,
    ROUTER_REQUESTS_FINISHED,
    ROUTER_REQUEST_ERRORS,
    ROUTER_RETRIES,
    ROUTER_WORKER_STATE,
    ROUTER_WORKER_IN_FLIGHT,
];
