//! Builds a `tokenizers::Tokenizer` from the tokenizer stored in GGUF metadata
//! (`tokenizer.ggml.*`), so a single `.gguf` file is a complete model.
//!
//! Supported: `gpt2`-style byte-level BPE (SmolLM, Qwen, Llama 3). The tokenizer is described
//! as a `tokenizer.json` document and parsed by `tokenizers`, exactly as if the model had
//! shipped one.

use candle_core::quantized::gguf_file;
use serde_json::{json, Value};
use tokenizers::Tokenizer;

use crate::model::ModelError;

/// GGUF token type of control tokens (`<|im_start|>` and friends).
const TOKEN_TYPE_CONTROL: i32 = 3;

/// Special token ids named in the metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokenIds {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
}

fn string_list(ct: &gguf_file::Content, key: &str) -> Result<Vec<String>, ModelError> {
    let value = ct
        .metadata
        .get(key)
        .ok_or_else(|| ModelError::MissingMetadata(key.to_string()))?;
    value
        .to_vec()?
        .iter()
        .map(|v| Ok(v.to_string()?.clone()))
        .collect()
}

/// The ids of BOS and EOS, where the metadata names them.
pub fn special_tokens(ct: &gguf_file::Content) -> SpecialTokenIds {
    let id = |key: &str| ct.metadata.get(key).and_then(|v| v.to_u32().ok());
    SpecialTokenIds {
        bos: id("tokenizer.ggml.bos_token_id"),
        eos: id("tokenizer.ggml.eos_token_id"),
    }
}

/// The chat template stored with the model, if any.
pub fn chat_template(ct: &gguf_file::Content) -> Option<String> {
    ct.metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
        .cloned()
}

/// One `added_tokens` entry of a `tokenizer.json` for a special (control) token, matched
/// whole and never split; shared by every tokenizer Orchard builds in code.
pub(crate) fn special_added_token(id: usize, content: &str) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false,
           "rstrip": false, "normalized": false, "special": true})
}

/// Builds the tokenizer described by the GGUF metadata.
pub fn from_gguf(ct: &gguf_file::Content) -> Result<Tokenizer, ModelError> {
    let kind = crate::model::config::metadata_string(ct, "tokenizer.ggml.model")?;
    if kind != "gpt2" {
        return Err(ModelError::Unsupported(format!(
            "GGUF tokenizer model `{kind}` (only byte-level BPE `gpt2` is built from metadata; \
             pass a tokenizer.json instead)"
        )));
    }
    let tokens = string_list(ct, "tokenizer.ggml.tokens")?;
    let merges = string_list(ct, "tokenizer.ggml.merges")?;
    let types: Vec<i32> = match ct.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()?
            .iter()
            .map(|t| t.to_i32().unwrap_or(1))
            .collect(),
        None => Vec::new(),
    };
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types.get(*i) == Some(&TOKEN_TYPE_CONTROL))
        .map(|(i, t)| special_added_token(i, t))
        .collect();
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    });
    Tokenizer::from_bytes(doc.to_string().as_bytes())
        .map_err(|e| ModelError::Tokenizer(e.to_string()))
}
