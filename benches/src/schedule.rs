//! Open-loop arrivals: a Poisson process (exponential gaps with mean `1 / rate`), drawn from a
//! seeded generator so a schedule can be replayed exactly against another server. Open loop
//! means requests are sent on schedule whether or not earlier ones have finished, which is how
//! real traffic behaves and what exposes queueing (vLLM's `--request-rate`).

use std::time::Duration;

use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Exp};

use crate::error::BenchError;

/// How many arrivals to draw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ArrivalLimit {
    /// Exactly this many.
    Count(usize),
    /// Every arrival strictly before this offset.
    Until(Duration),
}

/// Arrival offsets from the start of the run, ascending. The same rate, seed and limit always
/// give the same schedule (within one build of the benchmark).
pub fn poisson_arrivals(
    rate_per_s: f64,
    seed: u64,
    limit: ArrivalLimit,
) -> Result<Vec<Duration>, BenchError> {
    let exp = Exp::new(rate_per_s)
        .ok()
        .filter(|_| rate_per_s.is_finite() && rate_per_s > 0.0)
        .ok_or_else(|| {
            BenchError::BadArgument(format!("request rate must be > 0, got {rate_per_s}"))
        })?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut t = 0.0_f64;
    let mut out = Vec::new();
    loop {
        if let ArrivalLimit::Count(n) = limit {
            if out.len() >= n {
                break;
            }
        }
        t += exp.sample(&mut rng);
        let at = Duration::from_secs_f64(t);
        if let ArrivalLimit::Until(end) = limit {
            if at >= end {
                break;
            }
        }
        out.push(at);
    }
    Ok(out)
}
