//! Offline engine benchmark (`orchard-engine-bench`, issue 2 "Speed it must reach"): loads a
//! GGUF model in-process - no router, no gRPC, no network - and measures Orchard's engine
//! through its public API ([`orchard_worker::engine::EngineHandle`]) next to a baseline run in
//! the same process on the same file: candle-transformers' own
//! `quantized_llama::ModelWeights`, driven the way candle's `quantized` example drives it
//! (one forward over the whole prompt, then greedy decoding one token at a time).
//!
//! What it measures (every figure is a wall-clock measurement of this run; nothing is
//! simulated):
//! - **prefill tok/s** for each prompt length: prompt tokens / the engine's own `prefill`
//!   timing (first scheduled -> prompt processed), against prompt tokens / the time of the
//!   baseline's single prompt forward;
//! - **single-stream decode tok/s**: 1 / the engine's mean time per output token, against
//!   (output tokens - 1) / the time of the baseline's one-token forwards;
//! - **aggregate decode tok/s** at several concurrencies: every sequence submitted at once
//!   (`ignore_eos`, fixed output length); the tokens of the steps that ran after the last
//!   sequence got its first token, over the time from then to the last token (the decode phase
//!   only, like llama.cpp's `batched-bench` S_TG), plus end-to-end output tok/s;
//! - the **decode roofline**: memory read bandwidth probed before and after the run
//!   ([`memory`]) over the weight bytes one decode step reads, and Orchard's decode as a
//!   fraction of it;
//! - the **seed scenarios S1-S6** ([`crate::scenarios::SEED_SCENARIOS`]) one request at a
//!   time, with TTFT and decode tok/s from the engine's per-request timings;
//! - with `--llama-cpp DIR`, **llama.cpp** measured in the same run by its own `llama-bench`
//!   and `llama-batched-bench` on the same file and thread count ([`llama_cpp`]).
//!
//! Prompts are real text ([`crate::prompt::synthetic_prompt`]) encoded with the model's
//! tokenizer and cut to exact lengths, a different text for every request; the engine also runs
//! with its prefix cache off, so repeated runs never get faster by reusing KV blocks. The
//! report records the token counts the engine reported so a reader (and the test) can check
//! every request produced what was asked.
//!
//! Layout: [`workload`] sizes the runs and makes prompts, [`ours`] drives the engine,
//! [`baseline`] drives candle's model, [`llama_cpp`] runs llama.cpp's tools, [`report`] holds
//! the results, the Markdown table and the llama.cpp reference figures the task gives.

pub mod baseline;
pub mod llama_cpp;
pub mod memory;
pub mod ours;
pub mod report;
pub mod workload;

use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use orchard_common::config::{KvCacheDType, WorkerConfig};
use orchard_common::OrchardError;
use orchard_worker::engine::EngineError;

use crate::progress::ProgressMode;
pub use report::{EngineBenchReport, LLAMA_CPP_REFERENCE};
pub use workload::Sizes;

/// Why the engine benchmark stopped.
#[derive(Debug, thiserror::Error)]
pub enum EngineBenchError {
    /// The model file is not there (the default one is fetched by a script).
    #[error(
        "model file {} not found: run deploy/fetch-model.sh to fetch the default model, \
         or pass --model PATH",
        path.display()
    )]
    ModelMissing {
        /// The path that was tried.
        path: PathBuf,
    },
    /// Orchard's engine could not load the model or start.
    #[error("orchard engine: {0}")]
    Engine(#[from] EngineError),
    /// The engine refused or failed a benchmark request.
    #[error("orchard request: {0}")]
    Request(#[from] OrchardError),
    /// The engine stopped before a request finished.
    #[error("the orchard engine stopped before a request finished")]
    EngineStopped,
    /// candle's baseline model failed to load or run.
    #[error("candle baseline ({during}): {source}")]
    Baseline {
        /// What the baseline was doing.
        during: &'static str,
        /// candle's error.
        source: candle_core::Error,
    },
    /// The model file could not be opened or read.
    #[error("reading {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The model file is not a GGUF file candle can read.
    #[error("reading the GGUF tensor table of {}: {source}", path.display())]
    Gguf {
        /// The file.
        path: PathBuf,
        /// candle's error.
        source: candle_core::Error,
    },
    /// The tokenizer produced fewer tokens than a prompt needs.
    #[error("prompt text encodes to {got} tokens, {wanted} needed")]
    ShortPrompt {
        /// Tokens asked for.
        wanted: usize,
        /// Tokens the text gave.
        got: usize,
    },
    /// A measurement produced nothing to divide by (e.g. one output token: no decode phase).
    #[error("cannot measure {0}: the run produced no time or no tokens to divide")]
    Degenerate(&'static str),
    /// Sizes or flags that cannot describe a benchmark.
    #[error("bad argument: {0}")]
    BadArgument(String),
    /// A llama.cpp tool (`--llama-cpp`) is missing, failed or printed something unreadable.
    #[error("{tool}: {detail}")]
    LlamaCpp {
        /// The tool.
        tool: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// The JSON report could not be written.
    #[error("cannot write {}: {detail}", path.display())]
    Output {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        detail: String,
    },
}

/// Everything one benchmark run needs.
#[derive(Debug, Clone)]
pub struct EngineBenchConfig {
    /// The `.gguf` model file both engines load.
    pub model: PathBuf,
    /// Compute threads (the engine's own pool, `model.threads`; the binary sizes the global and
    /// candle's pools to match); `None` = all cores.
    pub threads: Option<usize>,
    /// Measured runs of every measurement (results are averaged).
    pub repeat: u32,
    /// Element type of Orchard's KV cache.
    pub kv_cache_dtype: KvCacheDType,
    /// Unmeasured warm-up requests before measuring (each engine).
    pub warmup: u32,
    /// What to run.
    pub sizes: Sizes,
    /// Progress on stderr.
    pub progress: ProgressMode,
    /// llama.cpp's benchmark tools, measured after the two engines when given.
    pub llama_cpp: Option<llama_cpp::LlamaCppTools>,
}

impl EngineBenchConfig {
    /// Full-size run on `model` with the defaults of the command line.
    pub fn new(model: PathBuf, sizes: Sizes) -> Self {
        Self {
            model,
            threads: None,
            repeat: 1,
            kv_cache_dtype: KvCacheDType::default(),
            warmup: 1,
            sizes,
            progress: ProgressMode::Auto,
            llama_cpp: None,
        }
    }

    fn check(&self) -> Result<(), EngineBenchError> {
        if !self.model.is_file() {
            return Err(EngineBenchError::ModelMissing {
                path: self.model.clone(),
            });
        }
        if self.repeat == 0 {
            return Err(EngineBenchError::BadArgument(
                "--repeat must be >= 1".into(),
            ));
        }
        if self.threads == Some(0) {
            return Err(EngineBenchError::BadArgument(
                "--threads must be >= 1".into(),
            ));
        }
        self.sizes.check()
    }

    /// The worker config the engine is loaded with: the benchmark's model, threads and KV cache
    /// type, the prefix cache off (so repeats cannot hit it) and a KV pool sized for the largest run.
    pub fn worker_config(&self) -> WorkerConfig {
        let mut cfg = WorkerConfig::default();
        cfg.model.path = self.model.clone();
        cfg.model.threads = self.threads;
        cfg.engine.enable_prefix_caching = false;
        cfg.engine.kv_cache_dtype = self.kv_cache_dtype;
        cfg.engine.num_kv_blocks = Some(self.sizes.kv_blocks_needed(cfg.engine.block_size));
        cfg
    }
}

/// Runs the whole benchmark: Orchard's engine first, then candle's baseline, and returns the report.
pub fn run(config: &EngineBenchConfig) -> Result<EngineBenchReport, EngineBenchError> {
    config.check()?;
    let load_before = load_average();
    let weight_bytes = memory::weight_bytes(&config.model)?;
    // The engine's thread count reads memory in the probe too.
    let threads = config
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let probe_bytes = if config.sizes.quick {
        64 << 20
    } else {
        256 << 20
    };
    let memory_before = memory::read_bandwidth(threads, probe_bytes);
    let progress = progress_bar(config);
    let worker_cfg = config.worker_config();
    progress.set_message("loading the model (orchard)");
    let mut engine = ours::Engine::load(&worker_cfg)?;
    // One prompt maker for both sides: the same tokenizer, and a fresh text for every request.
    let mut prompts = workload::PromptMaker::new(engine.frontend());
    let measured = ours::measure(&mut engine, &mut prompts, config, &progress)?;
    let engine_settings = report::EngineSettings::of(&worker_cfg);
    drop(engine);
    progress.set_message("loading the model (candle baseline)");
    let mut candle = baseline::Baseline::load(&config.model)?;
    let base = baseline::measure(&mut candle, &mut prompts, config, &progress)?;
    drop(candle);
    let llama = match &config.llama_cpp {
        Some(tools) => Some(llama_cpp::measure(
            tools,
            &config.model,
            threads,
            &config.sizes,
            config.repeat,
            &progress,
        )?),
        None => None,
    };
    let memory_after = memory::read_bandwidth(threads, probe_bytes);
    progress.finish_and_clear();
    Ok(EngineBenchReport::new(
        report::RunInfo {
            model: config.model.display().to_string(),
            threads,
            repeat: config.repeat,
            warmup: config.warmup,
            quick: config.sizes.quick,
            profile: if cfg!(debug_assertions) {
                "dev"
            } else {
                "release"
            }
            .into(),
            load_average: [load_before, load_average()],
            memory_read: [memory_before, memory_after],
            weight_bytes,
            engine: engine_settings,
        },
        measured,
        base,
        llama,
    ))
}

/// The 1-, 5- and 15-minute load averages (Linux `/proc/loadavg`): how busy the machine was,
/// since other work on the same cores slows both engines (candle's spinning matmul pool most).
fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut fields = text.split_whitespace().map(|f| f.parse::<f64>().ok());
    Some([fields.next()??, fields.next()??, fields.next()??])
}

/// A bar on stderr counting measured and warm-up runs, hidden in tests.
fn progress_bar(config: &EngineBenchConfig) -> ProgressBar {
    let llama_steps = if config.llama_cpp.is_some() { 2 } else { 0 };
    let bar = ProgressBar::new(config.sizes.step_count(config.repeat, config.warmup) + llama_steps);
    match config.progress {
        ProgressMode::Auto => {
            bar.set_draw_target(ProgressDrawTarget::stderr());
            if let Ok(style) =
                ProgressStyle::with_template("[{elapsed_precise}] {wide_bar} {pos}/{len} {msg}")
            {
                bar.set_style(style);
            }
        }
        ProgressMode::Hidden => bar.set_draw_target(ProgressDrawTarget::hidden()),
    }
    bar
}
