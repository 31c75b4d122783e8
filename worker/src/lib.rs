//! Orchard worker: a candle inference engine with a paged KV cache (PagedAttention, Kwon et al.
//! SOSP 2023), vLLM-v1-style block manager and prefix cache, and iteration-level continuous
//! batching (Orca, OSDI 2022), served over gRPC.
//!
//! Layout: `kv/` owns KV blocks (manager and paged store), `engine/` the scheduler and the
//! engine thread, `model/` the candle model code, `kernels/` CPU kernels (SIMD quantized dot
//! products, paged attention), `text/` tokenizer, chat template and detokenizer, `sampling/`
//! the per-request sampler, `sim/` the simulated engine used by router tests, `service/` the gRPC
//! service, `server` the worker process (`run`), `registration` the router lease.

pub mod engine;
pub mod kernels;
pub mod kv;
pub mod model;
pub mod registration;
pub mod sampling;
pub mod server;
pub mod service;
pub mod sim;
pub mod text;
