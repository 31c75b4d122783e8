//! Failures that stop the router process (start-up and serving), as opposed to per-request
//! failures, which are [`orchard_common::OrchardError`]s mapped to gRPC statuses.

use thiserror::Error;

/// Why the router could not start or stopped serving.
#[derive(Debug, Error)]
pub enum RouterError {
    #[error(transparent)]
    Config(#[from] orchard_common::config::ConfigError),
    #[error("starting the router actor: {0}")]
    Actor(#[from] ractor::SpawnErr),
    #[error("building the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("registering metrics: {0}")]
    Metrics(#[from] orchard_common::metrics::MetricsError),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}
