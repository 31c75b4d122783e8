//! Smooth weighted round robin, as in nginx's upstream balancer: each pick every candidate
//! gains its weight in credit, the richest wins and pays back the total. Weights 5:1:1 give
//! `a a b a c a a` rather than `a a a a a b c`, so a heavy worker never gets a burst.

use std::collections::HashMap;

use super::{Policy, RouteRequest, WorkerView};

/// Weighted round robin that ignores load; useful as a baseline and when loads are equal.
#[derive(Debug, Default)]
pub struct RoundRobin {
    /// Current credit per worker id; keyed by id because candidate indices shift when a
    /// worker is filtered out (full, draining) or removed.
    credit: HashMap<String, f64>,
}

impl RoundRobin {
    /// A round robin with no history.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Policy for RoundRobin {
    fn name(&self) -> &'static str {
        "round_robin"
    }

    fn pick(&mut self, _req: &RouteRequest<'_>, workers: &[WorkerView]) -> Option<usize> {
        let mut total = 0.0;
        let mut best: Option<(usize, f64)> = None;
        for (i, w) in workers.iter().enumerate() {
            let weight = w.capacity();
            total += weight;
            let credit = self.credit.entry(w.id.clone()).or_insert(0.0);
            *credit += weight;
            if best.is_none_or(|(_, c)| *credit > c) {
                best = Some((i, *credit));
            }
        }
        let (index, _) = best?;
        if let Some(credit) = self.credit.get_mut(&workers[index].id) {
            *credit -= total;
        }
        Some(index)
    }

    fn on_worker_removed(&mut self, worker_id: &str) {
        self.credit.remove(worker_id);
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::worker;
    use super::*;

    const REQ: RouteRequest<'static> = RouteRequest {
        prompt_token_ids: &[],
    };

    #[test]
    fn cycles_in_weighted_proportion() -> anyhow::Result<()> {
        let workers = [worker("a", 2.0, 0), worker("b", 1.0, 0)];
        let mut rr = RoundRobin::new();
        let mut counts = [0usize; 2];
        for _ in 0..30 {
            let i = rr
                .pick(&REQ, &workers)
                .ok_or_else(|| anyhow::anyhow!("no pick"))?;
            counts[i] += 1;
        }
        assert_eq!(counts, [20, 10]);
        Ok(())
    }

    #[test]
    fn smooth_order_interleaves_heavy_worker() -> anyhow::Result<()> {
        let workers = [
            worker("a", 5.0, 0),
            worker("b", 1.0, 0),
            worker("c", 1.0, 0),
        ];
        let mut rr = RoundRobin::new();
        let order: Vec<&str> = (0..7)
            .filter_map(|_| rr.pick(&REQ, &workers))
            .map(|i| workers[i].id.as_str())
            .collect();
        assert_eq!(order, ["a", "a", "b", "a", "c", "a", "a"]);
        Ok(())
    }

    #[test]
    fn equal_weights_alternate_and_ignore_load() -> anyhow::Result<()> {
        let workers = [worker("a", 1.0, 50), worker("b", 1.0, 0)];
        let mut rr = RoundRobin::new();
        let order: Vec<usize> = (0..4).filter_map(|_| rr.pick(&REQ, &workers)).collect();
        assert_eq!(order, [0, 1, 0, 1]);
        Ok(())
    }

    #[test]
    fn empty_list_is_none() -> anyhow::Result<()> {
        assert_eq!(RoundRobin::new().pick(&REQ, &[]), None);
        Ok(())
    }
}
