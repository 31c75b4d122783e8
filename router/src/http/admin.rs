//! `GET /v1/orchard/workers`: the router's worker registry (the Admin service's ListWorkers) as
//! JSON, so HTTP-only tools and tests can watch worker load - e.g. KV blocks returning to zero
//! after a client disconnects.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use orchard_proto::v1 as pb;
use orchard_proto::v1::admin_server::Admin;
use serde::Serialize;

use super::error::ApiError;

/// Path of the workers endpoint.
pub const WORKERS_PATH: &str = "/v1/orchard/workers";

/// Routes served from the Admin service.
pub fn routes<A: Admin>(admin: Arc<A>) -> Router {
    Router::new()
        .route(WORKERS_PATH, get(list_workers::<A>))
        .with_state(admin)
}

/// Response of [`WORKERS_PATH`].
#[derive(Debug, Serialize)]
pub struct WorkerList {
    pub workers: Vec<WorkerBody>,
}

/// One worker as the router sees it.
#[derive(Debug, Serialize)]
pub struct WorkerBody {
    pub id: String,
    pub address: String,
    /// `healthy`, `unhealthy`, `draining`, `connecting` or `unspecified`.
    pub state: &'static str,
    pub in_flight: u32,
    pub weight: f64,
    pub source: String,
    pub lease_remaining_s: f64,
    /// Last load report polled from the worker, if any yet.
    pub load: Option<LoadBody>,
}

/// A worker's load report.
#[derive(Debug, Serialize)]
pub struct LoadBody {
    pub running: u32,
    pub waiting: u32,
    pub kv_blocks_used: u32,
    pub kv_blocks_total: u32,
    pub max_num_seqs: u32,
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    pub preemptions: u64,
    pub block_size: u32,
}

impl From<pb::LoadReport> for LoadBody {
    fn from(l: pb::LoadReport) -> Self {
        Self {
            running: l.running,
            waiting: l.waiting,
            kv_blocks_used: l.kv_blocks_used,
            kv_blocks_total: l.kv_blocks_total,
            max_num_seqs: l.max_num_seqs,
            prefix_cache_queries: l.prefix_cache_queries,
            prefix_cache_hits: l.prefix_cache_hits,
            preemptions: l.preemptions,
            block_size: l.block_size,
        }
    }
}

impl From<pb::WorkerStatus> for WorkerBody {
    fn from(w: pb::WorkerStatus) -> Self {
        let state = match w.state() {
            pb::WorkerState::Healthy => "healthy",
            pb::WorkerState::Unhealthy => "unhealthy",
            pb::WorkerState::Draining => "draining",
            pb::WorkerState::Connecting => "connecting",
            pb::WorkerState::Unspecified => "unspecified",
        };
        Self {
            id: w.id,
            address: w.address,
            state,
            in_flight: w.in_flight,
            weight: w.weight,
            source: w.source,
            lease_remaining_s: w.lease_remaining_s,
            load: w.load.map(LoadBody::from),
        }
    }
}

async fn list_workers<A: Admin>(State(admin): State<Arc<A>>) -> Result<Json<WorkerList>, ApiError> {
    let reply = admin
        .list_workers(tonic::Request::new(pb::ListWorkersRequest {}))
        .await
        .map_err(|s| ApiError::from_status(&s, std::time::Duration::ZERO))?;
    let workers = reply.into_inner().workers;
    Ok(Json(WorkerList {
        workers: workers.into_iter().map(WorkerBody::from).collect(),
    }))
}
