//! Request input (`prompt` text, `prompt_token_ids` or `chat` messages) to prompt token ids.
//!
//! Checks that need the field name live here, where the field is known, so a client learns
//! which part of its request was wrong.

use orchard_common::OrchardError;
use orchard_proto::v1 as pb;

use crate::text::chat_template::Message;
use crate::text::frontend::TextFrontend;

/// The input of a request, whichever RPC carried it.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    Prompt(&'a str),
    TokenIds(&'a [u32]),
    Chat(&'a [pb::ChatMessage]),
}

impl<'a> Input<'a> {
    /// The input of a `GenerateRequest`; a request without one is invalid.
    pub fn of_generate(req: &'a pb::GenerateRequest) -> Result<Self, OrchardError> {
        use pb::generate_request::Input as I;
        match &req.input {
            Some(I::Prompt(text)) => Ok(Self::Prompt(text)),
            Some(I::PromptTokenIds(ids)) => Ok(Self::TokenIds(&ids.ids)),
            Some(I::Chat(chat)) => Ok(Self::Chat(&chat.messages)),
            None => Err(missing()),
        }
    }

    /// The input of a `TokenizeRequest`.
    pub fn of_tokenize(req: &'a pb::TokenizeRequest) -> Result<Self, OrchardError> {
        use pb::tokenize_request::Input as I;
        match &req.input {
            Some(I::Prompt(text)) => Ok(Self::Prompt(text)),
            Some(I::Chat(chat)) => Ok(Self::Chat(&chat.messages)),
            None => Err(missing()),
        }
    }

    /// The request's field name, for error messages.
    fn field(&self) -> &'static str {
        match self {
            Self::Prompt(_) => "prompt",
            Self::TokenIds(_) => "prompt_token_ids",
            Self::Chat(_) => "chat",
        }
    }
}

fn missing() -> OrchardError {
    OrchardError::invalid("input: one of prompt, prompt_token_ids or chat is required")
}

/// Prompt token ids for generation: [`token_ids`], and an input that yields no tokens is
/// invalid (the error names the input field).
pub fn prompt_token_ids(
    frontend: &TextFrontend,
    input: Input<'_>,
    vocab_size: u32,
) -> Result<Vec<u32>, OrchardError> {
    let ids = token_ids(frontend, input, vocab_size)?;
    if ids.is_empty() {
        return Err(OrchardError::invalid(format!(
            "{}: the prompt must not be empty",
            input.field()
        )));
    }
    Ok(ids)
}

/// Token ids of `input`: text is encoded, chat is rendered with the model's chat template
/// first, ids are checked against the vocabulary.
pub fn token_ids(
    frontend: &TextFrontend,
    input: Input<'_>,
    vocab_size: u32,
) -> Result<Vec<u32>, OrchardError> {
    Ok(match input {
        Input::Prompt(text) => frontend.encode_prompt(text)?,
        Input::TokenIds(ids) => {
            if let Some(bad) = ids.iter().find(|&&id| id >= vocab_size) {
                return Err(OrchardError::invalid(format!(
                    "prompt_token_ids: id {bad} is outside the vocabulary of {vocab_size}"
                )));
            }
            ids.to_vec()
        }
        Input::Chat(messages) => {
            if messages.is_empty() {
                return Err(OrchardError::invalid(
                    "chat: at least one message is required",
                ));
            }
            let messages: Vec<Message> = messages
                .iter()
                .map(|m| Message {
                    role: m.role.clone(),
                    content: m.content.clone(),
                })
                .collect();
            frontend.encode_chat(&messages)?
        }
    })
}
