//! `orchard-worker`: runs the engine from the command line.
//!
//! `orchard-worker --config worker.toml` (or `orchard-worker serve --config worker.toml`) serves
//! the worker over gRPC until Ctrl-C or SIGTERM; see `deploy/worker.example.toml`.
//!
//! `orchard-worker generate --prompt "..."` loads a model (the default one when `--model` is not
//! given), renders the prompt with the model's chat template and streams a completion through
//! the engine (the same scheduler, sampler and detokenizer the server uses), then prints the
//! engine's own timings for the request.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use orchard_common::config::{self, WorkerConfig};
use orchard_common::SamplingParams;
use orchard_worker::engine::api::{EngineEvent, EngineRequest, Finished};
use orchard_worker::engine::{load_model, EngineHandle};
use orchard_worker::text::chat_template::Message;

#[derive(Parser)]
#[command(name = "orchard-worker", version, about)]
struct Cli {
    /// Worker config (TOML); `ORCHARD_...` variables override it. Serves when no subcommand
    /// is given.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the worker over gRPC (the default).
    Serve(ServeArgs),
    /// Generate a completion for one prompt, without the cluster.
    Generate(GenerateArgs),
}

#[derive(Parser)]
struct GenerateArgs {
    /// Worker config file (TOML); the engine and model sections apply.
    #[arg(long)]
    config: Option<PathBuf>,
    /// A `.gguf` model file; default: the config's model, else the default model.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Send the prompt as is, without the chat template.
    #[arg(long)]
    raw: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Generate(args)) => generate(args),
        Some(Command::Serve(args)) => serve(args.config.or(cli.config)),
        None => serve(cli.config),
    }
}

/// Streams one completion through a local engine and prints its timings.
fn generate(args: GenerateArgs) -> Result<()> {
    let mut cfg: WorkerConfig = config::load(args.config.as_deref())?;
    if let Some(model) = &args.model {
        cfg.model.path = model.clone();
    }
    let (parts, frontend) = load_model(&cfg).context("loading the model")?;
    let engine = EngineHandle::spawn(parts)?;
    let prompt = match args.raw {
        true => frontend.encode_prompt(&args.prompt)?,
        false => frontend.encode_chat(&[Message {
            role: "user".into(),
            content: args.prompt.clone(),
        }])?,
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    engine.submit(EngineRequest {
        id: "cli".into(),
        prompt_token_ids: prompt,
        params: SamplingParams {
            temperature: args.temperature,
            max_tokens: args.max_tokens,
            ..SamplingParams::default()
        },
        arrival: Instant::now(),
        events: tx,
    })?;
    let mut stdout = std::io::stdout();
    while let Some(event) = rx.blocking_recv() {
        match event {
            EngineEvent::Tokens(chunk) => {
                write!(stdout, "{}", chunk.text)?;
                stdout.flush()?;
            }
            EngineEvent::Finished(done) => {
                report(&done);
                return Ok(());
            }
            EngineEvent::Failed(err) => anyhow::bail!("generation failed: {err}"),
        }
    }
    anyhow::bail!("the engine stopped before the request finished")
}

fn report(done: &Finished) {
    let t = &done.timings;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let u = &done.usage;
    let decode_tps = match t.mean_tpot.is_zero() {
        true => 0.0,
        false => 1.0 / t.mean_tpot.as_secs_f64(),
    };
    eprintln!(
        "\n[{}; prompt {} tokens ({} cached), {} generated; queue {:.1} ms, prefill {:.1} ms, \
         TTFT {:.1} ms, TPOT {:.1} ms ({decode_tps:.1} tok/s), e2e {:.1} ms]",
        done.reason.as_str(),
        u.prompt_tokens,
        u.cached_tokens,
        u.completion_tokens,
        ms(t.queue),
        ms(t.prefill),
        ms(t.ttft),
        ms(t.mean_tpot),
        ms(t.e2e),
    );
}

#[derive(Parser)]
struct ServeArgs {
    /// Worker config (TOML); `ORCHARD_...` variables override it.
    #[arg(long)]
    config: Option<PathBuf>,
}

/// Loads the config, binds `listen` and serves until Ctrl-C or SIGTERM.
fn serve(config: Option<PathBuf>) -> Result<()> {
    let cfg: WorkerConfig = config::load(config.as_deref())?;
    tokio::runtime::Runtime::new()?.block_on(async move {
        // Logs (text or JSON) and, when `telemetry.otlp_endpoint` is set, OTLP traces; the
        // guard flushes buffered spans when the server stops.
        let _telemetry = orchard_common::telemetry::init(&cfg.telemetry, "orchard-worker")?;
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("binding {}", cfg.listen))?;
        tracing::info!(listen = %cfg.listen, id = %cfg.id, "orchard-worker starting");
        orchard_worker::server::run(cfg, listener, orchard_worker::server::shutdown_signal())
            .await?;
        Ok(())
    })
}
