//! KV cache: the block manager (vLLM v1 semantics) and the paged KV store.
