//! OpenAI response bodies and chunks, and the translation of `orchard.v1.GenerateResponse`
//! messages into them.
//!
//! Shapes follow OpenAI's API reference for completions, chat completions and their streamed
//! chunks; Orchard's per-request timings ride along as the extra `orchard_timings` field.

use orchard_proto::v1 as pb;
use serde::Serialize;
use serde_json::Map;

use super::error::ApiError;

/// `usage` of a response (or of the last streamed chunk).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct UsageBody {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// Breakdown of the prompt tokens.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from a worker's prefix cache.
    pub cached_tokens: u32,
}

impl From<&pb::Usage> for UsageBody {
    fn from(u: &pb::Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens.saturating_add(u.completion_tokens),
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: u.cached_tokens,
            },
        }
    }
}

/// `orchard_timings`: where the request's time went, in seconds, as measured by the worker
/// (queue, prefill, TTFT, TPOT, e2e) and the router (client-visible TTFT and e2e, retries).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TimingsBody {
    pub queue_s: f64,
    pub prefill_s: f64,
    pub ttft_s: f64,
    pub mean_tpot_s: f64,
    pub e2e_s: f64,
    pub worker_id: String,
    pub router_ttft_s: f64,
    pub router_e2e_s: f64,
    pub retries: u32,
}

impl From<&pb::Timings> for TimingsBody {
    fn from(t: &pb::Timings) -> Self {
        Self {
            queue_s: t.queue_s,
            prefill_s: t.prefill_s,
            ttft_s: t.ttft_s,
            mean_tpot_s: t.mean_tpot_s,
            e2e_s: t.e2e_s,
            worker_id: t.worker_id.clone(),
            router_ttft_s: t.router_ttft_s,
            router_e2e_s: t.router_e2e_s,
            retries: t.retries,
        }
    }
}

/// One generated token with its logprob and the top alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub text: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// How a request ended, from the stream's final message.
#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    /// OpenAI's `finish_reason`: `stop`, `length` (or vLLM's `abort`).
    pub reason: &'static str,
    pub usage: UsageBody,
    pub timings: Option<TimingsBody>,
}

/// The content of one `GenerateResponse`, independent of the endpoint's output shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub text: String,
    /// One entry per token when logprobs were requested, else empty.
    pub logprobs: Vec<TokenLogprob>,
    pub finish: Option<Finish>,
}

impl Piece {
    /// Reads one stream message; a final message reporting an engine failure is an error.
    pub fn from_response(resp: pb::GenerateResponse) -> Result<Self, ApiError> {
        let single_token_text = (resp.token_ids.len() == 1).then_some(resp.text.as_str());
        let logprobs = resp
            .logprobs
            .iter()
            .zip(&resp.token_ids)
            .map(|(lp, &id)| token_logprob(lp, id, single_token_text))
            .collect();
        let finish = resp.r#final.as_ref().map(finish).transpose()?;
        Ok(Self {
            text: resp.text,
            logprobs,
            finish,
        })
    }
}

/// The sampled token's text: from its entry among the alternatives, else the message's text
/// when the message holds just this token.
fn token_logprob(lp: &pb::Logprobs, id: u32, single_token_text: Option<&str>) -> TokenLogprob {
    let text = lp
        .top
        .iter()
        .find(|t| t.token_id == id)
        .map(|t| t.text.clone())
        .or_else(|| single_token_text.map(str::to_string))
        .unwrap_or_default();
    TokenLogprob {
        text,
        logprob: lp.logprob,
        top: lp.top.iter().map(|t| (t.text.clone(), t.logprob)).collect(),
    }
}

fn finish(info: &pb::FinalInfo) -> Result<Finish, ApiError> {
    let reason = match info.finish_reason() {
        pb::FinishReason::Stop => "stop",
        pb::FinishReason::Length => "length",
        pb::FinishReason::Abort => "abort",
        pb::FinishReason::Error => {
            return Err(ApiError::internal(
                "the worker failed while generating this request",
            ))
        }
        pb::FinishReason::Unspecified => {
            return Err(ApiError::internal(
                "the generation stream ended without a finish reason",
            ))
        }
    };
    Ok(Finish {
        reason,
        usage: UsageBody::from(&info.usage.unwrap_or_default()),
        timings: info.timings.as_ref().map(TimingsBody::from),
    })
}

/// Fields every response and chunk starts with.
#[derive(Debug, Clone, Serialize)]
pub struct Header {
    pub id: String,
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    pub model: String,
}

/// `/v1/completions` response, streamed chunk or whole (`object: "text_completion"` for both).
#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    #[serde(flatten)]
    pub header: Header,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageBody>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub orchard_timings: Option<TimingsBody>,
}

/// One choice of a completion.
#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// Legacy completions logprobs: parallel lists, one entry per token.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<Map<String, serde_json::Value>>,
    /// Character offset of each token in the completion text.
    pub text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    /// Appends `tokens`, the first of which starts at character `offset` of the completion.
    pub fn push(&mut self, tokens: &[TokenLogprob], mut offset: usize) {
        for t in tokens {
            self.tokens.push(t.text.clone());
            self.token_logprobs.push(t.logprob);
            self.top_logprobs.push(
                t.top
                    .iter()
                    .map(|(text, lp)| (text.clone(), serde_json::Value::from(*lp)))
                    .collect(),
            );
            self.text_offset.push(offset);
            offset += t.text.chars().count();
        }
    }
}

/// `/v1/chat/completions` non-streamed response.
#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletion {
    #[serde(flatten)]
    pub header: Header,
    pub choices: Vec<ChatChoice>,
    pub usage: UsageBody,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub orchard_timings: Option<TimingsBody>,
}

/// The assistant's answer.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    pub index: u32,
    pub message: ChatMessageOut,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: &'static str,
}

/// `message` of a chat choice.
#[derive(Debug, Clone, Serialize)]
pub struct ChatMessageOut {
    pub role: &'static str,
    pub content: String,
}

/// `/v1/chat/completions` streamed chunk (`object: "chat.completion.chunk"`).
#[derive(Debug, Clone, Serialize)]
pub struct ChatChunk {
    #[serde(flatten)]
    pub header: Header,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageBody>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub orchard_timings: Option<TimingsBody>,
}

/// One choice of a chat chunk.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// What a chat chunk adds: the role once (first chunk), then content.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// Chat logprobs: one entry per token.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

/// A token with its UTF-8 bytes, logprob and alternatives.
#[derive(Debug, Clone, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<ChatTopLogprob>,
}

/// One alternative of a chat token.
#[derive(Debug, Clone, Serialize)]
pub struct ChatTopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

impl ChatLogprobs {
    /// The chat form of `tokens`.
    pub fn from_tokens(tokens: &[TokenLogprob]) -> Self {
        let content = tokens
            .iter()
            .map(|t| ChatTokenLogprob {
                token: t.text.clone(),
                logprob: t.logprob,
                bytes: t.text.as_bytes().to_vec(),
                top_logprobs: t
                    .top
                    .iter()
                    .map(|(text, lp)| ChatTopLogprob {
                        token: text.clone(),
                        logprob: *lp,
                        bytes: text.as_bytes().to_vec(),
                    })
                    .collect(),
            })
            .collect();
        Self { content }
    }
}

/// `GET /v1/models` response.
#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

/// One served model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    /// Unknown to Orchard (models are files on workers); 0 as OpenAI's schema needs a number.
    pub created: u64,
    pub owned_by: &'static str,
    /// Context length in tokens (vLLM's field name).
    pub max_model_len: u32,
}

impl From<pb::ModelInfo> for ModelCard {
    fn from(m: pb::ModelInfo) -> Self {
        Self {
            id: m.id,
            object: "model",
            created: 0,
            owned_by: "orchard",
            max_model_len: m.context_length,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_final_engine_error_is_an_error_not_a_finish_reason() {
        let resp = pb::GenerateResponse {
            r#final: Some(pb::FinalInfo {
                finish_reason: pb::FinishReason::Error as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(Piece::from_response(resp).unwrap_err().status.as_u16(), 500);
    }

    #[test]
    fn completion_logprobs_offsets_count_characters() {
        let tok = |text: &str| TokenLogprob {
            text: text.into(),
            logprob: -1.0,
            top: vec![],
        };
        let mut lp = CompletionLogprobs::default();
        lp.push(&[tok("é"), tok("ab")], 3);
        lp.push(&[tok("c")], 6);
        assert_eq!(lp.text_offset, vec![3, 4, 6]);
        assert_eq!(lp.tokens, vec!["é", "ab", "c"]);
    }
}
