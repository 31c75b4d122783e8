//! Request input to prompt token ids: plain text, or chat messages rendered with the model's
//! chat template. Runs on the async side (the gRPC service) before a request is submitted, so
//! the engine thread never spends a step tokenizing.

use std::sync::Arc;

use tokenizers::Tokenizer;

use super::chat_template::{ChatTemplate, Message};
use crate::engine::EngineError;

/// Turns request input into prompt token ids (used by the gRPC service, before submit).
#[derive(Debug, Clone)]
pub struct TextFrontend {
    tokenizer: Arc<Tokenizer>,
    /// `None` when the model ships no template: chat requests are then refused.
    chat_template: Option<Arc<ChatTemplate>>,
}

impl TextFrontend {
    /// A frontend over the engine's tokenizer and the model's chat template.
    pub fn new(tokenizer: Arc<Tokenizer>, chat_template: Option<ChatTemplate>) -> Self {
        Self {
            tokenizer,
            chat_template: chat_template.map(Arc::new),
        }
    }

    /// The tokenizer shared with the engine (for the `Tokenize` RPC and decoding).
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// Encodes a raw prompt; special tokens the tokenizer's post-processor adds (BOS) are kept.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.encode(text, AddSpecial::Yes)
    }

    /// Renders messages with the model's chat template (generation prompt added) and encodes
    /// them. The template already writes BOS and turn markers, so nothing is added.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>, EngineError> {
        let Some(template) = &self.chat_template else {
            return Err(EngineError::Tokenizer(
                "the model has no chat template; send a plain prompt".into(),
            ));
        };
        let text = template
            .render(messages)
            .map_err(|e| EngineError::Tokenizer(format!("chat template: {e}")))?;
        self.encode(&text, AddSpecial::No)
    }

    fn encode(&self, text: &str, special: AddSpecial) -> Result<Vec<u32>, EngineError> {
        let encoding = self
            .tokenizer
            .encode(text, special == AddSpecial::Yes)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }
}

/// Whether the tokenizer's post-processor may add special tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AddSpecial {
    Yes,
    No,
}
