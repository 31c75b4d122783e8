//! The gRPC response stream of one request, wrapped around the engine's event receiver.
//!
//! The stream owns the receiver: when tonic drops the stream (client cancelled, deadline
//! passed, connection lost) the receiver is dropped with it, and the engine aborts the request
//! and frees its KV blocks within one step. It also holds the request's entry in
//! [`InFlight`], so `Abort` knows which ids are live on this worker.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use futures::Stream;
use orchard_common::metrics::WorkerMetrics;
use orchard_common::telemetry::record_child_span;
use orchard_common::RequestTimings;
use orchard_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::Status;
use tracing::Span;

use super::convert;
use crate::engine::EngineEvent;

/// Ids of the requests whose streams are open on this worker.
#[derive(Debug, Clone, Default)]
pub struct InFlight {
    ids: Arc<Mutex<HashSet<String>>>,
}

impl InFlight {
    /// Claims `id`; `None` when a request with that id is already in flight here, since two
    /// could not be told apart by `Abort`.
    pub fn claim(&self, id: &str) -> Option<InFlightGuard> {
        let mut ids = self.ids.lock().unwrap_or_else(PoisonError::into_inner);
        ids.insert(id.to_string()).then(|| InFlightGuard {
            ids: Arc::clone(&self.ids),
            id: id.to_string(),
        })
    }

    /// Whether a request with this id is in flight.
    pub fn contains(&self, id: &str) -> bool {
        let ids = self.ids.lock().unwrap_or_else(PoisonError::into_inner);
        ids.contains(id)
    }
}

/// Releases the id when the request's stream ends or is dropped.
#[derive(Debug)]
pub struct InFlightGuard {
    ids: Arc<Mutex<HashSet<String>>>,
    id: String,
}

impl InFlightGuard {
    /// The claimed request id.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut ids = self.ids.lock().unwrap_or_else(PoisonError::into_inner);
        ids.remove(&self.id);
    }
}

/// `GenerateResponse`s for one request: one per token chunk, then the final message (or an
/// error status), then the end of the stream.
pub struct GenerateStream {
    events: Option<mpsc::UnboundedReceiver<EngineEvent>>,
    guard: Option<InFlightGuard>,
    worker_id: Arc<str>,
    /// Where the request's latencies and outcome are recorded for Prometheus.
    metrics: Arc<WorkerMetrics>,
    /// When the previous token chunk arrived, for inter-token latency.
    last_token_at: Option<Instant>,
    /// The request's span (`worker.generate`); the engine's phases are recorded on it when the
    /// request finishes, and it ends when the stream is dropped.
    span: Span,
}

impl GenerateStream {
    /// Streams `events`, which the engine fills for the request that `guard` claimed.
    pub fn new(
        events: mpsc::UnboundedReceiver<EngineEvent>,
        guard: InFlightGuard,
        worker_id: Arc<str>,
        metrics: Arc<WorkerMetrics>,
    ) -> Self {
        Self {
            events: Some(events),
            guard: Some(guard),
            worker_id,
            metrics,
            last_token_at: None,
            span: Span::none(),
        }
    }

    /// Records the request's engine phases on `span` (see [`record_phases`]).
    pub fn traced(mut self, span: Span) -> Self {
        self.span = span;
        self
    }

    /// Ends the stream: drops the receiver and frees the request id.
    fn finish(&mut self) {
        self.events = None;
        self.guard = None;
    }

    fn response(&mut self, event: EngineEvent) -> Result<pb::GenerateResponse, Status> {
        let id = self
            .guard
            .as_ref()
            .map(InFlightGuard::id)
            .unwrap_or_default();
        match event {
            EngineEvent::Tokens(chunk) => {
                if !chunk.token_ids.is_empty() {
                    let now = Instant::now();
                    match self.last_token_at.replace(now) {
                        Some(prev) => self.metrics.record_inter_token_latency(now - prev),
                        None => tracing::trace!(parent: &self.span, "first token"),
                    }
                }
                Ok(convert::chunk_response(id, chunk))
            }
            EngineEvent::Finished(done) => {
                self.metrics
                    .record_finished(&done.timings, &done.usage, done.reason);
                record_phases(&self.span, &done.timings, done.usage.completion_tokens);
                let msg = convert::final_response(id, done, &self.worker_id);
                self.finish();
                Ok(msg)
            }
            EngineEvent::Failed(err) => {
                tracing::warn!(parent: &self.span, request_id = id, error = %err, "request failed in the engine");
                self.metrics.record_error(err.kind);
                self.finish();
                Err(err.into())
            }
        }
    }
}

/// Records the engine's phases of one finished request on its span: as attributes (seconds,
/// for trace search) and as child spans `engine.queue`, `engine.prefill` and `engine.decode`
/// with their real start and end times (the engine thread measures them: it is a synchronous
/// loop stepping many requests at once, so it runs no per-request spans itself). Called when
/// the final event arrives, which is when the request ended; nothing is exported when trace
/// export is off.
pub fn record_phases(span: &Span, timings: &RequestTimings, completion_tokens: u32) {
    let decode = timings.e2e.saturating_sub(timings.ttft);
    span.record("completion_tokens", completion_tokens);
    span.record("queue_s", timings.queue.as_secs_f64());
    span.record("prefill_s", timings.prefill.as_secs_f64());
    span.record("ttft_s", timings.ttft.as_secs_f64());
    span.record("decode_s", decode.as_secs_f64());
    span.record("e2e_s", timings.e2e.as_secs_f64());
    let ended = SystemTime::now();
    let arrived = ended.checked_sub(timings.e2e).unwrap_or(ended);
    let at = |offset: Duration| arrived + offset;
    let phases = [
        ("engine.queue", arrived, at(timings.queue)),
        (
            "engine.prefill",
            at(timings.queue),
            at(timings.queue + timings.prefill),
        ),
        ("engine.decode", at(timings.ttft), ended),
    ];
    for (name, start, end) in phases {
        record_child_span(span, name, start, end);
    }
}

impl Stream for GenerateStream {
    type Item = Result<pb::GenerateResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Some(events) = self.events.as_mut() else {
            return Poll::Ready(None);
        };
        match events.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(event)) => Poll::Ready(Some(self.response(event))),
            Poll::Ready(None) => {
                self.finish();
                Poll::Ready(Some(Err(Status::unavailable(
                    "the engine stopped before the request finished",
                ))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use orchard_common::{FinishReason, RequestTimings, Usage};

    use super::*;
    use crate::engine::{Finished, TokenChunk};

    fn test_metrics() -> anyhow::Result<Arc<WorkerMetrics>> {
        let registry = orchard_common::metrics::Registry::new();
        Ok(Arc::new(WorkerMetrics::new(&registry, "w")?))
    }

    #[tokio::test]
    async fn ends_after_final_and_releases_the_id() -> anyhow::Result<()> {
        let in_flight = InFlight::default();
        let guard = in_flight
            .claim("r1")
            .ok_or_else(|| anyhow::anyhow!("claim"))?;
        assert!(
            in_flight.claim("r1").is_none(),
            "a live id cannot be claimed twice"
        );
        let (tx, rx) = mpsc::unbounded_channel();
        let mut stream = GenerateStream::new(rx, guard, Arc::from("w"), test_metrics()?);
        tx.send(EngineEvent::Tokens(TokenChunk {
            token_ids: vec![5],
            text: "a".into(),
            logprobs: vec![],
        }))?;
        tx.send(EngineEvent::Finished(Finished {
            reason: FinishReason::Length,
            stop_reason: None,
            usage: Usage::default(),
            timings: RequestTimings::default(),
        }))?;
        let first = stream
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("end"))??;
        assert_eq!(first.token_ids, vec![5]);
        let last = stream
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("end"))??;
        assert!(last.r#final.is_some());
        assert!(
            !in_flight.contains("r1"),
            "id released after the final message"
        );
        assert!(stream.next().await.is_none());
        assert!(tx.is_closed(), "receiver dropped after the final message");
        Ok(())
    }

    #[tokio::test]
    async fn dropping_the_stream_closes_the_engine_channel() -> anyhow::Result<()> {
        let in_flight = InFlight::default();
        let guard = in_flight
            .claim("r2")
            .ok_or_else(|| anyhow::anyhow!("claim"))?;
        let (tx, rx) = mpsc::unbounded_channel::<EngineEvent>();
        let stream = GenerateStream::new(rx, guard, Arc::from("w"), test_metrics()?);
        drop(stream);
        assert!(tx.is_closed());
        assert!(!in_flight.contains("r2"));
        Ok(())
    }
}
