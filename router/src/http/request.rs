//! OpenAI request bodies (`/v1/completions`, `/v1/chat/completions`) and their translation into
//! one `orchard.v1.GenerateRequest`.
//!
//! This module only changes the shape of a request. Whether a value is acceptable (ranges,
//! lengths, known model) is decided by the `Orchard` service, so HTTP and gRPC clients get the
//! same answers; the checks here are about OpenAI parameters that have no Orchard equivalent
//! (`n` > 1, `echo`, tools, ...), which must be refused rather than silently ignored.

use orchard_proto::v1 as pb;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::error::ApiError;

/// Parameters OpenAI clients commonly send that do not change the output; accepted and ignored.
const IGNORED_PARAMS: &[&str] = &["user", "metadata", "store", "service_tier"];

/// `stop`: one string or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `stream_options` of a streamed request.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct StreamOptions {
    /// Adds a last chunk (empty `choices`) carrying `usage`.
    #[serde(default)]
    pub include_usage: bool,
}

/// `logprobs`: an integer on `/v1/completions` (alternatives per token), a boolean on
/// `/v1/chat/completions` (alternatives then come from `top_logprobs`).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
pub enum LogprobsParam {
    Flag(bool),
    Count(u32),
}

/// Which endpoint a body was posted to; decides how `prompt`/`messages` and `logprobs` read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    ChatCompletions,
}

/// Body of `POST /v1/completions` and `POST /v1/chat/completions`.
///
/// One struct for both because they share almost every parameter, and every field is declared
/// directly (not flattened) so that a wrongly typed value is reported with its name.
#[derive(Debug, Clone, Deserialize)]
pub struct OpenAiRequest {
    pub model: String,
    /// Completions input.
    pub prompt: Option<Prompt>,
    /// Chat input; the worker renders the model's chat template.
    pub messages: Option<Vec<ChatMessageIn>>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// Deprecated for chat by OpenAI in favour of `max_completion_tokens`, still widely sent.
    pub max_tokens: Option<u32>,
    /// Chat only; wins over `max_tokens` when both are set.
    pub max_completion_tokens: Option<u32>,
    pub logprobs: Option<LogprobsParam>,
    /// Chat only: alternatives per token; needs `logprobs: true`.
    pub top_logprobs: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// vLLM convention: -1 (or 0) disables top-k.
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    /// Number of choices; Orchard generates exactly one.
    pub n: Option<u32>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<u32>,
    pub stop_token_ids: Option<Vec<u32>>,
    /// Everything else the client sent; refused unless harmless (see [`check_extra`]).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The endpoint-specific values that complete the sampling parameters.
#[derive(Debug, Clone, Copy, Default)]
struct EndpointLimits {
    max_tokens: Option<u32>,
    /// Top alternatives per token; `None` = no logprobs.
    logprobs: Option<u32>,
}

impl OpenAiRequest {
    /// The service request for `endpoint`, under `request_id`.
    pub fn to_generate(
        &self,
        endpoint: Endpoint,
        request_id: &str,
    ) -> Result<pb::GenerateRequest, ApiError> {
        check_extra(&self.extra)?;
        let (input, limits) = match endpoint {
            Endpoint::Completions => self.completion_input()?,
            Endpoint::ChatCompletions => self.chat_input()?,
        };
        Ok(pb::GenerateRequest {
            request_id: request_id.to_string(),
            model: self.model.clone(),
            input: Some(input),
            sampling: Some(self.sampling(limits)?),
        })
    }

    fn completion_input(&self) -> Result<(pb::generate_request::Input, EndpointLimits), ApiError> {
        let elsewhere = "is a /v1/chat/completions parameter";
        if self.messages.is_some() {
            return Err(not_here("messages", elsewhere));
        }
        if self.max_completion_tokens.is_some() {
            return Err(not_here("max_completion_tokens", elsewhere));
        }
        if self.top_logprobs.is_some() {
            return Err(not_here("top_logprobs", elsewhere));
        }
        let logprobs = match self.logprobs {
            None => None,
            Some(LogprobsParam::Count(n)) => Some(n),
            Some(LogprobsParam::Flag(_)) => {
                return Err(ApiError::invalid_param(
                    "logprobs",
                    "logprobs: must be an integer (alternatives per token) on /v1/completions",
                ))
            }
        };
        let prompt = self
            .prompt
            .clone()
            .ok_or_else(|| ApiError::invalid_param("prompt", "prompt: required"))?;
        let limits = EndpointLimits {
            max_tokens: self.max_tokens,
            logprobs,
        };
        Ok((prompt.into_input()?, limits))
    }

    fn chat_input(&self) -> Result<(pb::generate_request::Input, EndpointLimits), ApiError> {
        if self.prompt.is_some() {
            return Err(not_here("prompt", "is a /v1/completions parameter"));
        }
        let logprobs = match (self.logprobs, self.top_logprobs) {
            (Some(LogprobsParam::Flag(true)), top) => Some(top.unwrap_or(0)),
            (None | Some(LogprobsParam::Flag(false)), None) => None,
            (None | Some(LogprobsParam::Flag(false)), Some(_)) => {
                return Err(ApiError::invalid_param(
                    "top_logprobs",
                    "top_logprobs: requires logprobs to be true",
                ))
            }
            (Some(LogprobsParam::Count(_)), _) => {
                return Err(ApiError::invalid_param(
                    "logprobs",
                    "logprobs: must be a boolean on /v1/chat/completions (see top_logprobs)",
                ))
            }
        };
        let messages = self
            .messages
            .as_ref()
            .ok_or_else(|| ApiError::invalid_param("messages", "messages: required"))?
            .iter()
            .map(ChatMessageIn::to_proto)
            .collect::<Result<Vec<_>, _>>()?;
        let limits = EndpointLimits {
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            logprobs,
        };
        let input = pb::generate_request::Input::Chat(pb::ChatMessages { messages });
        Ok((input, limits))
    }

    /// The `orchard.v1` form; unset fields stay unset so the service applies its defaults.
    fn sampling(&self, limits: EndpointLimits) -> Result<pb::SamplingParams, ApiError> {
        if let Some(n) = self.n.filter(|&n| n != 1) {
            return Err(ApiError::invalid_param(
                "n",
                format!("n: only 1 choice per request is supported, got {n}"),
            ));
        }
        let top_k = match self.top_k {
            None | Some(-1) => 0,
            Some(k) => u32::try_from(k).map_err(|_| {
                ApiError::invalid_param("top_k", format!("top_k: must be -1 or >= 0, got {k}"))
            })?,
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        Ok(pb::SamplingParams {
            temperature: self.temperature,
            top_k,
            top_p: self.top_p,
            min_p: self.min_p.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            seed: self.seed,
            max_tokens: limits.max_tokens,
            min_tokens: self.min_tokens.unwrap_or(0),
            ignore_eos: self.ignore_eos.unwrap_or(false),
            stop,
            stop_token_ids: self.stop_token_ids.clone().unwrap_or_default(),
            logprobs: limits.logprobs,
        })
    }
}

fn not_here(param: &str, elsewhere: &str) -> ApiError {
    ApiError::invalid_param(param, format!("{param}: {elsewhere}"))
}

/// `prompt` of `/v1/completions`: text or token ids, alone or as a batch of one.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<u32>>),
}

impl Prompt {
    fn into_input(self) -> Result<pb::generate_request::Input, ApiError> {
        use pb::generate_request::Input;
        let batch = |len: usize| {
            ApiError::invalid_param(
                "prompt",
                format!("prompt: only one prompt per request is supported, got {len}"),
            )
        };
        match self {
            Self::Text(text) => Ok(Input::Prompt(text)),
            Self::Tokens(ids) => Ok(Input::PromptTokenIds(pb::TokenIds { ids })),
            Self::Texts(mut texts) if texts.len() == 1 => Ok(Input::Prompt(texts.remove(0))),
            Self::Texts(texts) => Err(batch(texts.len())),
            Self::TokenLists(mut lists) if lists.len() == 1 => {
                Ok(Input::PromptTokenIds(pb::TokenIds {
                    ids: lists.remove(0),
                }))
            }
            Self::TokenLists(lists) => Err(batch(lists.len())),
        }
    }
}

/// One part of a multi-part message `content`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    Text {
        text: String,
    },
    /// Images, audio, files: not supported by Orchard's text models.
    #[serde(other)]
    Other,
}

/// `content` of a chat message: a string or a list of parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One message of `messages`; fields other than role and content (e.g. `name`) are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    /// Null for an assistant turn that only carried tool calls.
    pub content: Option<MessageContent>,
}

impl ChatMessageIn {
    fn to_proto(&self) -> Result<pb::ChatMessage, ApiError> {
        let content = match &self.content {
            None => String::new(),
            Some(MessageContent::Text(text)) => text.clone(),
            Some(MessageContent::Parts(parts)) => {
                let mut text = String::new();
                for part in parts {
                    match part {
                        ContentPart::Text { text: t } => text.push_str(t),
                        ContentPart::Other => {
                            return Err(ApiError::invalid_param(
                                "messages",
                                "messages: only text content parts are supported",
                            ))
                        }
                    }
                }
                text
            }
        };
        Ok(pb::ChatMessage {
            role: self.role.clone(),
            content,
        })
    }
}

/// Refuses parameters Orchard does not implement, naming the first one, unless the value is a
/// no-op (null, false, empty) or the parameter is harmless metadata ([`IGNORED_PARAMS`]).
/// Silently ignoring `logit_bias`, `tools` or `echo` would return output the client did not
/// ask for.
fn check_extra(extra: &Map<String, Value>) -> Result<(), ApiError> {
    let is_noop = |v: &Value| match v {
        Value::Null | Value::Bool(false) => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Bool(true) | Value::Number(_) => false,
    };
    let mut unsupported = extra
        .iter()
        .filter(|(k, v)| !IGNORED_PARAMS.contains(&k.as_str()) && !is_noop(v))
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>();
    unsupported.sort_unstable();
    match unsupported.first() {
        None => Ok(()),
        Some(name) => Err(ApiError::invalid_param(
            name,
            format!("{name}: parameter is not supported by Orchard"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(value: Value) -> OpenAiRequest {
        serde_json::from_value(value).expect("test body deserializes")
    }

    fn chat(value: Value) -> Result<pb::GenerateRequest, ApiError> {
        body(value).to_generate(Endpoint::ChatCompletions, "r")
    }

    fn completion(value: Value) -> Result<pb::GenerateRequest, ApiError> {
        body(value).to_generate(Endpoint::Completions, "r")
    }

    fn param(result: Result<pb::GenerateRequest, ApiError>) -> Option<String> {
        result.err().and_then(|e| e.param)
    }

    #[test]
    fn unsupported_parameters_are_named_and_harmless_ones_pass() {
        let ok = chat(serde_json::json!({
            "model": "m", "messages": [], "user": "u1", "logit_bias": null, "echo": false
        }));
        assert!(ok.is_ok());
        let tools = chat(serde_json::json!({
            "model": "m", "messages": [], "tools": [{"type": "function"}]
        }));
        assert_eq!(param(tools).as_deref(), Some("tools"));
    }

    #[test]
    fn max_completion_tokens_wins_and_top_logprobs_needs_logprobs() {
        let req = chat(serde_json::json!({
            "model": "m", "messages": [], "max_tokens": 5, "max_completion_tokens": 9,
            "logprobs": true, "top_logprobs": 3
        }));
        let sampling = req.unwrap().sampling.unwrap();
        assert_eq!(sampling.max_tokens, Some(9));
        assert_eq!(sampling.logprobs, Some(3));
        let req = chat(serde_json::json!({"model": "m", "messages": [], "top_logprobs": 3}));
        assert_eq!(param(req).as_deref(), Some("top_logprobs"));
    }

    #[test]
    fn each_endpoint_refuses_the_other_ones_input_and_logprobs_form() {
        let req = completion(serde_json::json!({"model": "m", "messages": []}));
        assert_eq!(param(req).as_deref(), Some("messages"));
        let req = chat(serde_json::json!({"model": "m", "prompt": "hi"}));
        assert_eq!(param(req).as_deref(), Some("prompt"));
        let req = completion(serde_json::json!({"model": "m", "prompt": "hi", "logprobs": true}));
        assert_eq!(param(req).as_deref(), Some("logprobs"));
        let req = chat(serde_json::json!({"model": "m", "messages": [], "logprobs": 2}));
        assert_eq!(param(req).as_deref(), Some("logprobs"));
        let req = completion(serde_json::json!({"model": "m"}));
        assert_eq!(param(req).as_deref(), Some("prompt"));
    }

    #[test]
    fn prompt_batches_of_one_are_accepted_and_larger_ones_refused() {
        let one = completion(serde_json::json!({"model": "m", "prompt": [[1, 2, 3]]}));
        assert_eq!(
            one.unwrap().input,
            Some(pb::generate_request::Input::PromptTokenIds(pb::TokenIds {
                ids: vec![1, 2, 3]
            }))
        );
        let two = completion(serde_json::json!({"model": "m", "prompt": ["a", "b"]}));
        assert_eq!(param(two).as_deref(), Some("prompt"));
    }
}
