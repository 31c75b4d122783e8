//! Cache-aware routing: send a prompt to the worker that last served its longest prefix, so
//! the worker's prefix cache (vLLM automatic prefix caching, SGLang RadixAttention) can skip
//! recomputing that prefix's KV blocks.
//!
//! Prompts are cut into full blocks of `block_size` tokens and each block is hashed together
//! with the hash of the block before it (vLLM's chained block hash), so hash `k` names the
//! whole prefix up to block `k`. The policy remembers, for each such hash, the worker that
//! served it last, in a map bounded by evicting the least recently recorded entries.
//!
//! Affinity yields to load: if the preferred worker's weighted load exceeds
//! `overload_factor * least_load + 1`, the request goes to the least-loaded worker instead,
//! which then becomes the prefix's owner (sglang's cache-aware policy balances the same way).

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use super::{argmin_by, Policy, RouteRequest, WorkerView};

/// Default bound on remembered prefix blocks: 100k entries is a few MB and covers far more
/// prefixes than the workers' caches hold.
pub const DEFAULT_CAPACITY: usize = 100_000;

/// Who served a prefix block last, and when (for eviction).
#[derive(Debug)]
struct Owner {
    worker: Arc<str>,
    stamp: u64,
}

/// Prefix-affinity routing with a least-loaded fallback.
#[derive(Debug)]
pub struct PrefixAffinity {
    /// Tokens per hashed block; should match the workers' KV block size so a remembered
    /// prefix corresponds to whole cached blocks.
    block_size: usize,
    /// How much busier than the least-loaded worker the preferred one may be.
    overload_factor: f64,
    /// Most entries `owners` may hold.
    capacity: usize,
    /// Chained block hash -> the worker that served it last.
    owners: HashMap<u64, Owner>,
    /// Recording order (stamp -> hash), oldest first, to evict in O(log n).
    by_age: BTreeMap<u64, u64>,
    /// Monotonic stamp source.
    clock: u64,
}

impl PrefixAffinity {
    /// A policy remembering up to [`DEFAULT_CAPACITY`] blocks.
    ///
    /// Values the config validation would reject are made safe rather than trusted:
    /// `block_size` 0 counts as 1 and an `overload_factor` below 1 (or NaN) as 1.
    pub fn new(block_size: u32, overload_factor: f64) -> Self {
        Self::with_capacity(block_size, overload_factor, DEFAULT_CAPACITY)
    }

    /// Like [`PrefixAffinity::new`] with an explicit bound on remembered blocks (at least 1).
    pub fn with_capacity(block_size: u32, overload_factor: f64, capacity: usize) -> Self {
        let overload_factor = if overload_factor >= 1.0 && overload_factor.is_finite() {
            overload_factor
        } else {
            1.0
        };
        Self {
            block_size: usize::try_from(block_size.max(1)).unwrap_or(usize::MAX),
            overload_factor,
            capacity: capacity.max(1),
            owners: HashMap::new(),
            by_age: BTreeMap::new(),
            clock: 0,
        }
    }

    /// Number of remembered prefix blocks.
    pub fn len(&self) -> usize {
        self.owners.len()
    }

    /// Whether nothing is remembered yet.
    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
    }

    /// Index of the candidate that served the longest prefix of `hashes`, if any did.
    fn affinity(&self, hashes: &[u64], workers: &[WorkerView]) -> Option<usize> {
        let index: HashMap<&str, usize> = workers
            .iter()
            .enumerate()
            .map(|(i, w)| (w.id.as_str(), i))
            .collect();
        hashes.iter().rev().find_map(|h| {
            let owner = self.owners.get(h)?;
            index.get(owner.worker.as_ref()).copied()
        })
    }

    /// Whether `preferred` is too busy compared with `least` to keep affinity.
    fn overloaded(&self, preferred: &WorkerView, least: &WorkerView) -> bool {
        preferred.weighted_in_flight() > self.overload_factor * least.weighted_in_flight() + 1.0
    }

    /// Makes `worker` the owner of every hash, then evicts the oldest beyond capacity.
    fn record(&mut self, hashes: &[u64], worker: &str) {
        let worker: Arc<str> = Arc::from(worker);
        for &hash in hashes {
            self.clock += 1;
            let owner = Owner {
                worker: Arc::clone(&worker),
                stamp: self.clock,
            };
            if let Some(old) = self.owners.insert(hash, owner) {
                self.by_age.remove(&old.stamp);
            }
            self.by_age.insert(self.clock, hash);
        }
        while self.owners.len() > self.capacity {
            let Some((_, hash)) = self.by_age.pop_first() else {
                break;
            };
            self.owners.remove(&hash);
        }
    }
}

/// Chained hashes of the full `block_size` blocks at the start of `tokens`; a trailing
/// partial block is left out because workers cache only full blocks.
fn prefix_hashes(tokens: &[u32], block_size: usize) -> Vec<u64> {
    let mut parent = 0u64;
    tokens
        .chunks_exact(block_size)
        .map(|block| {
            let mut hasher = DefaultHasher::new();
            parent.hash(&mut hasher);
            block.hash(&mut hasher);
            parent = hasher.finish();
            parent
        })
        .collect()
}

impl Policy for PrefixAffinity {
    fn name(&self) -> &'static str {
        "prefix_affinity"
    }

    fn pick(&mut self, req: &RouteRequest<'_>, workers: &[WorkerView]) -> Option<usize> {
        let least = argmin_by(workers, WorkerView::weighted_in_flight)?;
        let hashes = prefix_hashes(req.prompt_token_ids, self.block_size);
        let chosen = match self.affinity(&hashes, workers) {
            Some(i) if !self.overloaded(&workers[i], &workers[least]) => i,
            _ => least,
        };
        self.record(&hashes, &workers[chosen].id);
        Some(chosen)
    }

    fn on_worker_removed(&mut self, worker_id: &str) {
        let by_age = &mut self.by_age;
        self.owners.retain(|_, owner| {
            let keep = owner.worker.as_ref() != worker_id;
            if !keep {
                by_age.remove(&owner.stamp);
            }
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::worker;
    use super::*;

    const BLOCK: u32 = 4;

    fn pick(policy: &mut PrefixAffinity, prompt: &[u32], workers: &[WorkerView]) -> Option<usize> {
        policy.pick(
            &RouteRequest {
                prompt_token_ids: prompt,
            },
            workers,
        )
    }

    fn three_workers() -> Vec<WorkerView> {
        vec![
            worker("a", 1.0, 0),
            worker("b", 1.0, 0),
            worker("c", 1.0, 0),
        ]
    }

    #[test]
    fn repeated_prefix_sticks_to_one_worker() -> anyhow::Result<()> {
        let mut policy = PrefixAffinity::new(BLOCK, 2.0);
        let mut workers = three_workers();
        workers[0].in_flight = 1;
        assert_eq!(
            pick(&mut policy, &[1, 2, 3, 4, 5, 6, 7, 8, 100], &workers),
            Some(1)
        );
        // c is now least loaded, but b holds the prefix and is within the overload bound.
        workers[0].in_flight = 0;
        workers[1].in_flight = 1;
        for tail in 200..205 {
            assert_eq!(
                pick(&mut policy, &[1, 2, 3, 4, 5, 6, 7, 8, tail], &workers),
                Some(1)
            );
        }
        Ok(())
    }

    #[test]
    fn different_prefixes_spread() -> anyhow::Result<()> {
        let mut policy = PrefixAffinity::new(BLOCK, 2.0);
        let mut workers = three_workers();
        let mut chosen = Vec::new();
        for first in [10, 20, 30] {
            let i = pick(&mut policy, &[first, 1, 2, 3, 4, 5, 6, 7], &workers)
                .ok_or_else(|| anyhow::anyhow!("no pick"))?;
            workers[i].in_flight += 1;
            chosen.push(i);
        }
        chosen.sort_unstable();
        assert_eq!(chosen, [0, 1, 2]);
        Ok(())
    }

    #[test]
    fn overload_breaks_affinity_and_moves_the_prefix() -> anyhow::Result<()> {
        let mut policy = PrefixAffinity::new(BLOCK, 2.0);
        let mut workers = three_workers();
        let prompt = [1, 2, 3, 4, 5, 6, 7, 8];
        workers[0].in_flight = 1;
        workers[2].in_flight = 1;
        assert_eq!(pick(&mut policy, &prompt, &workers), Some(1));
        // b: 4 > 2 * 1 + 1, so the least-loaded a takes it.
        workers[0].in_flight = 1;
        workers[1].in_flight = 4;
        workers[2].in_flight = 2;
        assert_eq!(pick(&mut policy, &prompt, &workers), Some(0));
        // At the bound (3 <= 2 * 1 + 1) affinity holds, now to a.
        workers[0].in_flight = 3;
        workers[1].in_flight = 1;
        workers[2].in_flight = 1;
        assert_eq!(pick(&mut policy, &prompt, &workers), Some(0));
        Ok(())
    }

    #[test]
    fn longest_matching_prefix_wins() -> anyhow::Result<()> {
        let mut policy = PrefixAffinity::new(BLOCK, 10.0);
        let mut workers = three_workers();
        workers[0].in_flight = 1;
        workers[2].in_flight = 1;
        assert_eq!(
            pick(&mut policy, &[1, 2, 3, 4, 5, 6, 7, 8], &workers),
            Some(1)
        );
        // A prompt sharing only the first block, forced onto c by load: c owns block 1.
        workers[1].in_flight = 50;
        workers[2].in_flight = 0;
        assert_eq!(
            pick(&mut policy, &[1, 2, 3, 4, 9, 9, 9, 9], &workers),
            Some(2)
        );
        // The two-block prefix still belongs to b.
        workers[1].in_flight = 1;
        assert_eq!(
            pick(&mut policy, &[1, 2, 3, 4, 5, 6, 7, 8], &workers),
            Some(1)
        );
        Ok(())
    }

    #[test]
    fn short_prompt_and_absent_owner_go_least_loaded() -> anyhow::Result<()> {
        let mut policy = PrefixAffinity::new(BLOCK, 2.0);
        let mut workers = three_workers();
        workers[0].in_flight = 2;
        assert_eq!(pick(&mut policy, &[1, 2, 3], &workers), Some(1));
        assert!(policy.is_empty());
        assert_eq!(pick(&mut policy, &[1, 2, 3, 4], &workers), Some(1));
        // b is filtered out (full or draining): the least loaded of the rest.
        let rest = [workers[0].clone(), workers[2].clone()];
        assert_eq!(pick(&mut policy, &[1, 2, 3, 4], &rest), Some(1));
        Ok(())
    }

    #[test]
    fn weighted_load_decides_overload() -> anyhow::Result<()> {
        let mut policy = PrefixAffinity::new(BLOCK, 2.0);
        let mut workers = vec![worker("big", 4.0, 0), worker("small", 1.0, 0)];
        let prompt = [1, 2, 3, 4];
        assert_eq!(pick(&mut policy, &prompt, &workers), Some(0));
        // big: 8/4 = 2 <= 2 * (1/2) + 1 keeps affinity; raw counts (8 > 2 * 1 + 1) would not.
        workers[0].in_flight = 8;
        workers[1].weight = 2.0;
        workers[1].in_flight = 1;
        assert_eq!(pick(&mut policy, &prompt, &workers), Some(0));
        Ok(())
    }

    #[test]
    fn evicts_oldest_beyond_capacity() -> anyhow::Result<()> {
        let mut policy = PrefixAffinity::with_capacity(BLOCK, 2.0, 2);
        let mut workers = three_workers();
        for (i, first) in [10, 20, 30].into_iter().enumerate() {
            workers.iter_mut().for_each(|w| w.in_flight = 1);
            workers[i].in_flight = 0;
            assert_eq!(pick(&mut policy, &[first, 0, 0, 0], &workers), Some(i));
        }
        assert_eq!(policy.len(), 2);
        // Prefix 10 (a) was evicted: goes least-loaded (c); prefix 30 still sticks to c.
        workers.iter_mut().for_each(|w| w.in_flight = 1);
        workers[2].in_flight = 0;
        workers[1].in_flight = 0;
        assert_eq!(pick(&mut policy, &[10, 0, 0, 0], &workers), Some(1));
        assert_eq!(pick(&mut policy, &[30, 0, 0, 0], &workers), Some(2));
        Ok(())
    }

    #[test]
    fn removed_worker_is_forgotten() -> anyhow::Result<()> {
        let mut policy = PrefixAffinity::new(BLOCK, 2.0);
        let workers = three_workers();
        assert_eq!(
            pick(&mut policy, &[1, 2, 3, 4, 5, 6, 7, 8], &workers),
            Some(0)
        );
        assert_eq!(policy.len(), 2);
        policy.on_worker_removed("a");
        assert!(policy.is_empty());
        assert!(policy.by_age.is_empty());
        Ok(())
    }

    #[test]
    fn empty_list_is_none() -> anyhow::Result<()> {
        let mut policy = PrefixAffinity::new(BLOCK, 2.0);
        assert_eq!(pick(&mut policy, &[1, 2, 3, 4], &[]), None);
        assert!(policy.is_empty());
        Ok(())
    }
}
