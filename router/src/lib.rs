//! Orchard router: public gRPC and HTTP fronts, RouterActor, WorkerLink actors and policies.

pub mod http;
pub mod policy;
