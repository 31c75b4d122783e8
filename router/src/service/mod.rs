//! The router's gRPC services: the public [`OrchardService`] (generate, list models) and the
//! operator [`AdminService`]. Both are plain structs over a [`crate::actors::RouterHandle`],
//! so the HTTP front can call `OrchardService` in-process through the tonic trait.

mod admin;
mod orchard;
mod relay;
pub mod validate;

pub use admin::AdminService;
pub use orchard::{GenerateStream, OrchardService};
