//! The WorkerLink actor: one per worker, the sole owner of the router's view of that worker's
//! health. It owns the tonic channel (dialled lazily, with the configured connect timeout),
//! polls grpc.health.v1 and `GetLoad` every poll interval, fetches the model once per
//! connection, and runs a consecutive-failure circuit breaker (the classic
//! closed/open breaker: `failure_threshold` failed polls open it, one good poll closes it).
//! Every poll outcome is reported to the RouterActor, which routes on the latest report.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use orchard_common::config::HealthConfig;
use orchard_common::telemetry::TraceContextInterceptor;
use orchard_common::OrchardError;
use orchard_proto::v1 as pb;
use orchard_proto::v1::worker_client::WorkerClient;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::router_actor::RouterMsg;

/// A client of one worker's `orchard.v1.Worker` service that writes the calling span's W3C
/// trace context (`traceparent`) into every request's metadata, so the worker's request span
/// joins the router's trace. Calls made outside a traced span (health polls) carry nothing.
pub type WorkerRpc = WorkerClient<InterceptedService<Channel, TraceContextInterceptor>>;

/// A [`WorkerRpc`] over `channel` (cheap: channels are shared handles).
pub fn worker_rpc(channel: Channel) -> WorkerRpc {
    WorkerClient::with_interceptor(channel, TraceContextInterceptor)
}

/// Health of a worker as the breaker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkHealth {
    /// No poll has succeeded yet; not routable until one does.
    Connecting,
    /// The last poll succeeded; in rotation.
    Healthy,
    /// Breaker open after `failure_threshold` consecutive failed polls; out of rotation.
    Unhealthy,
}

/// What one poll learned, sent to the RouterActor.
#[derive(Debug, Clone)]
pub struct LinkReport {
    /// Which worker this is about.
    pub worker_id: String,
    /// Breaker state after this poll.
    pub health: LinkHealth,
    /// Latest load report (kept from the last good poll when this one failed).
    pub load: pb::LoadReport,
    /// The model the worker serves, cached per connection.
    pub model: Option<pb::ModelInfo>,
}

/// Counts a request against its worker while it is in flight; the count drops when the
/// guard does, so errors and cancellations cannot leak in-flight slots.
#[derive(Debug)]
pub struct InFlightGuard {
    counter: Arc<AtomicU32>,
}

impl InFlightGuard {
    /// Takes one slot of `counter`.
    pub fn acquire(counter: &Arc<AtomicU32>) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        Self {
            counter: Arc::clone(counter),
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The WorkerLink actor; carries the settings shared by every link and the RouterActor it
/// reports to.
pub struct WorkerLink {
    /// Poll interval, breaker threshold and connect timeout.
    pub health: HealthConfig,
    /// Receives a [`LinkReport`] after every poll.
    pub router: ActorRef<RouterMsg>,
}

/// Start input of a link.
#[derive(Debug, Clone)]
pub struct LinkArgs {
    pub worker_id: String,
    /// `http://host:port` of the worker's gRPC server.
    pub address: String,
}

/// Mutable state of a link.
pub struct LinkState {
    worker_id: String,
    channel: Channel,
    /// Consecutive failed polls; reset by a good one.
    failures: u32,
    health: LinkHealth,
    load: pb::LoadReport,
    /// Fetched on the first good poll of each connection; cleared when the breaker opens
    /// because a restarted worker may serve another model.
    model: Option<pb::ModelInfo>,
    /// A poll is running; ticks are skipped meanwhile so slow workers are not piled on.
    polling: bool,
    /// The poll timer, stopped with the actor.
    ticker: Option<JoinHandle<()>>,
}

/// Messages of a link.
pub enum LinkMsg {
    /// Timer tick: start a poll unless one is running.
    Poll,
    /// Result of a poll task.
    PollDone(Result<PollData, OrchardError>),
    /// A client on the link's channel, for the RouterActor to hand out with leases.
    Client(RpcReplyPort<WorkerRpc>),
}

/// What a successful poll returns.
pub struct PollData {
    load: pb::LoadReport,
    model: Option<pb::ModelInfo>,
}

impl Actor for WorkerLink {
    type Msg = LinkMsg;
    type State = LinkState;
    type Arguments = LinkArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: LinkArgs,
    ) -> Result<LinkState, ActorProcessingErr> {
        let channel = Endpoint::from_shared(args.address.clone())?
            .connect_timeout(self.health.connect_timeout)
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(LinkState {
            worker_id: args.worker_id,
            channel,
            failures: 0,
            health: LinkHealth::Connecting,
            load: pb::LoadReport::default(),
            model: None,
            polling: false,
            ticker: None,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut LinkState,
    ) -> Result<(), ActorProcessingErr> {
        // A failed cast means the actor is already stopping; the ticker below is moot then.
        let _ = myself.cast(LinkMsg::Poll);
        state.ticker = Some(myself.send_interval(self.health.poll_interval, || LinkMsg::Poll));
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut LinkState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(ticker) = state.ticker.take() {
            ticker.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: LinkMsg,
        state: &mut LinkState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            LinkMsg::Poll => self.start_poll(myself, state),
            LinkMsg::PollDone(result) => self.finish_poll(result, state),
            LinkMsg::Client(reply) => {
                if !reply.is_closed() {
                    // The caller may have timed out meanwhile; nothing to do then.
                    let _ = reply.send(worker_rpc(state.channel.clone()));
                }
            }
        }
        Ok(())
    }
}

impl WorkerLink {
    /// Runs the poll on its own task so the link keeps answering while a worker is slow.
    fn start_poll(&self, myself: ActorRef<LinkMsg>, state: &mut LinkState) {
        if state.polling {
            return;
        }
        state.polling = true;
        let channel = state.channel.clone();
        let budget = self.health.connect_timeout.max(self.health.poll_interval);
        let need_model = state.model.is_none();
        tokio::spawn(async move {
            let result = poll_worker(channel, budget, need_model).await;
            // The link may have stopped meanwhile (worker removed); the result is moot then.
            let _ = myself.cast(LinkMsg::PollDone(result));
        });
    }

    /// Applies a poll result to the breaker and reports to the RouterActor.
    fn finish_poll(&self, result: Result<PollData, OrchardError>, state: &mut LinkState) {
        state.polling = false;
        match result {
            Ok(data) => {
                state.failures = 0;
                state.health = LinkHealth::Healthy;
                state.load = data.load;
                if data.model.is_some() {
                    state.model = data.model;
                }
            }
            Err(err) => {
                state.failures = state.failures.saturating_add(1);
                if state.failures >= self.health.failure_threshold
                    && state.health != LinkHealth::Unhealthy
                {
                    tracing::warn!(worker = %state.worker_id, error = %err, "circuit breaker open");
                    state.health = LinkHealth::Unhealthy;
                    state.model = None;
                }
            }
        }
        let report = LinkReport {
            worker_id: state.worker_id.clone(),
            health: state.health,
            load: state.load,
            model: state.model.clone(),
        };
        // The RouterActor stops links before it stops itself, so a failed cast only
        // happens during shutdown.
        let _ = self.router.cast(RouterMsg::LinkStatus(report));
    }
}

/// One poll: health check, load, and the model when not yet known; each bounded by `budget`.
async fn poll_worker(
    channel: Channel,
    budget: Duration,
    need_model: bool,
) -> Result<PollData, OrchardError> {
    let within = |what: &'static str| {
        move |_: tokio::time::error::Elapsed| {
            OrchardError::unavailable(format!("{what}: no answer within {budget:?}"))
        }
    };
    let mut health = HealthClient::new(channel.clone());
    let check = tokio::time::timeout(budget, health.check(HealthCheckRequest::default()))
        .await
        .map_err(within("health check"))?;
    match check {
        Ok(resp) if resp.get_ref().status() == ServingStatus::Serving => {}
        Ok(resp) => {
            return Err(OrchardError::unavailable(format!(
                "health check: {:?}",
                resp.get_ref().status()
            )))
        }
        // A worker without a health service is judged by GetLoad alone.
        Err(status) if status.code() == tonic::Code::Unimplemented => {}
        Err(status) => return Err(status.into()),
    }
    let mut worker = worker_rpc(channel);
    let load = tokio::time::timeout(budget, worker.get_load(pb::GetLoadRequest {}))
        .await
        .map_err(within("GetLoad"))??
        .into_inner();
    let model = if need_model {
        let info = tokio::time::timeout(budget, worker.get_model_info(pb::GetModelInfoRequest {}))
            .await
            .map_err(within("GetModelInfo"))??;
        Some(info.into_inner())
    } else {
        None
    };
    Ok(PollData { load, model })
}
