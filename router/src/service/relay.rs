//! The request path after validation: open a worker stream (retrying failures before the
//! first message on another worker), then relay chunks to the client.
//!
//! The first message is the commit point. Before it, a retryable failure (worker down,
//! full, or broken) moves the request to a worker not yet tried, up to `max_retries` times;
//! an INVALID_ARGUMENT (or any other client-caused error) from the worker is relayed as is.
//! After it, the client has seen output, so a failure ends the stream with UNAVAILABLE after
//! the partial output. The worker stream is dropped as soon as the client goes away, which is
//! how the worker learns to abort the sequence and free its KV blocks.

use std::sync::Arc;
use std::time::Instant;

use orchard_common::metrics::RouterMetrics;
use orchard_common::{ErrorKind, FinishReason, OrchardError, RequestTimings, Usage};
use orchard_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::codec::Streaming;
use tonic::Status;

use crate::actors::{Lease, RouteQuery, RouterHandle};

/// A worker stream that produced its first message.
pub struct Opened {
    /// Holds the in-flight slot for as long as the relay runs.
    pub lease: Lease,
    pub stream: Streaming<pb::GenerateResponse>,
    pub first: pb::GenerateResponse,
    /// Workers that failed before this one.
    pub retries: u32,
}

/// Everything needed to place one request.
pub struct Placement<'a> {
    pub router: &'a RouterHandle,
    pub request: &'a pb::GenerateRequest,
    pub prompt_token_ids: Vec<u32>,
    pub max_retries: u32,
    pub metrics: &'a RouterMetrics,
}

/// Whether a failure before the first token is worth another worker.
fn retryable(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::Unavailable | ErrorKind::ResourceExhausted | ErrorKind::Internal
    )
}

/// Routes the request and opens a worker stream, retrying on other workers.
pub async fn open_with_retries(p: Placement<'_>) -> Result<Opened, OrchardError> {
    let mut tried: Vec<String> = Vec::new();
    let mut last_err: Option<OrchardError> = None;
    for attempt in 0..=p.max_retries {
        let query = RouteQuery {
            model: p.request.model.clone(),
            prompt_token_ids: p.prompt_token_ids.clone(),
            exclude: tried.clone(),
        };
        let lease = match p.router.route(query).await {
            Ok(lease) => lease,
            // With nowhere left to retry, the worker's own failure is the better message.
            Err(e) => return Err(last_err.unwrap_or(e)),
        };
        match open_on(&lease, p.request).await {
            Ok((stream, first)) => {
                return Ok(Opened {
                    lease,
                    stream,
                    first,
                    retries: attempt,
                })
            }
            Err(e) if retryable(e.kind) => {
                tracing::warn!(worker = %lease.worker_id, error = %e, attempt, "failed before the first token");
                p.metrics.record_retry(e.kind);
                tried.push(lease.worker_id.clone());
                last_err = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last_err.unwrap_or_else(|| OrchardError::unavailable("no attempt was made")))
}

/// Opens the stream on the leased worker and waits for its first message.
async fn open_on(
    lease: &Lease,
    request: &pb::GenerateRequest,
) -> Result<(Streaming<pb::GenerateResponse>, pb::GenerateResponse), OrchardError> {
    let in_context = |e: OrchardError| {
        OrchardError::new(
            e.kind,
            format!("worker `{}`: {}", lease.worker_id, e.message),
        )
    };
    let mut client = lease.client.clone();
    let mut stream = client
        .generate(request.clone())
        .await
        .map_err(|s| in_context(s.into()))?
        .into_inner();
    match stream.message().await {
        Ok(Some(first)) => Ok((stream, first)),
        Ok(None) => Err(in_context(OrchardError::unavailable(
            "stream ended before the first token",
        ))),
        Err(s) => Err(in_context(s.into())),
    }
}

/// Where the relay sends chunks, and the clock it measures against.
pub struct RelayTarget {
    pub tx: mpsc::Sender<Result<pb::GenerateResponse, Status>>,
    /// When the router received the request.
    pub arrival: Instant,
    /// When a worker accepted it (its first message arrived), retries included.
    pub accepted: Instant,
    pub metrics: Arc<RouterMetrics>,
}

/// Forwards the worker stream to the client until the final message, a failure, or the
/// client leaving. Dropping `opened` at the end drops the worker stream and the lease.
pub async fn relay(opened: Opened, target: RelayTarget) {
    let Opened {
        lease,
        mut stream,
        first,
        retries,
    } = opened;
    let mut first_token_at: Option<Instant> = None;
    let mut last_token_at: Option<Instant> = None;
    let mut tokens: usize = 0;
    let mut next = Some(first);
    loop {
        let mut msg = match next.take() {
            Some(msg) => msg,
            None => {
                let received = tokio::select! {
                    _ = target.tx.closed() => return,
                    r = stream.message() => r,
                };
                match received {
                    Ok(Some(msg)) => msg,
                    Ok(None) => {
                        let why = "stream ended without a final message";
                        fail(&target, &lease, tokens, why).await;
                        return;
                    }
                    Err(status) => {
                        let err = OrchardError::from(status);
                        fail(&target, &lease, tokens, &err.message).await;
                        return;
                    }
                }
            }
        };
        if !msg.token_ids.is_empty() {
            let now = Instant::now();
            if let Some(prev) = last_token_at.replace(now) {
                let gap = now.duration_since(prev);
                target
                    .metrics
                    .record_inter_token_latency(&lease.worker_id, gap);
            }
            first_token_at.get_or_insert(now);
            tokens += msg.token_ids.len();
        }
        let done = msg.r#final.is_some();
        if let Some(fin) = msg.r#final.as_mut() {
            let now = Instant::now();
            let t = fin.timings.get_or_insert_with(Default::default);
            t.router_ttft_s = first_token_at
                .unwrap_or(now)
                .duration_since(target.arrival)
                .as_secs_f64();
            t.router_e2e_s = now.duration_since(target.arrival).as_secs_f64();
            t.retries = retries;
            if t.worker_id.is_empty() {
                t.worker_id = lease.worker_id.clone();
            }
            record_finished(&target, &lease.worker_id, fin, first_token_at, now);
        }
        if target.tx.send(Ok(msg)).await.is_err() || done {
            return;
        }
    }
}

/// Records a finished request as the client saw it, in the router's metrics.
fn record_finished(
    target: &RelayTarget,
    worker: &str,
    fin: &pb::FinalInfo,
    first_token_at: Option<Instant>,
    now: Instant,
) {
    let usage = Usage::from(fin.usage.unwrap_or_default());
    let reason = pb::FinishReason::try_from(fin.finish_reason)
        .ok()
        .and_then(|r| FinishReason::try_from(r).ok())
        .unwrap_or(FinishReason::Stop);
    let ttft = first_token_at.unwrap_or(now).duration_since(target.arrival);
    let decode = now.duration_since(first_token_at.unwrap_or(now));
    let mean_tpot = match usage.completion_tokens {
        n if n > 1 => decode / (n - 1),
        _ => Default::default(),
    };
    let timings = RequestTimings {
        queue: target.accepted.duration_since(target.arrival),
        prefill: Default::default(),
        ttft,
        mean_tpot,
        e2e: now.duration_since(target.arrival),
    };
    target
        .metrics
        .record_finished(worker, &timings, &usage, reason);
}

/// Ends the client's stream after partial output: the worker failed mid-request.
async fn fail(target: &RelayTarget, lease: &Lease, tokens: usize, why: &str) {
    let err = OrchardError::unavailable(format!(
        "worker `{}` failed after {tokens} tokens: {why}",
        lease.worker_id
    ));
    tracing::warn!(error = %err, "generation failed mid-stream");
    target.metrics.record_error(err.kind);
    let _ = target.tx.send(Err(err.into())).await;
}
