//! Configuration of the worker and the router: TOML file, then `ORCHARD_...` environment
//! variables (`__` separates nesting, e.g. `ORCHARD_ENGINE__MAX_NUM_SEQS=8`), then defaults;
//! finally `validate()`, whose errors name the offending key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Prefix of the environment variables that override config keys.
pub const ENV_PREFIX: &str = "ORCHARD";

/// A configuration that cannot be used; the message names the key.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("config: {0}")]
    Load(#[from] config::ConfigError),
    #[error("config key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

impl ConfigError {
    fn invalid(key: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            key,
            message: message.into(),
        }
    }
}

/// Loads `T` from an optional TOML file plus the environment, then validates it.
pub fn load<T: DeserializeOwned + Validate>(file: Option<&Path>) -> Result<T, ConfigError> {
    let mut builder = config::Config::builder();
    if let Some(path) = file {
        builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
    }
    builder = builder.add_source(
        config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true),
    );
    let cfg: T = builder.build()?.try_deserialize()?;
    cfg.validate()?;
    Ok(cfg)
}

/// Semantic checks that serde cannot express.
pub trait Validate {
    fn validate(&self) -> Result<(), ConfigError>;
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Logging, metrics and tracing settings shared by both processes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `tracing` filter directive, e.g. `info,orchard_worker=debug`.
    pub log_level: String,
    pub log_format: LogFormat,
    /// OTLP/gRPC endpoint for traces (e.g. `http://127.0.0.1:4317`); off when unset.
    pub otlp_endpoint: Option<String>,
    /// Address of the Prometheus `/metrics` endpoint; off when unset.
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_level: "info".into(),
            log_format: LogFormat::Text,
            otlp_endpoint: None,
            metrics_listen: None,
        }
    }
}

/// Compute device for the engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    #[default]
    Cpu,
    /// Apple GPU (needs the `metal` feature).
    Metal,
    /// NVIDIA GPU (needs the `cuda` feature).
    Cuda,
}

/// Which model a worker serves.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// A `.gguf` file or a safetensors directory (config.json + tokenizer.json).
    /// Empty = the default model in the Orchard cache folder.
    pub path: PathBuf,
    /// Name clients use in `model`; defaults to the file or directory stem.
    pub name: Option<String>,
    /// Overrides the tokenizer (a `tokenizer.json`) found with the model.
    pub tokenizer: Option<PathBuf>,
    pub device: DeviceKind,
    /// Compute threads; default = all cores.
    pub threads: Option<usize>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::new(),
            name: None,
            tokenizer: None,
            device: DeviceKind::Cpu,
            threads: None,
        }
    }
}

/// Scheduler and KV-cache settings (vLLM names).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: u32,
    /// KV blocks in the pool; derived from `kv_cache_mb` when unset.
    pub num_kv_blocks: Option<u32>,
    /// Memory budget for the KV cache when `num_kv_blocks` is unset. The pool is allocated and
    /// written at start-up, so this much memory is resident from then on.
    pub kv_cache_mb: u32,
    /// Element type of the KV cache (vLLM's `kv_cache_dtype`).
    pub kv_cache_dtype: KvCacheDType,
    /// Cap on sequences running in one step.
    pub max_num_seqs: u32,
    /// Token budget of one step (prefill chunks + decodes).
    pub max_num_batched_tokens: u32,
    /// Caps the model's context length; unset = the model's own.
    pub max_model_len: Option<u32>,
    pub enable_prefix_caching: bool,
    /// Requests waiting beyond this are refused with RESOURCE_EXHAUSTED.
    pub max_waiting: u32,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            num_kv_blocks: None,
            kv_cache_mb: 512,
            kv_cache_dtype: KvCacheDType::default(),
            max_num_seqs: 32,
            max_num_batched_tokens: 512,
            max_model_len: None,
            enable_prefix_caching: true,
            max_waiting: 256,
        }
    }
}

impl EngineConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !self.block_size.is_power_of_two() || self.block_size > 256 {
            return Err(ConfigError::invalid(
                "engine.block_size",
                format!("must be a power of two <= 256, got {}", self.block_size),
            ));
        }
        if self.num_kv_blocks == Some(0) {
            return Err(ConfigError::invalid("engine.num_kv_blocks", "must be >= 1"));
        }
        if self.num_kv_blocks.is_none() && self.kv_cache_mb == 0 {
            return Err(ConfigError::invalid("engine.kv_cache_mb", "must be >= 1"));
        }
        if self.max_num_seqs == 0 {
            return Err(ConfigError::invalid("engine.max_num_seqs", "must be >= 1"));
        }
        if self.max_num_batched_tokens < self.max_num_seqs {
            return Err(ConfigError::invalid(
                "engine.max_num_batched_tokens",
                format!(
                    "must be >= engine.max_num_seqs ({}), got {}",
                    self.max_num_seqs, self.max_num_batched_tokens
                ),
            ));
        }
        Ok(())
    }
}

/// Element type of the KV cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvCacheDType {
    /// Single precision: the values the model computed, unrounded, so logits are bit-identical
    /// to candle's `quantized_llama` (whose cache is f32).
    #[default]
    F32,
    /// Half precision (llama.cpp's default cache type): half the memory per token, so twice
    /// the tokens in `kv_cache_mb`, and half the bytes a decode step's attention reads at long
    /// contexts. K and V are rounded to f16 when written; attention computes in f32. The
    /// rounding changes the model's output: on the default model, teacher-forced greedy
    /// argmax agreed with candle's at 247 of 256 positions (every difference a near-tie).
    F16,
}

impl KvCacheDType {
    /// The name configs use (`"f32"`, `"f16"`).
    pub fn name(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::F32 => "f32",
        }
    }

    /// Bytes of one stored element.
    pub fn size(self) -> usize {
        match self {
            Self::F16 => 2,
            Self::F32 => 4,
        }
    }
}

/// Which engine a worker runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    /// The candle model.
    #[default]
    Model,
    /// The simulated engine (real scheduler and KV manager, timing model instead of a model),
    /// for router scale and fault tests.
    Simulated,
}

/// Timing model of the simulated engine (`engine_kind = "simulated"`): each step sleeps
/// `step_overhead + per_prefill_token * prompt tokens in the step + per_decode_seq * decoding
/// sequences`, so router tests see realistic queueing without a model. These are configured
/// costs, not measurements.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Fixed cost of every step (scheduling, weight streaming).
    #[serde(with = "humantime_serde")]
    pub step_overhead: Duration,
    /// Cost of each prompt token computed in a step.
    #[serde(with = "humantime_serde")]
    pub per_prefill_token: Duration,
    /// Cost of each sequence decoding one token in a step.
    #[serde(with = "humantime_serde")]
    pub per_decode_seq: Duration,
    /// Context length the simulated model reports (`engine.max_model_len` caps it).
    pub max_model_len: u32,
    /// Simulated KV bytes per token, used to derive the block count from
    /// `engine.kv_cache_mb` when `engine.num_kv_blocks` is unset.
    pub kv_bytes_per_token: u32,
    /// When set, the simulated model predicts EOS for every position at or after this one,
    /// so requests can end with `stop`; unset = it never predicts EOS.
    pub eos_at_position: Option<u32>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            step_overhead: Duration::from_millis(2),
            per_prefill_token: Duration::from_micros(50),
            per_decode_seq: Duration::from_micros(500),
            max_model_len: 2048,
            kv_bytes_per_token: 46_080,
            eos_at_position: None,
        }
    }
}

impl SimConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let limit = Duration::from_secs(10);
        for (key, v) in [
            ("sim.step_overhead", self.step_overhead),
            ("sim.per_prefill_token", self.per_prefill_token),
            ("sim.per_decode_seq", self.per_decode_seq),
        ] {
            if v > limit {
                return Err(ConfigError::invalid(
                    key,
                    format!("must be <= 10s, got {v:?}"),
                ));
            }
        }
        if self.max_model_len < 2 {
            return Err(ConfigError::invalid("sim.max_model_len", "must be >= 2"));
        }
        if self.kv_bytes_per_token == 0 {
            return Err(ConfigError::invalid(
                "sim.kv_bytes_per_token",
                "must be >= 1",
            ));
        }
        if self.eos_at_position == Some(0) {
            return Err(ConfigError::invalid("sim.eos_at_position", "must be >= 1"));
        }
        Ok(())
    }
}

/// Dynamic registration with a router (lease + heartbeat).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrationConfig {
    /// The router's gRPC address, e.g. `http://10.0.0.1:50051`.
    pub router: String,
    /// Address the router should dial; defaults to `http://<listen>`.
    pub advertise: Option<String>,
    #[serde(with = "humantime_serde", default = "default_lease")]
    pub lease: Duration,
}

fn default_lease() -> Duration {
    Duration::from_secs(10)
}

/// The worker process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Stable id reported to routers and in metrics.
    pub id: String,
    pub listen: SocketAddr,
    /// Relative capacity of this host, used to weight routing.
    pub weight: f64,
    pub engine_kind: EngineKind,
    pub model: ModelConfig,
    pub engine: EngineConfig,
    /// Timing model, used only when `engine_kind = "simulated"`.
    pub sim: SimConfig,
    pub registration: Option<RegistrationConfig>,
    pub telemetry: TelemetryConfig,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            id: "worker-0".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 50061)),
            weight: 1.0,
            engine_kind: EngineKind::Model,
            model: ModelConfig::default(),
            engine: EngineConfig::default(),
            sim: SimConfig::default(),
            registration: None,
            telemetry: TelemetryConfig::default(),
        }
    }
}

impl Validate for WorkerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.id.trim().is_empty() {
            return Err(ConfigError::invalid("id", "must not be empty"));
        }
        if !(self.weight.is_finite() && self.weight > 0.0) {
            return Err(ConfigError::invalid("weight", "must be > 0"));
        }
        if self.model.threads == Some(0) {
            return Err(ConfigError::invalid("model.threads", "must be >= 1"));
        }
        self.sim.validate()?;
        self.engine.validate()
    }
}

/// A worker listed in the router's config file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticWorker {
    pub id: String,
    /// gRPC address, e.g. `http://127.0.0.1:50061`.
    pub address: String,
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

/// The routing policy; this enum *is* the config (`[policy] kind = "power_of_two"`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum PolicyConfig {
    RoundRobin,
    LeastOutstanding,
    #[default]
    PowerOfTwo,
    PrefixAffinity {
        /// Tokens per hashed block when matching prefixes (match the workers' block size).
        #[serde(default = "default_affinity_block")]
        block_size: u32,
        /// A worker whose weighted load exceeds the least-loaded one's by this factor (plus
        /// one request) loses affinity.
        #[serde(default = "default_overload_factor")]
        overload_factor: f64,
    },
}

fn default_affinity_block() -> u32 {
    16
}

fn default_overload_factor() -> f64 {
    2.0
}

/// Health polling and the circuit breaker of each WorkerLink.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Consecutive failures that open the breaker.
    pub failure_threshold: u32,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(500),
            failure_threshold: 3,
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// The router process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterConfig {
    /// Public and admin gRPC.
    pub listen: SocketAddr,
    /// OpenAI-compatible HTTP; off when unset.
    pub http_listen: Option<SocketAddr>,
    /// Required bearer token on the HTTP API; none when unset.
    pub api_key: Option<String>,
    pub workers: Vec<StaticWorker>,
    pub policy: PolicyConfig,
    pub health: HealthConfig,
    /// Requests in flight per unit of worker weight before a worker counts as full.
    pub max_in_flight_per_worker: u32,
    /// Retries on another worker for failures before the first token.
    pub max_retries: u32,
    /// Longest lease a registering worker gets.
    #[serde(with = "humantime_serde")]
    pub max_lease: Duration,
    pub telemetry: TelemetryConfig,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            http_listen: None,
            api_key: None,
            workers: Vec::new(),
            policy: PolicyConfig::default(),
            health: HealthConfig::default(),
            max_in_flight_per_worker: 64,
            max_retries: 1,
            max_lease: Duration::from_secs(60),
            telemetry: TelemetryConfig::default(),
        }
    }
}

impl Validate for RouterConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let mut ids = std::collections::HashSet::new();
        for w in &self.workers {
            if !ids.insert(w.id.as_str()) {
                return Err(ConfigError::invalid(
                    "workers",
                    format!("duplicate worker id `{}`", w.id),
                ));
            }
            if !(w.address.starts_with("http://") || w.address.starts_with("https://")) {
                return Err(ConfigError::invalid(
                    "workers.address",
                    format!("`{}` must start with http:// or https://", w.address),
                ));
            }
            if !(w.weight.is_finite() && w.weight > 0.0) {
                return Err(ConfigError::invalid("workers.weight", "must be > 0"));
            }
        }
        if self.max_in_flight_per_worker == 0 {
            return Err(ConfigError::invalid(
                "max_in_flight_per_worker",
                "must be >= 1",
            ));
        }
        if self.health.failure_threshold == 0 {
            return Err(ConfigError::invalid(
                "health.failure_threshold",
                "must be >= 1",
            ));
        }
        if let PolicyConfig::PrefixAffinity {
            block_size,
            overload_factor,
        } = &self.policy
        {
            if *block_size == 0 {
                return Err(ConfigError::invalid("policy.block_size", "must be >= 1"));
            }
            if !(overload_factor.is_finite() && *overload_factor >= 1.0) {
                return Err(ConfigError::invalid(
                    "policy.overload_factor",
                    "must be >= 1",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_values_and_errors_name_the_key() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("w.toml");
        std::fs::write(&path, "id = \"mini-1\"\n[engine]\nmax_num_seqs = 8\n")?;
        let cfg: WorkerConfig = load(Some(&path))?;
        assert_eq!(cfg.id, "mini-1");
        assert_eq!(cfg.engine.max_num_seqs, 8);
        assert_eq!(cfg.engine.block_size, 16);

        std::fs::write(&path, "[engine]\nblock_size = 12\n")?;
        let err = load::<WorkerConfig>(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("engine.block_size"), "{err}");
        Ok(())
    }

    #[test]
    fn policy_is_a_tagged_enum() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("r.toml");
        std::fs::write(
            &path,
            "[policy]\nkind = \"prefix_affinity\"\n\n[[workers]]\nid = \"a\"\naddress = \"http://127.0.0.1:1\"\n",
        )?;
        let cfg: RouterConfig = load(Some(&path))?;
        assert_eq!(
            cfg.policy,
            PolicyConfig::PrefixAffinity {
                block_size: 16,
                overload_factor: 2.0
            }
        );
        std::fs::write(
            &path,
            "[[workers]]\nid = \"a\"\naddress = \"127.0.0.1:1\"\n",
        )?;
        let err = load::<RouterConfig>(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("workers.address"), "{err}");
        Ok(())
    }
}
