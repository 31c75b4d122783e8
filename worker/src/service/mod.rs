//! The worker's gRPC service (`orchard.v1.Worker`) over an [`EngineHandle`] and a
//! [`TextFrontend`]: turns requests into prompt token ids and validated sampling parameters,
//! submits them to the engine, and streams the engine's events back.
//!
//! The service exists before the model is loaded (so the server can answer health checks while
//! it loads); until [`WorkerService::install`] is called every RPC answers `UNAVAILABLE`.

pub mod convert;
pub mod input;
pub mod stream;

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use futures::Stream;
use orchard_common::metrics::{WorkerLoad, WorkerMetrics};
use orchard_common::telemetry::set_parent_from_metadata;
use orchard_common::{OrchardError, SamplingParams};
use orchard_proto::v1 as pb;
use orchard_proto::v1::worker_server::Worker;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::engine::{EngineHandle, EngineRequest};
use crate::text::frontend::TextFrontend;
use convert::ChatSupport;
use input::Input;
use stream::{GenerateStream, InFlight};

/// A started engine and the text front end that feeds it.
pub struct LoadedEngine {
    pub engine: EngineHandle,
    pub frontend: TextFrontend,
    /// Whether `chat` input can be rendered (the model has a chat template).
    pub chat: ChatSupport,
}

/// `orchard.v1.Worker` for one engine; cheap to clone (all clones share the engine).
#[derive(Clone)]
pub struct WorkerService {
    inner: Arc<Inner>,
}

struct Inner {
    /// Reported in every final message and in logs.
    worker_id: Arc<str>,
    /// Set once, when the model is loaded and warmed up.
    loaded: OnceLock<LoadedEngine>,
    in_flight: InFlight,
    /// Numbers requests that arrive without an id.
    next_id: AtomicU64,
    /// Request latencies, token counts, errors and engine gauges for Prometheus.
    metrics: Arc<WorkerMetrics>,
}

impl WorkerService {
    /// A service whose engine is still loading, recording into `metrics`.
    pub fn new(worker_id: &str, metrics: Arc<WorkerMetrics>) -> Self {
        Self {
            inner: Arc::new(Inner {
                worker_id: Arc::from(worker_id),
                loaded: OnceLock::new(),
                in_flight: InFlight::default(),
                next_id: AtomicU64::new(0),
                metrics,
            }),
        }
    }

    /// Publishes the engine's current gauges (running, waiting, KV blocks, prefix cache,
    /// preemptions) to the metrics; called before every `/metrics` scrape.
    pub fn refresh_load_metrics(&self) {
        if let Some(loaded) = self.inner.loaded.get() {
            let load = loaded.engine.load();
            self.inner.metrics.set_load(&WorkerLoad {
                running: load.running,
                waiting: load.waiting,
                kv_blocks_used: load.kv_blocks_used,
                kv_blocks_total: load.kv_blocks_total,
                prefix_cache_query_tokens: load.prefix_cache_queries,
                prefix_cache_hit_tokens: load.prefix_cache_hits,
                preemptions: load.preemptions,
            });
        }
    }

    /// Starts serving requests with `loaded`; hands it back if an engine was installed before.
    pub fn install(&self, loaded: LoadedEngine) -> Result<(), LoadedEngine> {
        self.inner.loaded.set(loaded)
    }

    fn loaded(&self) -> Result<&LoadedEngine, Status> {
        self.inner
            .loaded
            .get()
            .ok_or_else(|| Status::unavailable("the model is still loading"))
    }

    /// The request's own id, or a fresh one unique on this worker.
    fn request_id(&self, given: &str) -> String {
        match given.is_empty() {
            false => given.to_string(),
            true => {
                let n = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
                format!("{}-{n}", self.inner.worker_id)
            }
        }
    }
}

/// Sampling parameters of a request (defaults for an absent message), validated; the error
/// names the offending parameter.
pub fn sampling_params(sampling: Option<&pb::SamplingParams>) -> Result<SamplingParams, Status> {
    let params = sampling.map(SamplingParams::from).unwrap_or_default();
    params.validate()?;
    Ok(params)
}

/// The span of one `Generate` request, a child of the caller's span when the request carries
/// a W3C trace context (the router's `router.generate`), so router and worker share one
/// trace. It lives as long as the response stream, which records the engine's phases on it.
fn request_span(metadata: &tonic::metadata::MetadataMap) -> tracing::Span {
    let span = tracing::info_span!(
        "worker.generate",
        otel.kind = "server",
        request_id = tracing::field::Empty,
        prompt_tokens = tracing::field::Empty,
        completion_tokens = tracing::field::Empty,
        queue_s = tracing::field::Empty,
        prefill_s = tracing::field::Empty,
        ttft_s = tracing::field::Empty,
        decode_s = tracing::field::Empty,
        e2e_s = tracing::field::Empty,
    );
    set_parent_from_metadata(&span, metadata);
    span
}

/// The boxed response stream type of `Generate`.
pub type ResponseStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for WorkerService {
    type GenerateStream = ResponseStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let arrival = Instant::now();
        let span = request_span(request.metadata());
        let req = request.into_inner();
        let loaded = self.loaded()?;
        let params = sampling_params(req.sampling.as_ref())?;
        let vocab_size = loaded.engine.info().vocab_size;
        let prompt =
            input::prompt_token_ids(&loaded.frontend, Input::of_generate(&req)?, vocab_size)?;
        let id = self.request_id(&req.request_id);
        let guard = self.inner.in_flight.claim(&id).ok_or_else(|| {
            Status::from(OrchardError::invalid(format!(
                "request_id: `{id}` is already in flight on this worker"
            )))
        })?;
        let (events, receiver) = mpsc::unbounded_channel();
        span.record("request_id", id.as_str());
        span.record("prompt_tokens", prompt.len());
        tracing::debug!(parent: &span, request_id = %id, prompt_tokens = prompt.len(), "generate");
        loaded.engine.submit(EngineRequest {
            id,
            prompt_token_ids: prompt,
            params,
            arrival,
            events,
        })?;
        let stream = GenerateStream::new(
            receiver,
            guard,
            Arc::clone(&self.inner.worker_id),
            Arc::clone(&self.inner.metrics),
        )
        .traced(span);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn abort(
        &self,
        request: Request<pb::AbortRequest>,
    ) -> Result<Response<pb::AbortResponse>, Status> {
        let id = request.into_inner().request_id;
        let loaded = self.loaded()?;
        let found = self.inner.in_flight.contains(&id);
        if found {
            loaded.engine.abort(&id);
        }
        Ok(Response::new(pb::AbortResponse { found }))
    }

    async fn get_load(
        &self,
        _request: Request<pb::GetLoadRequest>,
    ) -> Result<Response<pb::LoadReport>, Status> {
        let loaded = self.loaded()?;
        Ok(Response::new(convert::load_report(loaded.engine.load())))
    }

    async fn get_model_info(
        &self,
        _request: Request<pb::GetModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        let loaded = self.loaded()?;
        Ok(Response::new(convert::model_info(
            loaded.engine.info(),
            loaded.chat,
        )))
    }

    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let req = request.into_inner();
        let loaded = self.loaded()?;
        let vocab_size = loaded.engine.info().vocab_size;
        let ids = input::token_ids(&loaded.frontend, Input::of_tokenize(&req)?, vocab_size)?;
        Ok(Response::new(pb::TokenizeResponse { ids }))
    }
}
