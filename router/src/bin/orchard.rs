//! `orchard`: the Orchard command-line tool (`up`, `generate`, `chat`, `workers`).

#[path = "../cli/mod.rs"]
mod cli;

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = cli::Cli::parse();
    match args.command {
        cli::Command::Up(a) => cli::up::run(a).await,
        cli::Command::Generate(a) => cli::generate::run(a).await,
        cli::Command::Chat(a) => cli::chat::run(a).await,
        cli::Command::Workers(a) => cli::workers::run(a).await,
    }
}
