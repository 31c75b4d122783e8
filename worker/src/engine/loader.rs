//! Builds the real engine from a worker config: the GGUF model, a KV store sized for the block
//! pool, the tokenizer and chat template from the model's metadata.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Device;
use orchard_common::config::{DeviceKind, WorkerConfig};
use tokenizers::Tokenizer;

use super::runner::LlamaRunner;
use super::{EngineError, EngineParts};
use crate::model::gguf::{self, default_model_path};
use crate::model::{KvStore, KvStoreConfig, LlamaConfig};
use crate::text::chat_template::ChatTemplate;
use crate::text::frontend::TextFrontend;
use crate::text::gguf_tokenizer;

/// Loads the real model named by the worker config (GGUF via model::gguf::load), sizes the KV
/// store (num_kv_blocks or kv_cache_mb), builds the tokenizer and chat template from GGUF
/// metadata.
pub fn load_model(cfg: &WorkerConfig) -> Result<(EngineParts, TextFrontend), EngineError> {
    let path = model_path(cfg);
    if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
        return Err(EngineError::Config(format!(
            "model.path {}: only .gguf model files are supported",
            path.display()
        )));
    }
    let device = device(cfg.model.device)?;
    let loaded = gguf::load(&path, &device)?;
    let model_cfg = loaded.model.config().clone();
    let tokenizer = Arc::new(load_tokenizer(cfg, &loaded.content)?);
    let special = gguf_tokenizer::special_tokens(&loaded.content);
    let template = chat_template(&loaded.content, &tokenizer, &special)?;
    let num_kv_blocks = num_kv_blocks(cfg, &model_cfg)?;
    let kv = KvStore::new(KvStoreConfig {
        num_layers: model_cfg.num_layers,
        num_blocks: num_kv_blocks as usize,
        block_size: cfg.engine.block_size as usize,
        kv_dim: model_cfg.kv_dim(),
        dtype: cfg.engine.kv_cache_dtype,
    });
    let model_len = model_cfg.max_position_embeddings as u32;
    let max_model_len = cfg
        .engine
        .max_model_len
        .map_or(model_len, |l| l.min(model_len));
    let parts = EngineParts {
        runner: Box::new(LlamaRunner::new(loaded.model, kv, cfg.model.threads)?),
        tokenizer: Arc::clone(&tokenizer),
        eos_token_ids: special.eos.into_iter().collect(),
        config: cfg.engine.clone(),
        num_kv_blocks,
        max_model_len,
        model_name: model_name(cfg, &path),
    };
    Ok((parts, TextFrontend::new(tokenizer, template)))
}

/// The configured model file, or the default model in the Orchard cache.
fn model_path(cfg: &WorkerConfig) -> PathBuf {
    match cfg.model.path.as_os_str().is_empty() {
        true => default_model_path(),
        false => cfg.model.path.clone(),
    }
}

fn model_name(cfg: &WorkerConfig, path: &std::path::Path) -> String {
    cfg.model.name.clone().unwrap_or_else(|| {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    })
}

fn device(kind: DeviceKind) -> Result<Device, EngineError> {
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        #[cfg(feature = "metal")]
        DeviceKind::Metal => Ok(Device::new_metal(0).map_err(crate::model::ModelError::from)?),
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => Ok(Device::new_cuda(0).map_err(crate::model::ModelError::from)?),
        #[allow(unreachable_patterns)]
        other => Err(EngineError::Config(format!(
            "model.device {other:?} needs the matching cargo feature"
        ))),
    }
}

fn load_tokenizer(
    cfg: &WorkerConfig,
    content: &candle_core::quantized::gguf_file::Content,
) -> Result<Tokenizer, EngineError> {
    match &cfg.model.tokenizer {
        Some(path) => Tokenizer::from_file(path)
            .map_err(|e| EngineError::Config(format!("model.tokenizer {}: {e}", path.display()))),
        None => Ok(gguf_tokenizer::from_gguf(content)?),
    }
}

fn chat_template(
    content: &candle_core::quantized::gguf_file::Content,
    tokenizer: &Tokenizer,
    special: &gguf_tokenizer::SpecialTokenIds,
) -> Result<Option<ChatTemplate>, EngineError> {
    let Some(source) = gguf_tokenizer::chat_template(content) else {
        return Ok(None);
    };
    let text = |id: Option<u32>| {
        id.and_then(|i| tokenizer.id_to_token(i))
            .unwrap_or_default()
    };
    Ok(Some(ChatTemplate::new(
        source,
        text(special.bos),
        text(special.eos),
    )?))
}

/// `num_kv_blocks` when set, else as many blocks as `kv_cache_mb` holds for this model
/// (layers x kv_dim x block_size x K and V x the cache's element size).
fn num_kv_blocks(cfg: &WorkerConfig, model: &LlamaConfig) -> Result<u32, EngineError> {
    if let Some(n) = cfg.engine.num_kv_blocks {
        return Ok(n);
    }
    let bytes = cfg.engine.kv_cache_mb as usize * 1024 * 1024;
    let blocks = KvStore::blocks_for_bytes(
        bytes,
        model.num_layers,
        cfg.engine.block_size as usize,
        model.kv_dim(),
        cfg.engine.kv_cache_dtype,
    );
    match u32::try_from(blocks) {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(EngineError::Config(format!(
            "engine.kv_cache_mb {} does not hold a usable number of KV blocks ({blocks})",
            cfg.engine.kv_cache_mb
        ))),
    }
}
