//! The `orchard.v1.Admin` service: worker listing, registration with leases, drain.

use orchard_proto::v1 as pb;
use orchard_proto::v1::admin_server::Admin;
use tonic::{Request, Response, Status};

use crate::actors::{DrainMode, Registration, RouterHandle};

/// The operator service over the RouterActor.
#[derive(Clone)]
pub struct AdminService {
    router: RouterHandle,
}

impl AdminService {
    /// An admin service acting on `router`.
    pub fn new(router: RouterHandle) -> Self {
        Self { router }
    }

    async fn set_drain(&self, id: String, mode: DrainMode) -> Result<pb::DrainResponse, Status> {
        let worker = self.router.set_drain(&id, mode).await?;
        Ok(pb::DrainResponse {
            worker: Some(worker),
        })
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_workers(
        &self,
        _request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let workers = self.router.list_workers().await?;
        Ok(Response::new(pb::ListWorkersResponse { workers }))
    }

    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let r = request.into_inner();
        let lease = self
            .router
            .register(Registration {
                id: r.id,
                address: r.address,
                weight: if r.weight == 0.0 { 1.0 } else { r.weight },
                lease_s: r.lease_s,
            })
            .await?;
        Ok(Response::new(pb::RegisterResponse {
            lease_s: lease.as_secs_f64(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let lease = self.router.heartbeat(&request.into_inner().id).await?;
        Ok(Response::new(pb::HeartbeatResponse {
            lease_s: lease.as_secs_f64(),
        }))
    }

    async fn drain(
        &self,
        request: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        let resp = self
            .set_drain(request.into_inner().id, DrainMode::Drain)
            .await?;
        Ok(Response::new(resp))
    }

    async fn undrain(
        &self,
        request: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        let resp = self
            .set_drain(request.into_inner().id, DrainMode::Undrain)
            .await?;
        Ok(Response::new(resp))
    }
}
