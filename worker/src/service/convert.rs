//! Conversions between engine output and `orchard.v1` messages, kept apart from the RPC code
//! so each mapping is written (and tested) once.

use orchard_proto::v1 as pb;

use crate::engine::api::TokenLogprobs;
use crate::engine::{EngineInfo, Finished, LoadSnapshot, TokenChunk};

/// One streamed chunk: the tokens an engine step produced for the request and their text.
pub fn chunk_response(request_id: &str, chunk: TokenChunk) -> pb::GenerateResponse {
    pb::GenerateResponse {
        request_id: request_id.to_string(),
        token_ids: chunk.token_ids,
        text: chunk.text,
        logprobs: chunk.logprobs.into_iter().map(logprobs).collect(),
        r#final: None,
    }
}

/// The stream's last message: finish reason, usage and the engine's timings, tagged with the
/// id of this worker so a client behind a router knows who served it.
pub fn final_response(
    request_id: &str,
    finished: Finished,
    worker_id: &str,
) -> pb::GenerateResponse {
    let info = pb::FinalInfo {
        finish_reason: pb::FinishReason::from(finished.reason) as i32,
        usage: Some(finished.usage.into()),
        timings: Some(finished.timings.to_proto(worker_id)),
        stop_reason: finished.stop_reason.unwrap_or_default(),
    };
    pb::GenerateResponse {
        request_id: request_id.to_string(),
        r#final: Some(info),
        ..Default::default()
    }
}

fn logprobs(lp: TokenLogprobs) -> pb::Logprobs {
    pb::Logprobs {
        logprob: lp.logprob,
        top: lp
            .top
            .into_iter()
            .map(|t| pb::TokenLogprob {
                token_id: t.token_id,
                text: t.text,
                logprob: t.logprob,
            })
            .collect(),
    }
}

/// The engine's gauges as routers poll them: queue depth, KV usage and capacity
/// (`max_num_seqs`, `kv_blocks_total`) for load-aware policies, `block_size` for prefix affinity.
pub fn load_report(load: LoadSnapshot) -> pb::LoadReport {
    pb::LoadReport {
        running: load.running,
        waiting: load.waiting,
        kv_blocks_used: load.kv_blocks_used,
        kv_blocks_total: load.kv_blocks_total,
        max_num_seqs: load.max_num_seqs,
        prefix_cache_queries: load.prefix_cache_queries,
        prefix_cache_hits: load.prefix_cache_hits,
        preemptions: load.preemptions,
        block_size: load.block_size,
    }
}

/// Whether the served model renders chat input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatSupport {
    /// A chat template is loaded; `chat` input works.
    Template,
    /// No template; only `prompt` and `prompt_token_ids` input.
    None,
}

/// Static model facts for `GetModelInfo`.
pub fn model_info(info: &EngineInfo, chat: ChatSupport) -> pb::ModelInfo {
    pb::ModelInfo {
        id: info.model_name.clone(),
        context_length: info.max_model_len,
        vocab_size: info.vocab_size,
        chat: chat == ChatSupport::Template,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use orchard_common::{FinishReason, RequestTimings, Usage};

    use super::*;
    use crate::engine::api::TopLogprob;

    #[test]
    fn chunk_keeps_tokens_text_and_logprobs() {
        let chunk = TokenChunk {
            token_ids: vec![7, 8],
            text: "hi".into(),
            logprobs: vec![TokenLogprobs {
                logprob: -0.5,
                top: vec![TopLogprob {
                    token_id: 7,
                    text: "h".into(),
                    logprob: -0.5,
                }],
            }],
        };
        let msg = chunk_response("r1", chunk);
        assert_eq!(msg.request_id, "r1");
        assert_eq!(msg.token_ids, vec![7, 8]);
        assert_eq!(msg.text, "hi");
        assert_eq!(msg.logprobs[0].top[0].token_id, 7);
        assert!(msg.r#final.is_none());
    }

    #[test]
    fn final_carries_reason_usage_timings_and_worker() {
        let finished = Finished {
            reason: FinishReason::Stop,
            stop_reason: Some("</s>".into()),
            usage: Usage {
                prompt_tokens: 5,
                completion_tokens: 3,
                cached_tokens: 0,
            },
            timings: RequestTimings {
                ttft: Duration::from_millis(20),
                ..RequestTimings::default()
            },
        };
        let msg = final_response("r1", finished, "mini-3");
        let info = msg.r#final.unwrap_or_default();
        assert_eq!(info.finish_reason, pb::FinishReason::Stop as i32);
        assert_eq!(info.stop_reason, "</s>");
        assert_eq!(info.usage.map(|u| u.completion_tokens), Some(3));
        let timings = info.timings.unwrap_or_default();
        assert_eq!(timings.worker_id, "mini-3");
        assert!((timings.ttft_s - 0.02).abs() < 1e-9);
    }
}
