//! The simulated engine's tokenizer and chat template, built in code so a simulated worker needs
//! no model file.
//!
//! A byte-level BPE with no merges: every byte of the text is one token, so any prompt encodes
//! losslessly (distinct prompts keep distinct token ids, which prefix-affinity routing and the
//! prefix cache depend on) and decoding restores the exact text. Prompts are therefore about
//! four times longer in tokens than with a real model's vocabulary. The special tokens mirror
//! the default model (SmolLM2, ChatML): `<|endoftext|>` = 0, `<|im_start|>` = 1,
//! `<|im_end|>` = 2 (EOS).

use serde_json::{json, Map, Value};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::Tokenizer;

use crate::model::ModelError;
use crate::text::chat_template::ChatTemplate;
use crate::text::gguf_tokenizer::special_added_token;

/// Special tokens, in id order.
const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
/// Id of `<|im_end|>`, the simulated model's end-of-sequence token.
pub const EOS_TOKEN_ID: u32 = 2;
/// ChatML, the template of the default model.
const CHATML: &str = "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
/// Characters the simulated model writes: lowercase letters and the space, so streamed text is
/// readable and never ends in a partial UTF-8 character.
const OUTPUT_ALPHABET: &str = "abcdefghijklmnopqrstuvwxyz ";

/// Builds the byte-level tokenizer: 3 special tokens, then the 256 byte tokens.
pub fn build_tokenizer() -> Result<Tokenizer, ModelError> {
    let mut bytes: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    bytes.sort_unstable();
    let vocab: Map<String, Value> = SPECIAL_TOKENS
        .iter()
        .map(|s| s.to_string())
        .chain(bytes.iter().map(char::to_string))
        .enumerate()
        .map(|(id, token)| (token, json!(id)))
        .collect();
    let added: Vec<Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(id, content)| special_added_token(id, content))
        .collect();
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                          "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    });
    Tokenizer::from_bytes(doc.to_string().as_bytes())
        .map_err(|e| ModelError::Tokenizer(format!("simulated tokenizer: {e}")))
}

/// The ChatML template the simulated model "was trained with".
pub fn chat_template() -> Result<ChatTemplate, ModelError> {
    ChatTemplate::new(
        CHATML.to_string(),
        String::new(),
        SPECIAL_TOKENS[EOS_TOKEN_ID as usize].to_string(),
    )
}

/// Token ids of [`OUTPUT_ALPHABET`], the only tokens the simulated model predicts besides EOS.
pub fn output_token_ids(tokenizer: &Tokenizer) -> Result<Vec<u32>, ModelError> {
    OUTPUT_ALPHABET
        .chars()
        .map(|c| {
            let enc = tokenizer
                .encode(c.to_string(), false)
                .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
            match enc.get_ids() {
                [id] => Ok(*id),
                ids => Err(ModelError::Tokenizer(format!(
                    "simulated tokenizer: `{c}` encodes to {ids:?}, expected one token"
                ))),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_and_specials_are_single_tokens() -> anyhow::Result<()> {
        let tok = build_tokenizer()?;
        assert_eq!(tok.get_vocab_size(true), 259);
        let text = "héllo <|im_end|> wörld";
        let enc = tok.encode(text, false).map_err(anyhow::Error::msg)?;
        assert!(enc.get_ids().contains(&EOS_TOKEN_ID));
        let decoded = tok
            .decode(enc.get_ids(), false)
            .map_err(anyhow::Error::msg)?;
        assert_eq!(decoded, text);
        // One token per byte outside the special token.
        let plain = tok.encode("héllo", false).map_err(anyhow::Error::msg)?;
        assert_eq!(plain.get_ids().len(), "héllo".len());
        Ok(())
    }

    #[test]
    fn output_alphabet_excludes_eos() -> anyhow::Result<()> {
        let tok = build_tokenizer()?;
        let ids = output_token_ids(&tok)?;
        assert_eq!(ids.len(), OUTPUT_ALPHABET.len());
        assert!(!ids.contains(&EOS_TOKEN_ID));
        let text = tok.decode(&ids, false).map_err(anyhow::Error::msg)?;
        assert_eq!(text, OUTPUT_ALPHABET);
        Ok(())
    }
}
