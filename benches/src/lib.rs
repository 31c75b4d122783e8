//! Orchard benchmarks: the `orchard-bench` load generator and the offline engine benchmark
//! `orchard-engine-bench` ([`engine_bench`]).
//!
//! The load generator measures an LLM server from the client's side, the way a user sees it:
//! time to first token (TTFT), time per output token (TPOT), every inter-token gap (ITL) and
//! end-to-end latency, plus throughput. It speaks Orchard's gRPC API (`grpc://HOST:PORT`, the
//! router's `Orchard.Generate` stream, whose final message also carries the server's own
//! timings) and any OpenAI-compatible HTTP server (`http://HOST:PORT`, streamed
//! `/v1/completions`), so Orchard can be compared with llama.cpp's server or vLLM by the same
//! tool and the same arithmetic.
//!
//! Layout: [`target`] parses where to send load, [`client`] runs one streamed request and
//! timestamps its chunks, [`prompt`] builds prompts, [`schedule`] draws open-loop arrivals,
//! [`runner`] drives closed- and open-loop load, [`metrics`] turns records into percentiles,
//! [`scenarios`] holds the named presets (S1-S6, prefix cache, continuous batching) and
//! [`report`] writes Markdown, JSON, CSV and PNG charts.
//!
//! The engine benchmark ([`engine_bench`]) needs no server: it loads the model in-process and
//! measures Orchard's engine (prefill, decode, aggregate decode, S1-S6) against candle's own
//! quantized Llama on the same file.

pub mod client;
pub mod engine_bench;
pub mod error;
pub mod metrics;
pub mod progress;
pub mod prompt;
pub mod report;
pub mod runner;
pub mod scenarios;
pub mod schedule;
pub mod target;

pub use error::{BenchError, RequestError};
