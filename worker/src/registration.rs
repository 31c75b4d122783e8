//! Dynamic registration with a router: `Admin.Register` with a lease, then `Admin.Heartbeat`
//! every third of the granted lease, so a worker that dies drops out of the router's registry
//! when its lease lapses. Every failure is logged and retried with capped exponential backoff;
//! nothing here can take the worker down.

use std::time::Duration;

use orchard_common::config::RegistrationConfig;
use orchard_proto::v1 as pb;
use orchard_proto::v1::admin_client::AdminClient;
use rand::Rng;
use tonic::transport::{Channel, Endpoint};

/// First retry delay after a failure.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest retry delay, so a returning router sees the worker again quickly.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Floor of the heartbeat interval, whatever lease the router grants.
const MIN_HEARTBEAT: Duration = Duration::from_millis(50);
/// Bound on connecting to the router, so a dead address does not stall the loop.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What this worker tells the router about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Announcement {
    pub id: String,
    /// The address the router dials (`http://host:port`).
    pub address: String,
    /// Relative capacity of this host, used to weight routing.
    pub weight: f64,
}

/// Why one registration or heartbeat attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error("router address `{address}`: {source}")]
    Address {
        address: String,
        source: tonic::transport::Error,
    },
    #[error("connecting to the router: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("router answered {}: {}", .0.code(), .0.message())]
    Rpc(#[from] tonic::Status),
}

/// Registers and keeps the lease alive for as long as the task runs (abort the task to stop).
pub async fn run(cfg: RegistrationConfig, me: Announcement) {
    let mut backoff = MIN_BACKOFF;
    loop {
        match register(&cfg, &me).await {
            Ok((client, lease)) => {
                tracing::info!(router = %cfg.router, address = %me.address, ?lease, "registered with router");
                backoff = MIN_BACKOFF;
                let err = keep_alive(client, &me.id, lease).await;
                tracing::warn!(router = %cfg.router, error = %err, "heartbeat failed; registering again");
            }
            Err(err) => {
                let delay = jittered(backoff);
                tracing::warn!(router = %cfg.router, error = %err, retry_in = ?delay, "registration failed");
                tokio::time::sleep(delay).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// One `Register` call; returns the client for heartbeats and the lease the router granted.
async fn register(
    cfg: &RegistrationConfig,
    me: &Announcement,
) -> Result<(AdminClient<Channel>, Duration), RegistrationError> {
    let endpoint =
        Endpoint::from_shared(cfg.router.clone()).map_err(|source| RegistrationError::Address {
            address: cfg.router.clone(),
            source,
        })?;
    let channel = endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(cfg.lease.max(CONNECT_TIMEOUT))
        .connect()
        .await?;
    let mut client = AdminClient::new(channel);
    let granted = client
        .register(pb::RegisterRequest {
            id: me.id.clone(),
            address: me.address.clone(),
            weight: me.weight,
            lease_s: cfg.lease.as_secs_f64(),
        })
        .await?
        .into_inner()
        .lease_s;
    Ok((client, lease_or(granted, cfg.lease)))
}

/// Heartbeats every third of the lease until one fails; returns that failure.
async fn keep_alive(
    mut client: AdminClient<Channel>,
    id: &str,
    lease: Duration,
) -> RegistrationError {
    let mut lease = lease;
    loop {
        tokio::time::sleep((lease / 3).max(MIN_HEARTBEAT)).await;
        let beat = client
            .heartbeat(pb::HeartbeatRequest { id: id.to_string() })
            .await;
        match beat {
            Ok(resp) => lease = lease_or(resp.into_inner().lease_s, lease),
            Err(status) => return status.into(),
        }
    }
}

/// The lease in a router's answer, or `fallback` when the answer carries none.
fn lease_or(lease_s: f64, fallback: Duration) -> Duration {
    Duration::try_from_secs_f64(lease_s)
        .ok()
        .filter(|d| !d.is_zero())
        .unwrap_or(fallback)
}

/// `delay` +-20%, so workers restarted together do not retry in lockstep.
fn jittered(delay: Duration) -> Duration {
    delay.mul_f64(rand::rng().random_range(0.8..1.2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn router_lease_wins_unless_missing() {
        let requested = Duration::from_secs(10);
        assert_eq!(lease_or(3.0, requested), Duration::from_secs(3));
        assert_eq!(lease_or(0.0, requested), requested);
        assert_eq!(lease_or(f64::NAN, requested), requested);
        assert_eq!(lease_or(-1.0, requested), requested);
    }
}
