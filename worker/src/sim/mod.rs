//! The simulated engine: the real scheduler and KV manager with a timing model instead of a model.
