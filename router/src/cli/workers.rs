//! `orchard workers [list|drain ID|undrain ID]`: the Admin service from the command line.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use orchard_proto::v1 as pb;
use orchard_proto::v1::admin_client::AdminClient;
use tonic::transport::Channel;

use super::RouterAddr;

/// Arguments of `orchard workers`.
#[derive(Debug, Args)]
pub struct WorkersArgs {
    #[command(subcommand)]
    pub action: Option<WorkersAction>,
    #[command(flatten)]
    pub router: RouterAddr,
}

/// What to do with the workers (default: list).
#[derive(Debug, Subcommand)]
pub enum WorkersAction {
    /// Table of workers with state and load.
    List,
    /// Stop sending new requests to a worker; its in-flight requests finish.
    Drain { id: String },
    /// Put a drained worker back into rotation.
    Undrain { id: String },
}

fn state_name(state: pb::WorkerState) -> &'static str {
    match state {
        pb::WorkerState::Healthy => "healthy",
        pb::WorkerState::Unhealthy => "unhealthy",
        pb::WorkerState::Draining => "draining",
        pb::WorkerState::Connecting => "connecting",
        pb::WorkerState::Unspecified => "unknown",
    }
}

fn print_table(workers: &[pb::WorkerStatus]) {
    println!(
        "{:<16} {:<26} {:<10} {:>6} {:>7} {:>7} {:>9} {:>6} {:<10} {:>7}",
        "ID", "ADDRESS", "STATE", "INFL", "RUNNING", "WAITING", "KV", "WEIGHT", "SOURCE", "LEASE"
    );
    for w in workers {
        let load = w.load.unwrap_or_default();
        let kv = format!("{}/{}", load.kv_blocks_used, load.kv_blocks_total);
        let lease = if w.source == "registered" {
            format!("{:.1}s", w.lease_remaining_s)
        } else {
            "-".to_string()
        };
        println!(
            "{:<16} {:<26} {:<10} {:>6} {:>7} {:>7} {:>9} {:>6.2} {:<10} {:>7}",
            w.id,
            w.address,
            state_name(w.state()),
            w.in_flight,
            load.running,
            load.waiting,
            kv,
            w.weight,
            w.source,
            lease
        );
    }
}

/// Runs `orchard workers`.
pub async fn run(args: WorkersArgs) -> Result<()> {
    let addr = &args.router.router;
    let channel = Channel::from_shared(addr.clone())
        .with_context(|| format!("bad router address `{addr}`"))?
        .connect()
        .await
        .with_context(|| format!("cannot reach the router at {addr}"))?;
    let mut admin = AdminClient::new(channel);
    match args.action.unwrap_or(WorkersAction::List) {
        WorkersAction::List => {
            let list = admin.list_workers(pb::ListWorkersRequest {}).await?;
            print_table(&list.into_inner().workers);
        }
        WorkersAction::Drain { id } => {
            let resp = admin.drain(pb::DrainRequest { id }).await?.into_inner();
            print_table(&resp.worker.into_iter().collect::<Vec<_>>());
        }
        WorkersAction::Undrain { id } => {
            let resp = admin.undrain(pb::DrainRequest { id }).await?.into_inner();
            print_table(&resp.worker.into_iter().collect::<Vec<_>>());
        }
    }
    Ok(())
}
