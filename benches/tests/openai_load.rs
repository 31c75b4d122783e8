//! The load generator against a fake OpenAI-compatible SSE server: one token per event,
//! usage when offered, HTTP errors by status.

mod common;

use anyhow::Result;
use common::{connect, settings, spawn_fake_openai, FAKE_CACHED, FAKE_MODEL};
use orchard_bench::progress::{Progress, ProgressMode};
use orchard_bench::prompt::PromptSource;
use orchard_bench::runner::run_load;

fn hidden() -> Progress {
    Progress::new(ProgressMode::Hidden, None, "test")
}

#[tokio::test]
async fn counts_sse_tokens_and_reads_usage() -> Result<()> {
    let client = connect(&spawn_fake_openai().await?).await?;
    assert_eq!(
        client.model(),
        FAKE_MODEL,
        "model taken from GET /v1/models"
    );
    let spec = settings().closed(
        2,
        4,
        PromptSource::Synthetic {
            tokens: 12,
            seed: 5,
        },
        9,
    );
    let run = run_load(&client, &spec, &hidden()).await?;
    assert!(run.errors.is_empty(), "{:?}", run.errors);
    assert_eq!(run.records.len(), 4);
    for r in &run.records {
        assert_eq!(r.output_tokens, 9);
        assert_eq!(r.itl_s.len(), 8);
        assert_eq!(r.prompt_tokens, Some(12));
        assert_eq!(r.cached_tokens, Some(FAKE_CACHED));
        assert_eq!(r.finish_reason.as_deref(), Some("length"));
        assert!(r.server.is_none(), "HTTP carries no server timings");
    }
    assert_eq!(run.summary().output_tokens, 36);
    Ok(())
}

#[tokio::test]
async fn counts_events_when_the_server_sends_no_usage() -> Result<()> {
    let client = connect(&spawn_fake_openai().await?).await?;
    let prompts = PromptSource::List(vec!["NOUSAGE please".into()]);
    let spec = settings().closed(1, 2, prompts, 5);
    let run = run_load(&client, &spec, &hidden()).await?;
    assert_eq!(run.records.len(), 2);
    for r in &run.records {
        assert_eq!(r.output_tokens, 5);
        assert_eq!(r.prompt_tokens, None);
    }
    Ok(())
}

#[tokio::test]
async fn http_errors_are_counted_by_status() -> Result<()> {
    let client = connect(&spawn_fake_openai().await?).await?;
    let prompts = PromptSource::List(vec!["FAIL".into(), "fine".into()]);
    let spec = settings().closed(2, 4, prompts, 3);
    let s = run_load(&client, &spec, &hidden()).await?.summary();
    assert_eq!((s.requests_ok, s.requests_failed), (2, 2));
    assert_eq!(s.errors_by_kind.get("http:503"), Some(&2));
    Ok(())
}
