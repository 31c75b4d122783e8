//! Orchard gRPC client: `Orchard.Generate` (server streaming). Each message's `token_ids`
//! count as that many tokens; the final message's usage and timings are recorded.

use orchard_proto::v1::generate_request::Input;
use orchard_proto::v1::orchard_client::OrchardClient;
use orchard_proto::v1::{
    FinalInfo, FinishReason, GenerateRequest, ListModelsRequest, SamplingParams,
};
use tonic::transport::{Channel, Endpoint};

use super::{ConnectOptions, RequestSpec};
use crate::error::RequestError;
use crate::metrics::{RequestRecord, ServerTimings, StreamClock};

/// A channel to an Orchard router (or worker: the stream shape is the same).
#[derive(Debug, Clone)]
pub struct GrpcClient {
    channel: Channel,
    model: String,
}

impl GrpcClient {
    /// Connects to `endpoint` (`http://HOST:PORT`) and checks it answers `ListModels`.
    pub(super) async fn connect(endpoint: &str, opts: &ConnectOptions) -> Result<Self, String> {
        let channel = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| e.to_string())?
            .connect_timeout(opts.connect_timeout)
            .connect()
            .await
            .map_err(|e| format!("{e} ({})", source_chain(&e)))?;
        OrchardClient::new(channel.clone())
            .list_models(ListModelsRequest {})
            .await
            .map_err(|s| format!("ListModels failed: {:?}: {}", s.code(), s.message()))?;
        Ok(Self {
            channel,
            model: opts.model.clone().unwrap_or_default(),
        })
    }

    /// The model requests name (empty = router default).
    pub(super) fn model(&self) -> &str {
        &self.model
    }

    /// Sends one request and times its stream.
    pub(super) async fn generate(&self, spec: &RequestSpec) -> Result<RequestRecord, RequestError> {
        let request = GenerateRequest {
            request_id: String::new(),
            model: self.model.clone(),
            input: Some(Input::Prompt(spec.prompt.clone())),
            sampling: Some(SamplingParams {
                temperature: Some(spec.temperature),
                max_tokens: Some(spec.max_tokens),
                ignore_eos: spec.ignore_eos,
                ..SamplingParams::default()
            }),
        };
        let mut client = OrchardClient::new(self.channel.clone());
        let mut clock = StreamClock::start();
        let mut stream = client
            .generate(request)
            .await
            .map_err(status_error)?
            .into_inner();
        let mut last: Option<FinalInfo> = None;
        while let Some(msg) = stream.message().await.map_err(status_error)? {
            clock.on_tokens(u32::try_from(msg.token_ids.len()).unwrap_or(u32::MAX));
            if msg.r#final.is_some() {
                last = msg.r#final;
            }
        }
        let mut record = clock.finish()?;
        if let Some(info) = last {
            apply_final(&mut record, info)?;
        }
        Ok(record)
    }
}

/// Copies the final message's usage, finish reason and timings into the record. A final
/// message that reports an error fails the request.
fn apply_final(record: &mut RequestRecord, info: FinalInfo) -> Result<(), RequestError> {
    let reason = FinishReason::try_from(info.finish_reason).unwrap_or(FinishReason::Unspecified);
    if reason == FinishReason::Error {
        return Err(RequestError::Protocol(format!(
            "server finished with an error: {}",
            info.stop_reason
        )));
    }
    record.finish_reason = Some(reason.as_str_name().to_owned());
    if let Some(usage) = info.usage {
        record.prompt_tokens = Some(usage.prompt_tokens);
        record.cached_tokens = Some(usage.cached_tokens);
    }
    record.server = info.timings.map(|t| ServerTimings {
        queue_s: t.queue_s,
        prefill_s: t.prefill_s,
        ttft_s: t.ttft_s,
        mean_tpot_s: t.mean_tpot_s,
        e2e_s: t.e2e_s,
        worker_id: t.worker_id,
        router_ttft_s: t.router_ttft_s,
        router_e2e_s: t.router_e2e_s,
        retries: t.retries,
    });
    Ok(())
}

fn status_error(status: tonic::Status) -> RequestError {
    RequestError::Grpc {
        code: format!("{:?}", status.code()),
        message: status.message().to_owned(),
    }
}

/// The innermost cause of a transport error ("Connection refused"), which tonic's own
/// message ("transport error") leaves out.
fn source_chain(err: &dyn std::error::Error) -> String {
    let mut cause = err.source();
    let mut last = err.to_string();
    while let Some(c) = cause {
        last = c.to_string();
        cause = c.source();
    }
    last
}
