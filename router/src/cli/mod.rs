//! The `orchard` command-line tool: start a local cluster, send prompts, chat, manage workers.
//! Compiled into the `orchard` binary only (it uses `anyhow`, as binaries may).

pub mod chat;
pub mod generate;
pub mod up;
pub mod workers;

use clap::{Args, Parser, Subcommand};

/// Default router address: where `orchard up` listens when the port is free.
pub const DEFAULT_ROUTER: &str = "http://127.0.0.1:50051";

/// `orchard`: run and use an Orchard cluster from the command line.
#[derive(Debug, Parser)]
#[command(
    name = "orchard",
    version,
    about = "Run and use an Orchard LLM serving cluster"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a local cluster: N workers plus a router, until Ctrl-C.
    Up(up::UpArgs),
    /// Stream one completion to stdout, then print its timings.
    Generate(generate::GenerateArgs),
    /// Interactive chat that keeps the conversation history.
    Chat(chat::ChatArgs),
    /// List, drain or undrain the router's workers.
    Workers(workers::WorkersArgs),
}

/// Where the router is.
#[derive(Debug, Clone, Args)]
pub struct RouterAddr {
    /// Router gRPC address.
    #[arg(long, env = "ORCHARD_ROUTER", default_value = DEFAULT_ROUTER)]
    pub router: String,
}

/// Sampling flags shared by `generate` and `chat`.
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: u32,
    /// 0 = greedy.
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    pub top_k: u32,
    /// Seed for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Model name (empty = any the router serves).
    #[arg(long, default_value = "")]
    pub model: String,
}

impl SamplingArgs {
    /// The wire form.
    pub fn to_proto(&self) -> orchard_proto::v1::SamplingParams {
        orchard_proto::v1::SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            max_tokens: Some(self.max_tokens),
            ..Default::default()
        }
    }
}
