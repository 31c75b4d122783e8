//! Routing policies: given the workers that may take a request right now, pick one.
//!
//! One file per policy behind the [`Policy`] trait, as in sglang's Rust gateway. The
//! RouterActor owns its policy exclusively, filters out unhealthy, draining and full workers,
//! and passes the rest as [`WorkerView`]s; the policy only chooses among them. Every policy
//! weighs workers by their capacity ([`WorkerView::weight`]) so a bigger host gets a
//! proportionally bigger share.

mod least_outstanding;
mod power_of_two;
mod prefix_affinity;
mod round_robin;

pub use least_outstanding::LeastOutstanding;
pub use power_of_two::PowerOfTwo;
pub use prefix_affinity::PrefixAffinity;
pub use round_robin::RoundRobin;

use orchard_common::config::PolicyConfig;

/// A candidate worker as the RouterActor sees it at routing time.
///
/// A snapshot, not a handle: policies must not assume it stays current after `pick`.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerView {
    /// Stable worker id; policies key their memory (RR credit, prefix owners) by it because
    /// indices change as workers come and go.
    pub id: String,
    /// Relative capacity of the host; loads are divided by it so a weight-2 worker takes
    /// twice the traffic of a weight-1 worker.
    pub weight: f64,
    /// Requests the router has sent and not yet seen finish; the freshest load signal
    /// because the router updates it itself.
    pub in_flight: u32,
    /// Sequences the worker reported running (from its last load report).
    pub running: u32,
    /// Requests queued on the worker (from its last load report).
    pub waiting: u32,
    /// Fraction of the worker's KV cache in use, 0..=1; high usage means preemption soon.
    pub kv_usage: f64,
    /// The worker's batch cap, for policies that reason about saturation.
    pub max_num_seqs: u32,
}

impl WorkerView {
    /// The weight used for division: a non-finite or non-positive weight (a bad report
    /// from a registering worker) counts as 1.0 so it neither starves nor floods the worker
    /// and never divides by zero.
    pub fn capacity(&self) -> f64 {
        if self.weight.is_finite() && self.weight > 0.0 {
            self.weight
        } else {
            1.0
        }
    }

    /// Requests in flight per unit of capacity: the load least-outstanding and
    /// prefix affinity compare.
    pub fn weighted_in_flight(&self) -> f64 {
        f64::from(self.in_flight) / self.capacity()
    }
}

/// What a policy may look at in a request; borrowed so routing copies nothing.
#[derive(Debug, Clone, Copy)]
pub struct RouteRequest<'a> {
    /// The tokenized prompt; prefix affinity hashes its leading blocks.
    pub prompt_token_ids: &'a [u32],
}

/// A routing policy. `&mut self` because the RouterActor owns it exclusively, so policies
/// keep plain state (RR credits, prefix map, RNG) without locks.
pub trait Policy: Send {
    /// Short name for logs and metric labels.
    fn name(&self) -> &'static str;

    /// Picks one of `workers` for `req` and returns its index in `workers`;
    /// `None` only when `workers` is empty.
    fn pick(&mut self, req: &RouteRequest<'_>, workers: &[WorkerView]) -> Option<usize>;

    /// Called after a request finished on `worker_id`; for policies that track their own load.
    fn on_complete(&mut self, _worker_id: &str) {}

    /// Called when a worker leaves the pool, so policies drop state keyed by its id.
    fn on_worker_removed(&mut self, _worker_id: &str) {}
}

/// Builds the policy the config names; the config enum is the single source of truth.
pub fn from_config(config: &PolicyConfig) -> Box<dyn Policy> {
    match config {
        PolicyConfig::RoundRobin => Box::new(RoundRobin::new()),
        PolicyConfig::LeastOutstanding => Box::new(LeastOutstanding),
        PolicyConfig::PowerOfTwo => Box::new(PowerOfTwo::from_entropy()),
        PolicyConfig::PrefixAffinity {
            block_size,
            overload_factor,
        } => Box::new(PrefixAffinity::new(*block_size, *overload_factor)),
    }
}

/// Index of the worker with the smallest `load`; ties go to the lowest index so results
/// are deterministic.
fn argmin_by(workers: &[WorkerView], load: impl Fn(&WorkerView) -> f64) -> Option<usize> {
    workers
        .iter()
        .enumerate()
        .map(|(i, w)| (i, load(w)))
        .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))
        .map(|(i, _)| i)
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::WorkerView;

    /// A worker with the given id, weight and in-flight count and otherwise idle.
    pub fn worker(id: &str, weight: f64, in_flight: u32) -> WorkerView {
        WorkerView {
            id: id.to_string(),
            weight,
            in_flight,
            running: 0,
            waiting: 0,
            kv_usage: 0.0,
            max_num_seqs: 32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::worker;
    use super::*;

    fn all_configs() -> Vec<PolicyConfig> {
        vec![
            PolicyConfig::RoundRobin,
            PolicyConfig::LeastOutstanding,
            PolicyConfig::PowerOfTwo,
            PolicyConfig::PrefixAffinity {
                block_size: 4,
                overload_factor: 2.0,
            },
        ]
    }

    #[test]
    fn every_policy_returns_none_for_no_workers() -> anyhow::Result<()> {
        let req = RouteRequest {
            prompt_token_ids: &[1, 2, 3, 4, 5],
        };
        for cfg in all_configs() {
            let mut policy = from_config(&cfg);
            anyhow::ensure!(policy.pick(&req, &[]).is_none(), "{}", policy.name());
        }
        Ok(())
    }

    #[test]
    fn every_policy_picks_the_only_worker() -> anyhow::Result<()> {
        let req = RouteRequest {
            prompt_token_ids: &[1, 2, 3, 4, 5],
        };
        let workers = [worker("a", 1.0, 7)];
        for cfg in all_configs() {
            let mut policy = from_config(&cfg);
            anyhow::ensure!(policy.pick(&req, &workers) == Some(0), "{}", policy.name());
        }
        Ok(())
    }

    #[test]
    fn from_config_builds_the_named_policy() -> anyhow::Result<()> {
        let names: Vec<&str> = all_configs()
            .iter()
            .map(|c| from_config(c).name())
            .collect();
        assert_eq!(
            names,
            [
                "round_robin",
                "least_outstanding",
                "power_of_two",
                "prefix_affinity"
            ]
        );
        Ok(())
    }

    #[test]
    fn bad_weight_counts_as_one() -> anyhow::Result<()> {
        assert_eq!(worker("a", 0.0, 3).weighted_in_flight(), 3.0);
        assert_eq!(worker("a", f64::NAN, 3).weighted_in_flight(), 3.0);
        assert_eq!(worker("a", 2.0, 3).weighted_in_flight(), 1.5);
        Ok(())
    }
}
