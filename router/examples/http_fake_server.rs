//! Serves the OpenAI-compatible HTTP front over the test fake (`tests/http_fake`), so client
//! tests (`deploy/tests/test_openai.py`) can run without workers:
//!
//! ```text
//! cargo run -p orchard-router --example http_fake_server -- 127.0.0.1:8000
//! ORCHARD_HTTP_URL=http://127.0.0.1:8000/v1 pytest deploy/tests/test_openai.py
//! ```
//!
//! Prints `listening on http://ADDR` once it accepts connections (port 0 picks a free port).
//! The fake validates parameters with the router's `SamplingParams::validate`, serves one model
//! (`fake-model`, 2048-token context), produces one token every 10 ms and reports KV blocks
//! held by live streams on `GET /v1/orchard/workers`. Set `ORCHARD_API_KEY` to require a
//! bearer token.

// The fake is shared with the integration tests, which use parts this server does not.
#[allow(dead_code)]
#[path = "../tests/http_fake/mod.rs"]
mod http_fake;

use std::time::Duration;

use anyhow::Context;
use orchard_router::http::{app_with_admin, serve, HttpOptions};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_string());
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let fake = http_fake::Fake::new(http_fake::Script::Generate {
        pace: Duration::from_millis(10),
    });
    let options = HttpOptions {
        api_key: std::env::var("ORCHARD_API_KEY").ok(),
        ..HttpOptions::default()
    };
    let app = app_with_admin(fake.clone(), fake, options);
    println!("listening on http://{}", listener.local_addr()?);
    serve(listener, app, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
