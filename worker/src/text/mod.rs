//! Text: tokenizer from GGUF metadata or tokenizer.json, chat templates, incremental detokenizer.

pub mod chat_template;
pub mod gguf_tokenizer;
