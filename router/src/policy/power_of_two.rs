//! Power of two choices (Mitzenmacher, "The Power of Two Choices in Randomized Load
//! Balancing"): sample two distinct workers at random, weighted by capacity, and keep the less
//! loaded one. Nearly as good as a global minimum but robust to stale load reports, because
//! the randomness keeps many routers (or many picks between reports) from all piling onto the
//! same "least loaded" worker.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Policy, RouteRequest, WorkerView};

/// Power of two choices over a capacity-weighted sample.
///
/// Generic over the RNG so tests inject a seeded one and production uses OS entropy.
#[derive(Debug)]
pub struct PowerOfTwo<R = StdRng> {
    /// Source of the two samples; owned because the RouterActor owns the policy.
    rng: R,
}

impl PowerOfTwo<StdRng> {
    /// A policy seeded from the operating system, for production.
    pub fn from_entropy() -> Self {
        Self::new(StdRng::from_os_rng())
    }

    /// A reproducible policy, for tests and simulations.
    pub fn seeded(seed: u64) -> Self {
        Self::new(StdRng::seed_from_u64(seed))
    }
}

impl<R: Rng> PowerOfTwo<R> {
    /// A policy drawing from `rng`.
    pub fn new(rng: R) -> Self {
        Self { rng }
    }

    /// Draws an index with probability proportional to capacity, never `skip`.
    fn weighted_sample(&mut self, workers: &[WorkerView], skip: Option<usize>) -> Option<usize> {
        let eligible = || {
            workers
                .iter()
                .enumerate()
                .filter(move |(i, _)| Some(*i) != skip)
        };
        let total: f64 = eligible().map(|(_, w)| w.capacity()).sum();
        let mut target = self.rng.random::<f64>() * total;
        let mut last = None;
        for (i, w) in eligible() {
            target -= w.capacity();
            if target < 0.0 {
                return Some(i);
            }
            last = Some(i);
        }
        // Float rounding can leave `target` at ~0 after the last worker.
        last
    }
}

/// The load score the two samples are compared on:
/// `(in_flight + waiting) / weight + kv_usage`.
///
/// The first term counts requests per unit of capacity: in-flight requests are the router's
/// exact count, `waiting` adds what queues on the worker from other routers. `kv_usage`
/// (0..=1) breaks ties towards the worker with free KV cache, which can admit a new
/// sequence without preempting; it is worth at most one request per unit of weight.
pub fn load_score(worker: &WorkerView) -> f64 {
    let requests = f64::from(worker.in_flight) + f64::from(worker.waiting);
    let kv = if worker.kv_usage.is_finite() {
        worker.kv_usage.clamp(0.0, 1.0)
    } else {
        0.0
    };
    requests / worker.capacity() + kv
}

impl<R: Rng + Send> Policy for PowerOfTwo<R> {
    fn name(&self) -> &'static str {
        "power_of_two"
    }

    fn pick(&mut self, _req: &RouteRequest<'_>, workers: &[WorkerView]) -> Option<usize> {
        let first = self.weighted_sample(workers, None)?;
        let Some(second) = self.weighted_sample(workers, Some(first)) else {
            return Some(first);
        };
        if load_score(&workers[second]) < load_score(&workers[first]) {
            Some(second)
        } else {
            Some(first)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::worker;
    use super::*;

    const REQ: RouteRequest<'static> = RouteRequest {
        prompt_token_ids: &[],
    };

    fn counts(policy: &mut PowerOfTwo, workers: &[WorkerView], picks: usize) -> Vec<usize> {
        let mut counts = vec![0; workers.len()];
        for _ in 0..picks {
            if let Some(i) = policy.pick(&REQ, workers) {
                counts[i] += 1;
            }
        }
        counts
    }

    #[test]
    fn never_picks_the_most_loaded_of_three() -> anyhow::Result<()> {
        let workers = [
            worker("a", 1.0, 3),
            worker("b", 1.0, 9),
            worker("c", 1.0, 1),
        ];
        let counts = counts(&mut PowerOfTwo::seeded(7), &workers, 200);
        assert_eq!(counts[1], 0, "{counts:?}");
        assert_eq!(counts.iter().sum::<usize>(), 200);
        // c wins every pair it is in (2 of 3 pairs), a only the pair {a, b}.
        assert!(counts[2] > counts[0] && counts[0] > 0, "{counts:?}");
        Ok(())
    }

    #[test]
    fn score_divides_by_weight_and_adds_kv_usage() -> anyhow::Result<()> {
        let mut big = worker("big", 4.0, 6);
        big.waiting = 2;
        big.kv_usage = 0.5;
        assert_eq!(load_score(&big), 2.5);
        let mut bad = worker("bad", 1.0, 1);
        bad.kv_usage = f64::NAN;
        assert_eq!(load_score(&bad), 1.0);
        Ok(())
    }

    #[test]
    fn kv_usage_breaks_ties() -> anyhow::Result<()> {
        let mut full = worker("full", 1.0, 2);
        full.kv_usage = 0.9;
        let workers = [full, worker("free", 1.0, 2)];
        let counts = counts(&mut PowerOfTwo::seeded(1), &workers, 50);
        assert_eq!(counts, [0, 50]);
        Ok(())
    }

    #[test]
    fn samples_in_proportion_to_weight() -> anyhow::Result<()> {
        // Equal scores: the first sample wins, so picks follow the weighted sampling.
        let workers = [worker("a", 3.0, 0), worker("b", 1.0, 0)];
        let counts = counts(&mut PowerOfTwo::seeded(42), &workers, 400);
        assert!(counts[0] > 2 * counts[1], "{counts:?}");
        Ok(())
    }

    #[test]
    fn empty_list_is_none() -> anyhow::Result<()> {
        assert_eq!(PowerOfTwo::seeded(0).pick(&REQ, &[]), None);
        Ok(())
    }
}
