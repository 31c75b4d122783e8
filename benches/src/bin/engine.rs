//! `orchard-engine-bench`: offline benchmark of Orchard's engine against candle's quantized
//! Llama on the same GGUF file, in one process, without a cluster or a network.
//!
//! ```text
//! # the README results table: full sizes, 3 measured runs after a warm-up, JSON kept
//! cargo run --release -p orchard-bench --bin orchard-engine-bench -- \
//!     --repeat 3 --json results/engine-bench.json
//! # smoke run in seconds
//! cargo run -p orchard-bench --bin orchard-engine-bench -- --quick
//! # llama.cpp measured in the same run (benches/llama-cpp.sh builds its tools once)
//! cargo run --release -p orchard-bench --bin orchard-engine-bench -- \
//!     --llama-cpp "$(benches/llama-cpp.sh)"
//! ```
//!
//! The Markdown tables go to stdout, progress to stderr. See [`orchard_bench::engine_bench`]
//! for what each figure means.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use orchard_bench::engine_bench::llama_cpp::LlamaCppTools;
use orchard_bench::engine_bench::{self, EngineBenchConfig, Sizes};
use orchard_bench::progress::ProgressMode;
use orchard_common::config::KvCacheDType;
use orchard_worker::model::gguf::default_model_path;

#[derive(Debug, Parser)]
#[command(
    name = "orchard-engine-bench",
    version,
    about = "Offline engine benchmark: Orchard's engine vs candle's quantized Llama, in-process"
)]
struct Cli {
    /// The `.gguf` model; default: the model deploy/fetch-model.sh fetches.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Compute threads for both engines (Orchard's compute team and candle's pool); default: all cores.
    #[arg(long)]
    threads: Option<usize>,
    /// Small sizes (seconds): a smoke test of the whole benchmark, not a measurement.
    #[arg(long)]
    quick: bool,
    /// Element type of Orchard's KV cache (the worker's `engine.kv_cache_dtype`).
    #[arg(long, value_enum, default_value_t = KvDType::F32)]
    kv_cache_dtype: KvDType,
    /// Measured runs of every measurement; the tables show the mean.
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// Unmeasured warm-up requests on each engine before measuring.
    #[arg(long, default_value_t = 1)]
    warmup: u32,
    /// Also write the full report (every mean, min, max and token count) as JSON here.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// No progress bar on stderr.
    #[arg(long)]
    quiet: bool,
    /// Also measure llama.cpp in this run: the folder holding its `llama-bench` and
    /// `llama-batched-bench` (benches/llama-cpp.sh builds them and prints the folder).
    #[arg(long, value_name = "DIR")]
    llama_cpp: Option<PathBuf>,
}

/// `--kv-cache-dtype` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum KvDType {
    F32,
    F16,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(threads) = cli.threads {
        // candle sizes its own matmul pool from these when first used; set them before any
        // thread starts. The engine's compute team is sized through `model.threads`.
        std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    let sizes = match cli.quick {
        true => Sizes::quick(),
        false => Sizes::full(),
    };
    let llama_cpp = cli
        .llama_cpp
        .as_deref()
        .map(LlamaCppTools::in_dir)
        .transpose()
        .context("--llama-cpp")?;
    let config = EngineBenchConfig {
        llama_cpp,
        threads: cli.threads,
        repeat: cli.repeat,
        warmup: cli.warmup,
        kv_cache_dtype: match cli.kv_cache_dtype {
            KvDType::F32 => KvCacheDType::F32,
            KvDType::F16 => KvCacheDType::F16,
        },
        progress: match cli.quiet {
            true => ProgressMode::Hidden,
            false => ProgressMode::Auto,
        },
        ..EngineBenchConfig::new(cli.model.unwrap_or_else(default_model_path), sizes)
    };
    let report = engine_bench::run(&config).context("engine benchmark")?;
    print!("{}", report.to_markdown());
    if let Some(path) = &cli.json {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        report.write_json(path)?;
        eprintln!("report written to {}", path.display());
    }
    Ok(())
}
