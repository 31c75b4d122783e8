//! The public `orchard.v1.Orchard` service: validate, (tokenize for prefix affinity), place
//! the request on a worker with retries, relay the stream.

use std::sync::Arc;
use std::time::{Duration, Instant};

use orchard_common::metrics::RouterMetrics;
use orchard_common::OrchardError;
use orchard_proto::v1 as pb;
use orchard_proto::v1::generate_request::Input;
use orchard_proto::v1::orchard_server::Orchard;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::relay::{open_with_retries, relay, Placement, RelayTarget};
use super::validate::validate_generate;
use crate::actors::{PromptTokens, RouterHandle};

/// Chunks buffered between the relay task and a slow client.
const RELAY_BUFFER: usize = 32;
/// Longest the router waits for a worker to tokenize a prompt for routing.
const TOKENIZE_TIMEOUT: Duration = Duration::from_secs(5);

/// The stream `Generate` returns: chunks, then either a final message or an error status.
pub type GenerateStream = ReceiverStream<Result<pb::GenerateResponse, Status>>;

/// The public service; cheap to clone, one per listener (gRPC, HTTP).
#[derive(Clone)]
pub struct OrchardService {
    router: RouterHandle,
    max_retries: u32,
    /// Client-side request metrics (TTFT, TPOT, errors, retries) for Prometheus.
    metrics: Arc<RouterMetrics>,
}

impl OrchardService {
    /// A service routing through `router`, retrying failures before the first token
    /// `max_retries` times on other workers, and recording into `metrics`.
    pub fn new(router: RouterHandle, max_retries: u32, metrics: Arc<RouterMetrics>) -> Self {
        Self {
            router,
            max_retries,
            metrics,
        }
    }

    /// Token ids the policy routes on: given ones as they are, text tokenized by a worker
    /// when the policy needs them. Routing without them is still correct, only less
    /// cache-friendly, so a tokenization failure does not fail the request.
    async fn routing_tokens(&self, req: &pb::GenerateRequest) -> Vec<u32> {
        let input = match &req.input {
            Some(Input::PromptTokenIds(t)) => return t.ids.clone(),
            _ if self.router.prompt_tokens() == PromptTokens::NotNeeded => return Vec::new(),
            Some(Input::Prompt(p)) => pb::tokenize_request::Input::Prompt(p.clone()),
            Some(Input::Chat(c)) => pb::tokenize_request::Input::Chat(c.clone()),
            None => return Vec::new(),
        };
        match self.tokenize(&req.model, input).await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::debug!(error = %e, "routing without prompt tokens");
                Vec::new()
            }
        }
    }

    async fn tokenize(
        &self,
        model: &str,
        input: pb::tokenize_request::Input,
    ) -> Result<Vec<u32>, OrchardError> {
        let mut client = self.router.any_client(model).await?;
        let request = pb::TokenizeRequest { input: Some(input) };
        let response = tokio::time::timeout(TOKENIZE_TIMEOUT, client.tokenize(request))
            .await
            .map_err(|_| OrchardError::unavailable("tokenize timed out"))??;
        Ok(response.into_inner().ids)
    }

    async fn start(
        &self,
        req: pb::GenerateRequest,
        arrival: Instant,
    ) -> Result<GenerateStream, OrchardError> {
        let started = self.place(req, arrival).await;
        if let Err(e) = &started {
            self.metrics.record_error(e.kind);
        }
        started
    }

    async fn place(
        &self,
        mut req: pb::GenerateRequest,
        arrival: Instant,
    ) -> Result<GenerateStream, OrchardError> {
        validate_generate(&req)?;
        if req.request_id.is_empty() {
            req.request_id = uuid::Uuid::new_v4().to_string();
        }
        tracing::Span::current().record("request_id", req.request_id.as_str());
        let prompt_token_ids = self.routing_tokens(&req).await;
        let opened = open_with_retries(Placement {
            router: &self.router,
            request: &req,
            prompt_token_ids,
            max_retries: self.max_retries,
            metrics: &self.metrics,
        })
        .await?;
        let (tx, rx) = mpsc::channel(RELAY_BUFFER);
        let target = RelayTarget {
            tx,
            arrival,
            accepted: Instant::now(),
            metrics: self.metrics.clone(),
        };
        tracing::Span::current().record("worker", opened.lease.worker_id.as_str());
        // The relay outlives this call; it stays in the request's span (and trace).
        tokio::spawn(relay(opened, target).instrument(tracing::Span::current()));
        Ok(ReceiverStream::new(rx))
    }
}

#[tonic::async_trait]
impl Orchard for OrchardService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        let arrival = Instant::now();
        // A child of the gRPC server span (itself the caller's child when it sent a trace
        // context); worker calls made inside it carry its context to the worker.
        let span = tracing::info_span!(
            "router.generate",
            request_id = tracing::field::Empty,
            worker = tracing::field::Empty,
        );
        let stream = self
            .start(request.into_inner(), arrival)
            .instrument(span)
            .await?;
        Ok(Response::new(stream))
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let models = self.router.list_models().await?;
        Ok(Response::new(pb::ListModelsResponse { models }))
    }
}
