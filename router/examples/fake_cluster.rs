//! A router over two scripted fake workers (the integration tests' fixtures), for checking
//! clients without a model: `cargo run -p orchard-router --example fake_cluster`, then e.g.
//! `python3 deploy/tests/grpc_client.py <printed address>`. Runs until Ctrl-C.

#[path = "../tests/common/mod.rs"]
mod common;

use orchard_common::config::PolicyConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = common::spawn_fake("fake-a").await?;
    let b = common::spawn_fake("fake-b").await?;
    let router =
        common::spawn_router(common::router_config(&[&a, &b], PolicyConfig::RoundRobin)).await?;
    common::wait_healthy(&router, 2).await?;
    println!("{}", router.addr);
    tokio::signal::ctrl_c().await?;
    Ok(())
}
