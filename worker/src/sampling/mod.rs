//! Per-request sampling: penalties, temperature, top-k/top-p/min-p, logprobs.
