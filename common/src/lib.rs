//! Types, configuration and error kinds shared by Orchard's router, workers and tools.
//!
//! Everything that crosses a process boundary or appears in a config file is defined once here,
//! so the router, the worker and the load generator cannot drift apart.

pub mod config;
pub mod error;
pub mod metrics;
pub mod telemetry;
pub mod types;

pub use error::{ErrorKind, OrchardError};
pub use types::{FinishReason, RequestTimings, SamplingParams, Usage};
