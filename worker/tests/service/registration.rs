//! Registration with a router: a fake `Admin` service records what the worker sends.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use orchard_common::config::RegistrationConfig;
use orchard_proto::v1 as pb;
use orchard_proto::v1::admin_server::{Admin, AdminServer};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use crate::support::{TestWorker, POLL};
use orchard_worker::sim::test_worker_config;

/// What the fake router saw.
#[derive(Debug, Default)]
struct Seen {
    registers: Vec<pb::RegisterRequest>,
    heartbeats: usize,
}

/// An `Admin` service that refuses the first registration (to exercise the retry) and grants
/// a short lease after that.
#[derive(Clone, Default)]
struct FakeRouter {
    seen: Arc<Mutex<Seen>>,
}

const GRANTED_LEASE_S: f64 = 0.3;

impl FakeRouter {
    fn snapshot(&self) -> (Vec<pb::RegisterRequest>, usize) {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        (seen.registers.clone(), seen.heartbeats)
    }
}

#[tonic::async_trait]
impl Admin for FakeRouter {
    async fn list_workers(
        &self,
        _: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        Err(Status::unimplemented("fake router"))
    }

    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.registers.push(request.into_inner());
        if seen.registers.len() == 1 {
            return Err(Status::unavailable("router still starting"));
        }
        Ok(Response::new(pb::RegisterResponse {
            lease_s: GRANTED_LEASE_S,
        }))
    }

    async fn heartbeat(
        &self,
        _: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.heartbeats += 1;
        Ok(Response::new(pb::HeartbeatResponse {
            lease_s: GRANTED_LEASE_S,
        }))
    }

    async fn drain(
        &self,
        _: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        Err(Status::unimplemented("fake router"))
    }

    async fn undrain(
        &self,
        _: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        Err(Status::unimplemented("fake router"))
    }
}

#[tokio::test]
async fn registers_after_a_refusal_and_keeps_the_lease_alive() -> Result<()> {
    let router = FakeRouter::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let router_addr = listener.local_addr()?;
    let served = tonic::transport::Server::builder()
        .add_service(AdminServer::new(router.clone()))
        .serve_with_incoming(TcpListenerStream::new(listener));
    let router_task = tokio::spawn(served);

    let mut cfg = test_worker_config("sim-registered");
    cfg.weight = 2.5;
    cfg.registration = Some(RegistrationConfig {
        router: format!("http://{router_addr}"),
        advertise: None,
        lease: Duration::from_secs(30),
    });
    let worker = TestWorker::serving(cfg).await?;

    // Granted lease 0.3 s -> a heartbeat every 0.1 s; wait for a few.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (registers, heartbeats) = loop {
        let (registers, heartbeats) = router.snapshot();
        if heartbeats >= 3 {
            break (registers, heartbeats);
        }
        if Instant::now() > deadline {
            bail!("{} registrations, {heartbeats} heartbeats", registers.len());
        }
        tokio::time::sleep(POLL).await;
    };
    assert!(heartbeats >= 3);
    assert_eq!(registers.len(), 2, "one refused attempt, then one success");
    let last = &registers[1];
    assert_eq!(last.id, "sim-registered");
    assert_eq!(last.address, format!("http://{}", worker.addr));
    assert_eq!(last.weight, 2.5);
    assert_eq!(last.lease_s, 30.0);
    worker.stop().await?;
    router_task.abort();
    Ok(())
}
