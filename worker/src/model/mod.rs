//! Model code (candle style): Llama-family decoders from GGUF, with the paged KV store passed
//! into `forward` explicitly rather than hidden inside the layers, so one step can batch
//! sequences of different lengths.

pub mod attention;
pub mod config;
pub mod gguf;
pub mod kv_store;
pub mod linear;
pub mod llama;
pub mod safetensors;

pub use config::LlamaConfig;
pub use kv_store::{KvStore, KvStoreConfig};
pub use llama::Llama;

use thiserror::Error;

/// Why a model could not be loaded or run.
#[derive(Debug, Error)]
pub enum ModelError {
    #[error("reading model file {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("model metadata `{0}` is missing")]
    MissingMetadata(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
