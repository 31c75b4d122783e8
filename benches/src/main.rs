//! `orchard-bench`: load generator for Orchard (gRPC) and any OpenAI-compatible server (HTTP).
//!
//! ```text
//! # fixed count, closed loop: 200 requests, 8 at a time, 256-token prompts, 128 output tokens
//! orchard-bench run --target grpc://127.0.0.1:50051 --requests 200 --concurrency 8 \
//!     --prompt-tokens 256 --max-tokens 128 --out results/run
//! # fixed duration, open loop: Poisson arrivals at 2 req/s for 60 s, seeded
//! orchard-bench run --target http://127.0.0.1:8080 --duration 60s --rate 2 --seed 42
//! # prompts from a file (one per line, or JSONL with a "prompt" field)
//! orchard-bench run --target grpc://127.0.0.1:50051 --prompt-file prompts.jsonl --requests 50
//! # concurrency sweep
//! orchard-bench sweep --target grpc://127.0.0.1:50051 --levels 1,2,4,8,16 --prompt-tokens 256
//! # seed scenarios S1-S6 at concurrency 1/2/4/5, prefix-cache and batching tests
//! orchard-bench scenarios --target grpc://127.0.0.1:50051 --out results/scenarios
//! orchard-bench scenarios --target grpc://127.0.0.1:50051 --only S1,S6,prefix,batching
//! ```
//!
//! The Markdown report goes to stdout; `report.json`, `summary.csv`, `requests.csv` and PNG
//! charts go to `--out`. See `benches/README.md` for every scenario's command.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use orchard_bench::client::{Client, ConnectOptions};
use orchard_bench::progress::ProgressMode;
use orchard_bench::prompt::{load_prompt_file, PromptSource};
use orchard_bench::report::{write_files, Report};
use orchard_bench::runner::{Arrival, LevelResult, LoadSpec, Settings, StopCondition};
use orchard_bench::scenarios::{
    find_scenario, run_batching, run_prefix_cache, run_scenarios, BatchingSpec, PrefixSpec,
    ScenarioPlan, SEED_CONCURRENCY, SEED_SCENARIOS,
};
use orchard_bench::target::Target;

#[derive(Debug, Parser)]
#[command(
    name = "orchard-bench",
    version,
    about = "Load generator for Orchard and OpenAI-compatible LLM servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One load level: fixed request count or duration, closed loop or Poisson arrivals.
    Run(RunArgs),
    /// The same load at several concurrency levels.
    Sweep(SweepArgs),
    /// Named presets: S1-S6 at several concurrencies, prefix-cache test, batching test.
    Scenarios(ScenarioArgs),
}

/// Options every subcommand takes.
#[derive(Debug, Args)]
struct CommonArgs {
    /// grpc://HOST:PORT (Orchard router) or http://HOST:PORT (OpenAI-compatible server).
    #[arg(long, env = "ORCHARD_BENCH_TARGET")]
    target: String,
    /// Model name (default: the router's default over gRPC, the first listed over HTTP).
    #[arg(long)]
    model: Option<String>,
    /// Directory for report.json, summary.csv, requests.csv and the PNG charts.
    #[arg(long, default_value = "orchard-bench-out")]
    out: PathBuf,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Stop at EOS instead of generating exactly --max-tokens.
    #[arg(long)]
    respect_eos: bool,
    /// Seed for synthetic prompts and Poisson arrivals.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Limit on one request (e.g. 300s, 5m).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    request_timeout: Duration,
    /// Limit on connecting to the target.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

impl CommonArgs {
    fn settings(&self) -> Settings {
        Settings {
            temperature: self.temperature,
            ignore_eos: !self.respect_eos,
            request_timeout: self.request_timeout,
            progress: if self.quiet {
                ProgressMode::Hidden
            } else {
                ProgressMode::Auto
            },
            seed: self.seed,
        }
    }
}

/// Prompt options of `run` and `sweep`.
#[derive(Debug, Args)]
struct PromptArgs {
    /// Synthetic prompt length in tokens (about one token per word; see the README).
    #[arg(long, default_value_t = 128, conflicts_with = "prompt_file")]
    prompt_tokens: usize,
    /// Prompts from a file: one per line, or .jsonl with a "prompt" or "text" field.
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Output tokens per request.
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
}

impl PromptArgs {
    fn source(&self, seed: u64) -> Result<PromptSource> {
        Ok(match &self.prompt_file {
            Some(path) => PromptSource::List(load_prompt_file(path)?),
            None => PromptSource::Synthetic {
                tokens: self.prompt_tokens,
                seed,
            },
        })
    }
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    prompts: PromptArgs,
    /// Number of requests (default 100 unless --duration is given).
    #[arg(long, conflicts_with = "duration")]
    requests: Option<usize>,
    /// Send requests for this long (e.g. 60s); requests in flight then finish.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Simultaneous requests (closed loop).
    #[arg(long, default_value_t = 1, conflicts_with = "rate")]
    concurrency: usize,
    /// Open loop: mean requests per second, Poisson arrivals seeded by --seed.
    #[arg(long)]
    rate: Option<f64>,
}

#[derive(Debug, Args)]
struct SweepArgs {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    prompts: PromptArgs,
    /// Concurrency levels.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    levels: Vec<usize>,
    /// Requests per level = level x this.
    #[arg(long, default_value_t = 4)]
    requests_per_client: usize,
}

#[derive(Debug, Args)]
struct ScenarioArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Which presets: S1..S6, prefix, batching (default: all).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "S1,S2,S3,S4,S5,S6,prefix,batching"
    )]
    only: Vec<String>,
    /// Concurrency levels for S1-S6.
    #[arg(long, value_delimiter = ',', default_values_t = SEED_CONCURRENCY)]
    concurrency: Vec<usize>,
    /// Requests per S1-S6 level = concurrency x this.
    #[arg(long, default_value_t = 2)]
    requests_per_client: usize,
    /// Unmeasured requests before each of S1-S6.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Shared system prompt length of the prefix test.
    #[arg(long, default_value_t = 286)]
    prefix_system_tokens: usize,
    /// Requests of the prefix test (the first is cold).
    #[arg(long, default_value_t = 10)]
    prefix_requests: usize,
    /// Seed of the prefix test's shared prompt (default: from the clock, so the first request
    /// is cold even against a server that ran the test before; printed in the report).
    #[arg(long)]
    prefix_seed: Option<u64>,
    /// Simultaneous requests of the batching test.
    #[arg(long, default_value_t = 5)]
    batch_size: usize,
    /// Output tokens per request of the batching test.
    #[arg(long, default_value_t = 128)]
    batch_max_tokens: u32,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("orchard-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let (report, out) = match &cli.command {
        Command::Run(args) => (cmd_run(args).await?, &args.common.out),
        Command::Sweep(args) => (cmd_sweep(args).await?, &args.common.out),
        Command::Scenarios(args) => (cmd_scenarios(args).await?, &args.common.out),
    };
    finish(&report, out)
}

/// Prints the Markdown report and writes the files.
fn finish(report: &Report, out: &Path) -> Result<()> {
    println!("{}", report.to_markdown());
    let files = write_files(out, report)?;
    eprintln!("wrote {} files to {}", files.len(), out.display());
    Ok(())
}

async fn connect(common: &CommonArgs) -> Result<(Target, Client)> {
    let target = Target::parse(&common.target)?;
    let opts = ConnectOptions {
        model: common.model.clone(),
        connect_timeout: common.connect_timeout,
    };
    let client = Client::connect(&target, &opts).await?;
    Ok((target, client))
}

fn report(command: &str, target: &Target, client: &Client, levels: Vec<LevelResult>) -> Report {
    Report {
        command: command.to_owned(),
        target: target.to_string(),
        model: client.model().to_owned(),
        levels,
        prefix: None,
        batching: None,
    }
}

async fn cmd_run(args: &RunArgs) -> Result<Report> {
    let settings = args.common.settings();
    let arrival = match args.rate {
        Some(rate) => Arrival::Poisson {
            rate,
            seed: settings.seed,
        },
        None => Arrival::Closed {
            concurrency: args.concurrency,
        },
    };
    let stop = match (args.requests, args.duration) {
        (_, Some(d)) => StopCondition::Duration(d),
        (n, None) => StopCondition::Requests(n.unwrap_or(100)),
    };
    let spec = LoadSpec {
        arrival,
        stop,
        prompts: args.prompts.source(settings.seed)?,
        max_tokens: args.prompts.max_tokens,
        temperature: settings.temperature,
        ignore_eos: settings.ignore_eos,
        request_timeout: settings.request_timeout,
    };
    spec.validate()?;
    let (target, client) = connect(&args.common).await?;
    let label = match arrival {
        Arrival::Closed { concurrency } => format!("c={concurrency}"),
        Arrival::Poisson { rate, .. } => format!("rate={rate}"),
    };
    let level = LevelResult::measure(&client, &spec, label, settings.progress).await?;
    Ok(report("run", &target, &client, vec![level]))
}

async fn cmd_sweep(args: &SweepArgs) -> Result<Report> {
    if args.levels.is_empty() || args.levels.contains(&0) || args.requests_per_client == 0 {
        bail!("--levels must be positive numbers and --requests-per-client at least 1");
    }
    let settings = args.common.settings();
    let (target, client) = connect(&args.common).await?;
    let mut levels = Vec::new();
    for (i, &c) in args.levels.iter().enumerate() {
        let seed = settings.seed.wrapping_add(1_000_000 * i as u64);
        let prompts = args.prompts.source(seed)?;
        let spec = settings.closed(
            c,
            c * args.requests_per_client,
            prompts,
            args.prompts.max_tokens,
        );
        levels
            .push(LevelResult::measure(&client, &spec, format!("c={c}"), settings.progress).await?);
    }
    Ok(report("sweep", &target, &client, levels))
}

async fn cmd_scenarios(args: &ScenarioArgs) -> Result<Report> {
    let mut scenarios = Vec::new();
    let (mut prefix, mut batching) = (false, false);
    for name in &args.only {
        match name.to_ascii_lowercase().as_str() {
            "prefix" => prefix = true,
            "batching" => batching = true,
            other => scenarios.push(find_scenario(other).with_context(|| {
                let ids: Vec<&str> = SEED_SCENARIOS.iter().map(|s| s.id).collect();
                format!(
                    "unknown preset `{name}`; known: {}, prefix, batching",
                    ids.join(", ")
                )
            })?),
        }
    }
    if args.concurrency.is_empty() || args.concurrency.contains(&0) || args.requests_per_client == 0
    {
        bail!("--concurrency must be positive numbers and --requests-per-client at least 1");
    }
    let settings = args.common.settings();
    let (target, client) = connect(&args.common).await?;
    let plan = ScenarioPlan {
        scenarios,
        concurrency: args.concurrency.clone(),
        requests_per_client: args.requests_per_client,
        warmup_requests: args.warmup,
        settings: settings.clone(),
    };
    let mut out = report(
        "scenarios",
        &target,
        &client,
        run_scenarios(&client, &plan).await?,
    );
    if prefix {
        let seed = args.prefix_seed.unwrap_or_else(clock_seed);
        let spec = PrefixSpec {
            system_tokens: args.prefix_system_tokens,
            question_tokens: 16,
            requests: args.prefix_requests,
            max_tokens: 16,
        };
        out.prefix = Some(
            run_prefix_cache(
                &client,
                &spec,
                &Settings {
                    seed,
                    ..settings.clone()
                },
            )
            .await?,
        );
    }
    if batching {
        let spec = BatchingSpec {
            batch: args.batch_size,
            prompt_tokens: 64,
            max_tokens: args.batch_max_tokens,
        };
        out.batching = Some(run_batching(&client, &spec, &settings).await?);
    }
    Ok(out)
}

/// A seed that differs between runs, for tests that need a cold cache.
fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
