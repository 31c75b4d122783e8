//! The `orchard` binary against an in-process router over two simulated-engine workers:
//! `orchard workers` (list, drain) and `orchard generate`, checked on what they print.

mod common;

use std::process::Output;

use anyhow::{ensure, Context, Result};
use common::real::RealWorker;
use common::{
    generate, prompt_request, router_config_over, spawn_router, wait_healthy, TestRouter,
};
use orchard_common::config::PolicyConfig;
use orchard_worker::sim::test_worker_config;

/// Runs `orchard <command> --router <router> <args>`, failing on a non-zero exit; returns
/// stdout and stderr. (`--router` belongs to the command, so it goes before a subcommand
/// such as `workers list`.)
async fn orchard(router: &TestRouter, command: &str, args: &[&str]) -> Result<(String, String)> {
    let url = format!("http://{}", router.addr);
    let Output {
        status,
        stdout,
        stderr,
    } = tokio::process::Command::new(env!("CARGO_BIN_EXE_orchard"))
        .args([command, "--router", &url])
        .args(args)
        .env_remove("ORCHARD_ROUTER")
        .output()
        .await
        .context("running orchard")?;
    let (stdout, stderr) = (String::from_utf8(stdout)?, String::from_utf8(stderr)?);
    ensure!(
        status.success(),
        "orchard {command} {args:?} failed ({status}):\n{stdout}\n{stderr}"
    );
    Ok((stdout, stderr))
}

/// The row of the `orchard workers` table for worker `id`, split into columns.
fn row<'a>(table: &'a str, id: &str) -> Result<Vec<&'a str>> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cols| cols.first() == Some(&id))
        .with_context(|| format!("no row for `{id}` in:\n{table}"))
}

/// Column 3 of the table is STATE.
fn state<'a>(table: &'a str, id: &str) -> Result<&'a str> {
    row(table, id)?.get(2).copied().context("no STATE column")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_list_drain_and_generate_print_what_the_router_does() -> Result<()> {
    let (a, b) = tokio::try_join!(
        RealWorker::serving(test_worker_config("sim-a")),
        RealWorker::serving(test_worker_config("sim-b"))
    )?;
    let list = [(a.id.as_str(), a.url()), (b.id.as_str(), b.url())];
    let router = spawn_router(router_config_over(&list, PolicyConfig::RoundRobin)).await?;
    wait_healthy(&router, 2).await?;

    let (table, _) = orchard(&router, "workers", &["list"]).await?;
    ensure!(table.starts_with("ID"), "no header:\n{table}");
    ensure!(
        row(&table, "sim-a")?.get(1) == Some(&a.url().as_str()),
        "{table}"
    );
    ensure!(state(&table, "sim-a")? == "healthy" && state(&table, "sim-b")? == "healthy");

    let (drained, _) = orchard(&router, "workers", &["drain", "sim-a"]).await?;
    ensure!(state(&drained, "sim-a")? == "draining", "{drained}");
    let (table, _) = orchard(&router, "workers", &[]).await?;
    ensure!(state(&table, "sim-a")? == "draining" && state(&table, "sim-b")? == "healthy");

    // With sim-a draining, every request goes to sim-b; the simulated engine is deterministic
    // under greedy sampling, so the CLI must print what the gRPC API returns.
    let expected = generate(&router, prompt_request("hello orchard", 6)).await?;
    ensure!(
        expected.error.is_none() && !expected.text.is_empty(),
        "{expected:?}"
    );
    let (stdout, stderr) = orchard(
        &router,
        "generate",
        &["hello orchard", "--max-tokens", "6", "--temperature", "0"],
    )
    .await?;
    ensure!(
        stdout == format!("{}\n", expected.text),
        "stdout {stdout:?}, expected {:?}",
        expected.text
    );
    let timings = stderr
        .lines()
        .find(|l| l.starts_with("[worker "))
        .with_context(|| format!("no timings line in stderr:\n{stderr}"))?;
    for part in [
        "[worker sim-b,",
        "finish ",
        "6 completion tokens",
        "ttft ",
        "e2e ",
    ] {
        ensure!(
            timings.contains(part),
            "timings line lacks {part:?}: {timings}"
        );
    }
    Ok(())
}
