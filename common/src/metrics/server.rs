//! The Prometheus scrape endpoint: `GET /metrics` in the text exposition format.

use std::future::Future;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;

use super::MetricsError;

/// Path Prometheus scrapes.
pub const METRICS_PATH: &str = "/metrics";

/// The value of the sample whose series (name and labels, exactly as exposed, e.g.
/// `orchard_time_to_first_token_seconds_count{worker="w1"}`) is `series` in a text
/// exposition; `None` when no such sample is present or its value is not a number. Tests and
/// tools read scrapes with it instead of pulling in a Prometheus parser.
pub fn sample_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// Renders every metric in `registry` in the Prometheus text exposition format.
pub fn render(registry: &Registry) -> Result<String, prometheus::Error> {
    TextEncoder::new().encode_to_string(&registry.gather())
}

/// An axum router answering `GET /metrics` from `registry`; a process with its own HTTP
/// front (the router's OpenAI API) merges this instead of opening a second port.
pub fn metrics_router(registry: Registry) -> Router {
    Router::new()
        .route(METRICS_PATH, get(metrics_handler))
        .with_state(registry)
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves. Takes a bound listener so
/// tests bind `127.0.0.1:0` and read the port before serving.
pub async fn serve_metrics<F>(
    listener: TcpListener,
    registry: Registry,
    shutdown: F,
) -> Result<(), MetricsError>
where
    F: Future<Output = ()> + Send + 'static,
{
    axum::serve(listener, metrics_router(registry))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

async fn metrics_handler(State(registry): State<Registry>) -> Response {
    match render(&registry) {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                TextEncoder::new().format_type().to_string(),
            )],
            body,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "encoding metrics failed");
            (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use anyhow::{ensure, Result};
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use tokio::sync::oneshot;

    use super::*;
    use crate::metrics::WorkerMetrics;
    use crate::{FinishReason, RequestTimings, Usage};

    #[tokio::test]
    async fn scrape_over_http_returns_recorded_values_then_shuts_down() -> Result<()> {
        let registry = Registry::new();
        let metrics = WorkerMetrics::new(&registry, "w-http")?;
        let timings = RequestTimings {
            ttft: Duration::from_millis(30),
            e2e: Duration::from_millis(90),
            ..RequestTimings::default()
        };
        let usage = Usage {
            prompt_tokens: 5,
            completion_tokens: 3,
            cached_tokens: 0,
        };
        metrics.record_finished(&timings, &usage, FinishReason::Stop);

        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(serve_metrics(listener, registry, async {
            let _ = stopped.await;
        }));

        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let response = client
            .get(format!("http://{addr}{METRICS_PATH}").parse()?)
            .await?;
        ensure!(response.status() == StatusCode::OK, "{}", response.status());
        let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
        let body = String::from_utf8(response.into_body().collect().await?.to_bytes().to_vec())?;
        ensure!(
            content_type.is_some_and(|v| v.as_bytes().starts_with(b"text/plain")),
            "content type"
        );
        ensure!(
            body.contains("orchard_worker_generation_tokens_total{worker=\"w-http\"} 3\n"),
            "{body}"
        );

        drop(client); // closes the kept-alive connection, which graceful shutdown waits for
        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(10), server).await???;
        Ok(())
    }
}
