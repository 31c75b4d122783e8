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
use std::time::Instant;

use futures::Stream;
use orchard_common::metrics::WorkerMetrics;
use orchard_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::Status;

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
        }
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
                    if let Some(prev) = self.last_token_at.replace(now) {
                        self.metrics.record_inter_token_latency(now - prev);
                    }
                }
                Ok(convert::chunk_response(id, chunk))
            }
            EngineEvent::Finished(done) => {
                self.metrics
                    .record_finished(&done.timings, &done.usage, done.reason);
                let msg = convert::final_response(id, done, &self.worker_id);
                self.finish();
                Ok(msg)
            }
            EngineEvent::Failed(err) => {
                tracing::warn!(request_id = id, error = %err, "request failed in the engine");
                self.metrics.record_error(err.kind);
                self.finish();
                Err(err.into())
            }
        }
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
