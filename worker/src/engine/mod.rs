//! The engine: scheduler, sequences, the step batch handed to the model, and the engine thread.

pub mod api;
pub mod batch;
