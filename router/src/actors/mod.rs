//! The router's actors (ractor): the [`RouterActor`] owns the registry, policy and draining
//! flags; one supervised [`WorkerLink`] per worker owns its channel, health and breaker.
//! [`RouterHandle`] is the cheap, clonable typed API the gRPC and HTTP fronts use.

mod handle;
mod router_actor;
mod worker_link;

pub use handle::{PromptTokens, RouterHandle};
pub use router_actor::{
    DrainMode, Lease, Registration, RouteQuery, RouterActor, RouterArgs, RouterMsg, RouterSettings,
};
pub use worker_link::{worker_rpc, InFlightGuard, LinkHealth, LinkReport, WorkerLink, WorkerRpc};
