//! The RouterActor: sole owner of the worker registry (static workers from the config plus
//! registered ones holding a lease), the routing policy and the draining flags.
//!
//! Routing is a message to this actor, so "check capacity, pick, count in flight" happens
//! atomically with respect to every other routing decision: two concurrent requests can never
//! both take a worker's last slot. Health and load arrive as [`LinkReport`]s from the
//! [`WorkerLink`] children; a link that crashes is restarted by this supervisor.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use orchard_common::config::{PolicyConfig, StaticWorker};
use orchard_common::OrchardError;
use orchard_proto::v1 as pb;
use ractor::{call_t, Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::task::JoinHandle;

use super::worker_link::{
    InFlightGuard, LinkArgs, LinkHealth, LinkMsg, LinkReport, WorkerLink, WorkerRpc,
};
use crate::policy::{self, Policy, RouteRequest, WorkerView};

/// How often lapsed leases are looked for; a lease lapses at most this late.
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);
/// Timeout of the RouterActor's own calls to its links.
const LINK_CALL_TIMEOUT_MS: u64 = 2_000;

/// Settings of the RouterActor, fixed at start.
#[derive(Debug, Clone)]
pub struct RouterSettings {
    /// Requests in flight per unit of weight before a worker counts as full.
    pub max_in_flight_per_worker: u32,
    /// Longest lease a registering worker gets.
    pub max_lease: Duration,
    /// Passed to every WorkerLink.
    pub health: orchard_common::config::HealthConfig,
}

/// The RouterActor; carries its settings.
pub struct RouterActor {
    pub settings: RouterSettings,
}

/// Start input: the static workers and the policy to build.
pub struct RouterArgs {
    pub workers: Vec<StaticWorker>,
    pub policy: PolicyConfig,
}

/// Where a worker came from; registered ones expire.
#[derive(Debug, Clone, Copy)]
enum Source {
    Static,
    Registered { lease: Duration, expires: Instant },
}

/// Whether a worker takes new requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainMode {
    /// No new requests; in-flight ones finish.
    Drain,
    /// Back in rotation.
    Undrain,
}

/// One worker in the registry.
struct Entry {
    id: String,
    address: String,
    weight: f64,
    source: Source,
    link: ActorRef<LinkMsg>,
    client: WorkerRpc,
    in_flight: Arc<AtomicU32>,
    draining: bool,
    health: LinkHealth,
    load: pb::LoadReport,
    model: Option<pb::ModelInfo>,
}

/// The registry, by worker id (ordered, so listings are stable).
type Workers = BTreeMap<String, Entry>;

/// Mutable state of the RouterActor.
pub struct RouterState {
    workers: Workers,
    policy: Box<dyn Policy>,
    sweeper: Option<JoinHandle<()>>,
}

/// What the caller of a route wants.
#[derive(Debug, Clone, Default)]
pub struct RouteQuery {
    /// Requested model; empty = any.
    pub model: String,
    /// Prompt token ids when known (prefix affinity uses them).
    pub prompt_token_ids: Vec<u32>,
    /// Workers already tried for this request (retries go elsewhere).
    pub exclude: Vec<String>,
}

/// A worker chosen for one request; holding it counts the request as in flight.
#[derive(Debug)]
pub struct Lease {
    pub worker_id: String,
    pub client: WorkerRpc,
    _guard: InFlightGuard,
}

/// A worker registering itself.
#[derive(Debug, Clone)]
pub struct Registration {
    pub id: String,
    pub address: String,
    pub weight: f64,
    /// Requested lease; zero or negative asks for the maximum.
    pub lease_s: f64,
}

/// Messages of the RouterActor.
pub enum RouterMsg {
    Route(RouteQuery, RpcReplyPort<Result<Lease, OrchardError>>),
    /// A client of some healthy worker serving the model, for tokenization.
    AnyClient(String, RpcReplyPort<Result<WorkerRpc, OrchardError>>),
    ListWorkers(RpcReplyPort<Vec<pb::WorkerStatus>>),
    ListModels(RpcReplyPort<Vec<pb::ModelInfo>>),
    Register(Registration, RpcReplyPort<Result<Duration, OrchardError>>),
    Heartbeat(String, RpcReplyPort<Result<Duration, OrchardError>>),
    SetDrain(
        String,
        DrainMode,
        RpcReplyPort<Result<pb::WorkerStatus, OrchardError>>,
    ),
    LinkStatus(LinkReport),
    /// Timer tick: drop workers whose lease lapsed.
    Sweep,
}

impl Actor for RouterActor {
    type Msg = RouterMsg;
    type State = RouterState;
    type Arguments = RouterArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<RouterMsg>,
        args: RouterArgs,
    ) -> Result<RouterState, ActorProcessingErr> {
        let mut state = RouterState {
            workers: BTreeMap::new(),
            policy: policy::from_config(&args.policy),
            sweeper: None,
        };
        for w in args.workers {
            let entry = self
                .spawn_entry(&myself, &w.id, &w.address, w.weight, Source::Static)
                .await?;
            state.workers.insert(w.id, entry);
        }
        state.sweeper = Some(myself.send_interval(SWEEP_INTERVAL, || RouterMsg::Sweep));
        Ok(state)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<RouterMsg>,
        state: &mut RouterState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(sweeper) = state.sweeper.take() {
            sweeper.abort();
        }
        for entry in state.workers.values() {
            entry.link.stop(None);
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<RouterMsg>,
        msg: RouterMsg,
        state: &mut RouterState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RouterMsg::Route(query, reply) => {
                if !reply.is_closed() {
                    let _ = reply.send(self.route(state, &query));
                }
            }
            RouterMsg::AnyClient(model, reply) => {
                let _ = reply.send(any_client(state, &model));
            }
            RouterMsg::ListWorkers(reply) => {
                let _ = reply.send(state.workers.values().map(status_of).collect());
            }
            RouterMsg::ListModels(reply) => {
                let _ = reply.send(models(&state.workers));
            }
            RouterMsg::Register(reg, reply) => {
                let result = self.register(&myself, state, reg).await;
                let _ = reply.send(result);
            }
            RouterMsg::Heartbeat(id, reply) => {
                let _ = reply.send(heartbeat(state, &id));
            }
            RouterMsg::SetDrain(id, mode, reply) => {
                let _ = reply.send(set_drain(state, &id, mode));
            }
            RouterMsg::LinkStatus(report) => apply_report(state, report),
            RouterMsg::Sweep => sweep(state),
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<RouterMsg>,
        event: SupervisionEvent,
        state: &mut RouterState,
    ) -> Result<(), ActorProcessingErr> {
        // A link that stops normally was removed on purpose; one that failed is restarted
        // (the default supervision would stop the whole router instead).
        if let SupervisionEvent::ActorFailed(cell, err) = event {
            let failed = state
                .workers
                .values()
                .find(|e| e.link.get_id() == cell.get_id())
                .map(|e| e.id.clone());
            if let Some(id) = failed {
                tracing::warn!(worker = %id, error = %err, "worker link failed; restarting");
                self.restart_link(&myself, state, &id).await?;
            }
        }
        Ok(())
    }
}

impl RouterActor {
    /// Spawns the link of a new worker and asks it for a client on its channel.
    async fn spawn_entry(
        &self,
        myself: &ActorRef<RouterMsg>,
        id: &str,
        address: &str,
        weight: f64,
        source: Source,
    ) -> Result<Entry, ActorProcessingErr> {
        let link = self.spawn_link(myself, id, address).await?;
        let client = call_t!(link, LinkMsg::Client, LINK_CALL_TIMEOUT_MS)?;
        Ok(Entry {
            id: id.to_string(),
            address: address.to_string(),
            weight,
            source,
            link,
            client,
            in_flight: Arc::new(AtomicU32::new(0)),
            draining: false,
            health: LinkHealth::Connecting,
            load: pb::LoadReport::default(),
            model: None,
        })
    }

    async fn spawn_link(
        &self,
        myself: &ActorRef<RouterMsg>,
        id: &str,
        address: &str,
    ) -> Result<ActorRef<LinkMsg>, ActorProcessingErr> {
        let actor = WorkerLink {
            health: self.settings.health.clone(),
            router: myself.clone(),
        };
        let args = LinkArgs {
            worker_id: id.to_string(),
            address: address.to_string(),
        };
        let (link, _) = Actor::spawn_linked(None, actor, args, myself.get_cell()).await?;
        Ok(link)
    }

    async fn restart_link(
        &self,
        myself: &ActorRef<RouterMsg>,
        state: &mut RouterState,
        id: &str,
    ) -> Result<(), ActorProcessingErr> {
        let Some(address) = state.workers.get(id).map(|e| e.address.clone()) else {
            return Ok(());
        };
        let link = self.spawn_link(myself, id, &address).await?;
        let client = call_t!(link, LinkMsg::Client, LINK_CALL_TIMEOUT_MS)?;
        if let Some(entry) = state.workers.get_mut(id) {
            entry.link = link;
            entry.client = client;
            entry.health = LinkHealth::Connecting;
        }
        Ok(())
    }

    /// Most requests a worker of `weight` may have in flight (at least one).
    fn capacity(&self, weight: f64) -> u32 {
        let cap = f64::from(self.settings.max_in_flight_per_worker) * weight.max(0.0);
        // Saturating float-to-int conversion; the cap is at least one request.
        (cap.floor() as u32).max(1)
    }

    /// Picks a worker: healthy, not draining, not excluded, below its in-flight cap.
    fn route(&self, state: &mut RouterState, query: &RouteQuery) -> Result<Lease, OrchardError> {
        let serving = serving_model(&state.workers, &query.model)?;
        let healthy: Vec<&Entry> = serving
            .into_iter()
            .filter(|e| e.health == LinkHealth::Healthy && !e.draining)
            .filter(|e| !query.exclude.contains(&e.id))
            .collect();
        if healthy.is_empty() {
            return Err(OrchardError::unavailable(if query.exclude.is_empty() {
                "no healthy worker is available".to_string()
            } else {
                format!(
                    "no healthy worker left to retry on (tried {:?})",
                    query.exclude
                )
            }));
        }
        let open: Vec<&Entry> = healthy
            .into_iter()
            .filter(|e| e.in_flight.load(Ordering::Acquire) < self.capacity(e.weight))
            .collect();
        if open.is_empty() {
            return Err(OrchardError::exhausted(format!(
                "every worker is at its in-flight limit ({} per unit of weight); retry later",
                self.settings.max_in_flight_per_worker
            )));
        }
        let views: Vec<WorkerView> = open.iter().map(|e| view_of(e)).collect();
        let request = RouteRequest {
            prompt_token_ids: &query.prompt_token_ids,
        };
        let index = state
            .policy
            .pick(&request, &views)
            .and_then(|i| open.get(i).map(|e| e.id.clone()))
            .ok_or_else(|| OrchardError::internal("policy picked no worker"))?;
        let entry = state
            .workers
            .get(&index)
            .ok_or_else(|| OrchardError::internal("picked worker vanished"))?;
        Ok(Lease {
            worker_id: entry.id.clone(),
            client: entry.client.clone(),
            _guard: InFlightGuard::acquire(&entry.in_flight),
        })
    }

    /// Adds a registered worker, or renews (and re-addresses) one already registered.
    async fn register(
        &self,
        myself: &ActorRef<RouterMsg>,
        state: &mut RouterState,
        reg: Registration,
    ) -> Result<Duration, OrchardError> {
        validate_registration(&reg)?;
        let lease = if reg.lease_s.is_finite() && reg.lease_s > 0.0 {
            Duration::from_secs_f64(reg.lease_s).min(self.settings.max_lease)
        } else {
            self.settings.max_lease
        };
        let source = Source::Registered {
            lease,
            expires: Instant::now() + lease,
        };
        if let Some(entry) = state.workers.get_mut(&reg.id) {
            if matches!(entry.source, Source::Static) {
                return Err(OrchardError::invalid(format!(
                    "id `{}` belongs to a statically configured worker",
                    reg.id
                )));
            }
            if entry.address == reg.address {
                entry.source = source;
                entry.weight = reg.weight;
                return Ok(lease);
            }
            remove_worker(state, &reg.id);
        }
        let entry = self
            .spawn_entry(myself, &reg.id, &reg.address, reg.weight, source)
            .await
            .map_err(|e| OrchardError::internal(format!("starting the worker link: {e}")))?;
        tracing::info!(worker = %reg.id, address = %reg.address, ?lease, "worker registered");
        state.workers.insert(reg.id, entry);
        Ok(lease)
    }
}

fn validate_registration(reg: &Registration) -> Result<(), OrchardError> {
    if reg.id.trim().is_empty() {
        return Err(OrchardError::invalid("id: must not be empty"));
    }
    if !(reg.address.starts_with("http://") || reg.address.starts_with("https://")) {
        return Err(OrchardError::invalid(format!(
            "address: `{}` must start with http:// or https://",
            reg.address
        )));
    }
    if tonic::transport::Endpoint::from_shared(reg.address.clone()).is_err() {
        return Err(OrchardError::invalid(format!(
            "address: `{}` is not a valid URI",
            reg.address
        )));
    }
    if !(reg.weight.is_finite() && reg.weight > 0.0) {
        return Err(OrchardError::invalid(format!(
            "weight: must be > 0, got {}",
            reg.weight
        )));
    }
    Ok(())
}

/// Workers serving `model` (all when empty); NOT_FOUND names an unknown model.
fn serving_model<'a>(workers: &'a Workers, model: &str) -> Result<Vec<&'a Entry>, OrchardError> {
    if model.is_empty() {
        return Ok(workers.values().collect());
    }
    let serving: Vec<&Entry> = workers
        .values()
        .filter(|e| e.model.as_ref().is_some_and(|m| m.id == model))
        .collect();
    if serving.is_empty() {
        let known: Vec<String> = models(workers).into_iter().map(|m| m.id).collect();
        return Err(OrchardError::not_found(format!(
            "model `{model}` is not served here (available: {known:?})"
        )));
    }
    Ok(serving)
}

fn any_client(state: &RouterState, model: &str) -> Result<WorkerRpc, OrchardError> {
    serving_model(&state.workers, model)?
        .into_iter()
        .find(|e| e.health == LinkHealth::Healthy)
        .map(|e| e.client.clone())
        .ok_or_else(|| OrchardError::unavailable("no healthy worker is available"))
}

fn view_of(e: &Entry) -> WorkerView {
    let kv_usage = if e.load.kv_blocks_total == 0 {
        0.0
    } else {
        f64::from(e.load.kv_blocks_used) / f64::from(e.load.kv_blocks_total)
    };
    WorkerView {
        id: e.id.clone(),
        weight: e.weight,
        in_flight: e.in_flight.load(Ordering::Acquire),
        running: e.load.running,
        waiting: e.load.waiting,
        kv_usage,
        max_num_seqs: e.load.max_num_seqs,
    }
}

fn status_of(e: &Entry) -> pb::WorkerStatus {
    let state = match (e.draining, e.health) {
        (true, _) => pb::WorkerState::Draining,
        (false, LinkHealth::Healthy) => pb::WorkerState::Healthy,
        (false, LinkHealth::Unhealthy) => pb::WorkerState::Unhealthy,
        (false, LinkHealth::Connecting) => pb::WorkerState::Connecting,
    };
    let (source, lease_remaining_s) = match e.source {
        Source::Static => ("static", 0.0),
        Source::Registered { expires, .. } => (
            "registered",
            expires
                .saturating_duration_since(Instant::now())
                .as_secs_f64(),
        ),
    };
    pb::WorkerStatus {
        id: e.id.clone(),
        address: e.address.clone(),
        state: state.into(),
        load: Some(e.load),
        in_flight: e.in_flight.load(Ordering::Acquire),
        weight: e.weight,
        source: source.to_string(),
        lease_remaining_s,
    }
}

/// Distinct models of the workers that currently report one.
fn models(workers: &Workers) -> Vec<pb::ModelInfo> {
    let mut by_id = BTreeMap::new();
    for model in workers.values().filter_map(|e| e.model.as_ref()) {
        by_id
            .entry(model.id.clone())
            .or_insert_with(|| model.clone());
    }
    by_id.into_values().collect()
}

fn heartbeat(state: &mut RouterState, id: &str) -> Result<Duration, OrchardError> {
    let entry = state.workers.get_mut(id).ok_or_else(|| {
        OrchardError::not_found(format!("worker `{id}` is not registered; register again"))
    })?;
    match entry.source {
        Source::Static => Err(OrchardError::invalid(format!(
            "worker `{id}` is statically configured and holds no lease"
        ))),
        Source::Registered { lease, .. } => {
            entry.source = Source::Registered {
                lease,
                expires: Instant::now() + lease,
            };
            Ok(lease)
        }
    }
}

fn set_drain(
    state: &mut RouterState,
    id: &str,
    mode: DrainMode,
) -> Result<pb::WorkerStatus, OrchardError> {
    let entry = state
        .workers
        .get_mut(id)
        .ok_or_else(|| OrchardError::not_found(format!("no worker with id `{id}`")))?;
    entry.draining = mode == DrainMode::Drain;
    tracing::info!(worker = %id, ?mode, "drain state changed");
    Ok(status_of(entry))
}

fn apply_report(state: &mut RouterState, report: LinkReport) {
    if let Some(entry) = state.workers.get_mut(&report.worker_id) {
        if entry.health != report.health {
            tracing::info!(worker = %entry.id, from = ?entry.health, to = ?report.health, "worker health changed");
        }
        entry.health = report.health;
        entry.load = report.load;
        entry.model = report.model;
    }
}

fn sweep(state: &mut RouterState) {
    let now = Instant::now();
    let lapsed: Vec<String> = state
        .workers
        .values()
        .filter(|e| matches!(e.source, Source::Registered { expires, .. } if expires <= now))
        .map(|e| e.id.clone())
        .collect();
    for id in lapsed {
        tracing::info!(worker = %id, "lease lapsed; worker removed");
        remove_worker(state, &id);
    }
}

fn remove_worker(state: &mut RouterState, id: &str) {
    if let Some(entry) = state.workers.remove(id) {
        entry.link.stop(None);
        state.policy.on_worker_removed(id);
    }
}
