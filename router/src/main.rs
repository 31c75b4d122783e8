//! `orchard-router --config FILE`: loads the router config (file + `ORCHARD_` environment),
//! binds the gRPC listener and serves until Ctrl-C or SIGTERM.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use orchard_common::config::{self, RouterConfig};

/// Command line of the router process.
#[derive(Debug, Parser)]
#[command(
    name = "orchard-router",
    version,
    about = "Orchard router: balances generation over workers"
)]
struct Args {
    /// Router config (TOML); every key may also come from `ORCHARD_...` variables.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config: RouterConfig =
        config::load(args.config.as_deref()).context("loading the router config")?;
    // Logs (text or JSON) and, when `telemetry.otlp_endpoint` is set, OTLP traces; the guard
    // flushes buffered spans when the router stops.
    let _telemetry = orchard_common::telemetry::init(&config.telemetry, "orchard-router")?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    orchard_router::run(config, listener, shutdown_signal()).await?;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM (systemd, launchd), whichever comes first.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutting down");
}
