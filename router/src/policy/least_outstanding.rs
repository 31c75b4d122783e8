//! Least outstanding requests: send to the worker with the fewest requests in flight per unit
//! of capacity. Uses the router's own in-flight count, which is exact and never stale, unlike
//! the workers' periodic load reports.

use super::{argmin_by, Policy, RouteRequest, WorkerView};

/// Picks the minimum of `in_flight / weight`; ties go to the first candidate.
#[derive(Debug, Default, Clone, Copy)]
pub struct LeastOutstanding;

impl Policy for LeastOutstanding {
    fn name(&self) -> &'static str {
        "least_outstanding"
    }

    fn pick(&mut self, _req: &RouteRequest<'_>, workers: &[WorkerView]) -> Option<usize> {
        argmin_by(workers, WorkerView::weighted_in_flight)
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
    fn picks_lowest_in_flight() -> anyhow::Result<()> {
        let workers = [
            worker("a", 1.0, 5),
            worker("b", 1.0, 2),
            worker("c", 1.0, 9),
        ];
        assert_eq!(LeastOutstanding.pick(&REQ, &workers), Some(1));
        Ok(())
    }

    #[test]
    fn divides_load_by_weight() -> anyhow::Result<()> {
        // a: 6/4 = 1.5 beats b: 2/1 = 2 although a has more requests.
        let workers = [worker("a", 4.0, 6), worker("b", 1.0, 2)];
        assert_eq!(LeastOutstanding.pick(&REQ, &workers), Some(0));
        Ok(())
    }

    #[test]
    fn fills_in_weighted_proportion() -> anyhow::Result<()> {
        let mut workers = [worker("a", 2.0, 0), worker("b", 1.0, 0)];
        for _ in 0..30 {
            let i = LeastOutstanding
                .pick(&REQ, &workers)
                .ok_or_else(|| anyhow::anyhow!("no pick"))?;
            workers[i].in_flight += 1;
        }
        assert_eq!((workers[0].in_flight, workers[1].in_flight), (20, 10));
        Ok(())
    }

    #[test]
    fn empty_list_is_none() -> anyhow::Result<()> {
        assert_eq!(LeastOutstanding.pick(&REQ, &[]), None);
        Ok(())
    }
}
