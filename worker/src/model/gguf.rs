//! Opening a GGUF file: parsed metadata plus a reader for its tensors.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::Device;

use super::{Llama, ModelError};

/// A GGUF model file's metadata and weights.
pub struct GgufModel {
    pub content: gguf_file::Content,
    pub model: Llama,
}

/// Loads a Llama-family model from a `.gguf` file.
pub fn load(path: &Path, device: &Device) -> Result<GgufModel, ModelError> {
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut reader = BufReader::new(File::open(path).map_err(io)?);
    let content = gguf_file::Content::read(&mut reader)?;
    let model = Llama::from_gguf(&content, &mut reader, device)?;
    Ok(GgufModel { content, model })
}

/// Where `deploy/fetch-model.sh` puts the default model (SmolLM2-135M-Instruct, Q4_1):
/// `$ORCHARD_CACHE/models/…`, with `ORCHARD_CACHE` defaulting to `~/.cache/orchard`.
pub fn default_model_path() -> std::path::PathBuf {
    let cache = std::env::var_os("ORCHARD_CACHE")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/orchard")))
        .unwrap_or_else(|| ".cache/orchard".into());
    cache.join("models").join(DEFAULT_MODEL_FILE)
}

/// File name of the default model.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
