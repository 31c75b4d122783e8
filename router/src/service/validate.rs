//! Request validation at the router: everything that can be judged without a worker is
//! rejected here with INVALID_ARGUMENT naming the field, before any worker is touched.

use orchard_common::{OrchardError, SamplingParams};
use orchard_proto::v1 as pb;
use orchard_proto::v1::generate_request::Input;

/// Checks the input and sampling parameters of a generate request.
pub fn validate_generate(req: &pb::GenerateRequest) -> Result<(), OrchardError> {
    match &req.input {
        None => {
            return Err(OrchardError::invalid(
                "input: one of prompt, prompt_token_ids or chat is required",
            ))
        }
        Some(Input::Prompt(p)) if p.is_empty() => {
            return Err(OrchardError::invalid("prompt: must not be empty"))
        }
        Some(Input::PromptTokenIds(t)) if t.ids.is_empty() => {
            return Err(OrchardError::invalid("prompt_token_ids: must not be empty"))
        }
        Some(Input::Chat(c)) => validate_chat(c)?,
        Some(_) => {}
    }
    let params = req
        .sampling
        .as_ref()
        .map(SamplingParams::from)
        .unwrap_or_default();
    params.validate()
}

fn validate_chat(chat: &pb::ChatMessages) -> Result<(), OrchardError> {
    if chat.messages.is_empty() {
        return Err(OrchardError::invalid(
            "chat: must contain at least one message",
        ));
    }
    for (i, m) in chat.messages.iter().enumerate() {
        if m.role.trim().is_empty() {
            return Err(OrchardError::invalid(format!(
                "chat.messages[{i}].role: must not be empty"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_input(input: Option<Input>) -> pb::GenerateRequest {
        pb::GenerateRequest {
            input,
            ..Default::default()
        }
    }

    #[test]
    fn empty_inputs_are_named() {
        let cases = [
            (None, "input"),
            (Some(Input::Prompt(String::new())), "prompt"),
            (
                Some(Input::PromptTokenIds(pb::TokenIds { ids: vec![] })),
                "prompt_token_ids",
            ),
            (
                Some(Input::Chat(pb::ChatMessages { messages: vec![] })),
                "chat",
            ),
        ];
        for (input, name) in cases {
            let err = validate_generate(&with_input(input)).unwrap_err();
            assert_eq!(err.kind, orchard_common::ErrorKind::InvalidArgument);
            assert!(err.message.starts_with(name), "{name}: {}", err.message);
        }
    }

    #[test]
    fn sampling_errors_name_the_parameter() {
        let mut req = with_input(Some(Input::Prompt("hi".into())));
        req.sampling = Some(pb::SamplingParams {
            temperature: Some(-1.0),
            ..Default::default()
        });
        let err = validate_generate(&req).unwrap_err();
        assert!(err.message.contains("temperature"), "{}", err.message);
        req.sampling = None;
        assert!(validate_generate(&req).is_ok());
    }
}
