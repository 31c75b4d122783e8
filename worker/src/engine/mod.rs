//! The engine: scheduler, sequences, the step batch handed to the model, and the engine thread.
//!
//! Request flow: the async side calls [`EngineHandle::submit`]; the engine thread
//! ([`core`]) owns the [`scheduler::Scheduler`] (which owns the KV
//! [`crate::kv::BlockManager`]) and a [`runner::ModelRunner`]. Every step it schedules one
//! flattened [`batch::StepBatch`] (Orca iteration-level scheduling, vLLM v1 chunked prefill),
//! runs it, samples one token per finished prompt or decode, and streams
//! [`api::EngineEvent`]s back on each request's own channel.

pub mod api;
pub mod batch;
pub mod core;
pub mod handle;
pub mod loader;
mod request;
pub mod runner;
pub mod scheduler;
pub mod sequence;

use std::sync::Arc;

use orchard_common::config::EngineConfig;
use orchard_common::{ErrorKind, OrchardError};
use thiserror::Error;

pub use api::{EngineEvent, EngineRequest, Finished, LoadSnapshot, TokenChunk};
pub use handle::EngineHandle;
pub use loader::load_model;
pub use runner::{LlamaRunner, ModelRunner};

/// Everything the engine thread needs, built by [`loader::load_model`] for the real model or
/// by hand for the simulated engine and tests.
pub struct EngineParts {
    /// Runs the forward pass; owns the model and its paged KV store.
    pub runner: Box<dyn ModelRunner>,
    /// Detokenizes output and logprob alternatives.
    pub tokenizer: Arc<tokenizers::Tokenizer>,
    /// Tokens that end a request (unless `ignore_eos`).
    pub eos_token_ids: Vec<u32>,
    /// Scheduler limits and prefix-cache switch.
    pub config: EngineConfig,
    /// Size of the KV block pool; must match what the runner's KV store holds.
    pub num_kv_blocks: u32,
    /// Longest sequence (prompt + output) the engine accepts.
    pub max_model_len: u32,
    /// Name reported to clients and routers.
    pub model_name: String,
}

/// Static facts about a running engine, for `GetModelInfo` and admission checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineInfo {
    pub model_name: String,
    pub max_model_len: u32,
    pub vocab_size: u32,
    pub block_size: u32,
    pub num_kv_blocks: u32,
    pub max_num_seqs: u32,
    pub eos_token_ids: Vec<u32>,
}

/// Why the engine could not start, load a model, encode text or run a step. Each variant maps
/// to exactly one [`ErrorKind`].
#[derive(Debug, Error)]
pub enum EngineError {
    /// Loading or running the model failed.
    #[error("model: {0}")]
    Model(#[from] crate::model::ModelError),
    /// The KV block manager refused its configuration.
    #[error("kv cache: {0}")]
    Kv(#[from] crate::kv::KvError),
    /// The forward pass failed or returned a malformed result.
    #[error("model runner: {0}")]
    Runner(String),
    /// Input text could not be encoded or rendered with the chat template.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The configuration cannot describe a working engine (e.g. unsupported device).
    #[error("engine config: {0}")]
    Config(String),
    /// The engine thread could not be started.
    #[error("starting engine thread: {0}")]
    Spawn(#[from] std::io::Error),
}

impl EngineError {
    /// The one classification of this failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Tokenizer(_) => ErrorKind::InvalidArgument,
            Self::Model(_) | Self::Kv(_) | Self::Runner(_) | Self::Config(_) | Self::Spawn(_) => {
                ErrorKind::Internal
            }
        }
    }
}

impl From<EngineError> for OrchardError {
    fn from(e: EngineError) -> Self {
        OrchardError::new(e.kind(), e.to_string())
    }
}
