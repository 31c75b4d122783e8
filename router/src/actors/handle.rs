//! Typed async API over the RouterActor's mailbox. Every call has a timeout (`call_t!`), so a
//! wedged actor turns into an INTERNAL error for one request instead of a hung client.

use std::time::Duration;

use orchard_common::OrchardError;
use orchard_proto::v1 as pb;
use ractor::{call_t, ActorRef, RactorErr};

use super::router_actor::{DrainMode, Lease, Registration, RouteQuery, RouterMsg};
use super::worker_link::WorkerRpc;

/// Timeout of calls into the RouterActor; routing is in-memory, so this only trips when the
/// actor is gone or stuck.
const CALL_TIMEOUT_MS: u64 = 5_000;
/// Registration may dial a new worker link, so it gets longer.
const REGISTER_TIMEOUT_MS: u64 = 10_000;

/// Whether the policy routes on prompt token ids (so text prompts must be tokenized first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptTokens {
    /// Prefix affinity: tokenize text prompts on a worker before routing.
    Needed,
    /// The policy ignores the prompt.
    NotNeeded,
}

/// A clonable handle to the RouterActor.
#[derive(Clone)]
pub struct RouterHandle {
    actor: ActorRef<RouterMsg>,
    prompt_tokens: PromptTokens,
}

fn actor_err<T>(err: RactorErr<T>) -> OrchardError {
    OrchardError::internal(format!("router actor: {err}"))
}

impl RouterHandle {
    /// Wraps the RouterActor's reference.
    pub fn new(actor: ActorRef<RouterMsg>, prompt_tokens: PromptTokens) -> Self {
        Self {
            actor,
            prompt_tokens,
        }
    }

    /// Whether callers should supply prompt token ids with a route query.
    pub fn prompt_tokens(&self) -> PromptTokens {
        self.prompt_tokens
    }

    /// Picks a worker and counts the request in flight until the lease is dropped.
    pub async fn route(&self, query: RouteQuery) -> Result<Lease, OrchardError> {
        call_t!(self.actor, RouterMsg::Route, CALL_TIMEOUT_MS, query).map_err(actor_err)?
    }

    /// A client of some healthy worker serving `model` (empty = any), for tokenization.
    pub async fn any_client(&self, model: &str) -> Result<WorkerRpc, OrchardError> {
        call_t!(
            self.actor,
            RouterMsg::AnyClient,
            CALL_TIMEOUT_MS,
            model.to_string()
        )
        .map_err(actor_err)?
    }

    /// Every worker with its state, load and in-flight count.
    pub async fn list_workers(&self) -> Result<Vec<pb::WorkerStatus>, OrchardError> {
        call_t!(self.actor, RouterMsg::ListWorkers, CALL_TIMEOUT_MS).map_err(actor_err)
    }

    /// Distinct models served by the workers.
    pub async fn list_models(&self) -> Result<Vec<pb::ModelInfo>, OrchardError> {
        call_t!(self.actor, RouterMsg::ListModels, CALL_TIMEOUT_MS).map_err(actor_err)
    }

    /// Registers (or renews) a worker; returns the granted lease.
    pub async fn register(&self, reg: Registration) -> Result<Duration, OrchardError> {
        call_t!(self.actor, RouterMsg::Register, REGISTER_TIMEOUT_MS, reg).map_err(actor_err)?
    }

    /// Renews a registered worker's lease; NOT_FOUND when the router does not know it.
    pub async fn heartbeat(&self, id: &str) -> Result<Duration, OrchardError> {
        call_t!(
            self.actor,
            RouterMsg::Heartbeat,
            CALL_TIMEOUT_MS,
            id.to_string()
        )
        .map_err(actor_err)?
    }

    /// Drains or undrains a worker; returns its status afterwards.
    pub async fn set_drain(
        &self,
        id: &str,
        mode: DrainMode,
    ) -> Result<pb::WorkerStatus, OrchardError> {
        call_t!(
            self.actor,
            RouterMsg::SetDrain,
            CALL_TIMEOUT_MS,
            id.to_string(),
            mode
        )
        .map_err(actor_err)?
    }
}
