//! KV cache: the block manager (vLLM v1 semantics) and the paged KV store.

pub mod block_manager;
pub mod free_queue;
pub mod hash;

pub use block_manager::{BlockManager, BlockManagerConfig, KvError, PrefixCacheStats};
