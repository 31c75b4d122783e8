//! Markdown tables, shaped like the seed reports (vLLM-style latency percentiles; the S1-S6
//! "TTFT / Decode TPS / Prefill TPS, mean ± std" table; prefix-cache and batching tables).

use std::fmt::Write;

use super::Report;
use crate::metrics::Percentiles;
use crate::runner::{Arrival, LevelResult};
use crate::scenarios::{BatchingResult, PrefixResult};

/// The whole report.
pub fn report(r: &Report) -> String {
    let model = if r.model.is_empty() {
        "(server default)"
    } else {
        &r.model
    };
    let mut out = format!(
        "# orchard-bench {}\n\nTarget: `{}`, model: `{model}`\n\n",
        r.command, r.target
    );
    if !r.levels.is_empty() {
        out.push_str(&levels_table(&r.levels));
        if r.levels.iter().any(|l| l.scenario.is_some()) {
            out.push('\n');
            out.push_str(&scenario_table(&r.levels));
        }
        if r.levels.iter().any(|l| l.summary.server_ttft_ms.is_some()) {
            out.push('\n');
            out.push_str(&server_table(&r.levels));
        }
        out.push_str(&errors(&r.levels));
    }
    if let Some(p) = &r.prefix {
        out.push('\n');
        out.push_str(&prefix_table(p));
    }
    if let Some(b) = &r.batching {
        out.push('\n');
        out.push_str(&batching_table(b));
    }
    out
}

fn f1(v: Option<f64>) -> String {
    v.filter(|x| x.is_finite())
        .map_or_else(|| "-".to_owned(), |x| format!("{x:.1}"))
}

fn p(v: &Option<Percentiles>, pick: fn(&Percentiles) -> f64) -> String {
    f1(v.as_ref().map(pick))
}

fn mean_std(v: &Option<Percentiles>) -> String {
    v.as_ref().map_or_else(
        || "-".to_owned(),
        |x| format!("{:.1} ± {:.1}", x.mean, x.std),
    )
}

fn load(l: &LevelResult) -> String {
    match l.arrival {
        Arrival::Closed { concurrency } => format!("c={concurrency}"),
        Arrival::Poisson { rate, .. } => format!("{rate} req/s"),
    }
}

/// Client-side latency percentiles and throughput, one row per level. Latencies in ms.
pub fn levels_table(levels: &[LevelResult]) -> String {
    let mut out = String::from(
        "| Run | Load | Prompt | Decode | OK | Err | TTFT p50 | TTFT p90 | TTFT p99 | TPOT p50 | TPOT p99 | ITL p50 | ITL p99 | E2E p50 | E2E p99 | Out tok/s | Total tok/s |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for l in levels {
        let s = &l.summary;
        let prompt = l
            .prompt_tokens
            .map_or_else(|| "file".to_owned(), |n| n.to_string());
        let _ = writeln!(
            out,
            "| {} | {} | {prompt} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.1} |",
            l.label, load(l), l.max_tokens, s.requests_ok, s.requests_failed,
            p(&s.ttft_ms, |x| x.p50), p(&s.ttft_ms, |x| x.p90), p(&s.ttft_ms, |x| x.p99),
            p(&s.tpot_ms, |x| x.p50), p(&s.tpot_ms, |x| x.p99),
            p(&s.itl_ms, |x| x.p50), p(&s.itl_ms, |x| x.p99),
            p(&s.e2e_ms, |x| x.p50), p(&s.e2e_ms, |x| x.p99),
            s.output_tok_s, s.total_tok_s,
        );
    }
    out
}

/// The seed reports' scenario table: TTFT, decode TPS and prefill TPS as mean ± std.
pub fn scenario_table(levels: &[LevelResult]) -> String {
    let mut out = String::from(
        "| ID | Prompt | Decode | Conc | TTFT (ms) | Decode TPS | Prefill TPS | Out tok/s |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for l in levels.iter().filter(|l| l.scenario.is_some()) {
        let s = &l.summary;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {:.1} |",
            l.scenario.as_deref().unwrap_or_default(),
            l.prompt_tokens.unwrap_or_default(),
            l.max_tokens,
            l.concurrency()
                .map_or_else(|| "-".to_owned(), |c| c.to_string()),
            mean_std(&s.ttft_ms),
            mean_std(&s.decode_tps),
            mean_std(&s.prefill_tps),
            s.output_tok_s,
        );
    }
    out
}

/// Timings the server reported in its final messages next to the client's TTFT (ms).
pub fn server_table(levels: &[LevelResult]) -> String {
    let mut out = String::from(
        "| Run | Client TTFT p50 | Server TTFT p50 | Server queue p50 | Server TPOT p50 | Server E2E p50 | Cached tokens |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for l in levels {
        let s = &l.summary;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            l.label,
            p(&s.ttft_ms, |x| x.p50),
            p(&s.server_ttft_ms, |x| x.p50),
            p(&s.server_queue_ms, |x| x.p50),
            p(&s.server_tpot_ms, |x| x.p50),
            p(&s.server_e2e_ms, |x| x.p50),
            s.cached_tokens
                .map_or_else(|| "-".to_owned(), |c| c.to_string()),
        );
    }
    out
}

fn errors(levels: &[LevelResult]) -> String {
    let mut out = String::new();
    for l in levels.iter().filter(|l| l.summary.requests_failed > 0) {
        let kinds: Vec<String> = l
            .summary
            .errors_by_kind
            .iter()
            .map(|(k, n)| format!("{k} x{n}"))
            .collect();
        let _ = writeln!(out, "\nErrors in {}: {}", l.label, kinds.join(", "));
    }
    out
}

/// Cold vs warm TTFT with a shared system prompt.
pub fn prefix_table(p: &PrefixResult) -> String {
    let cached = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |c| format!("{c:.0}"));
    let warm_n = p.warm_ttft_ms.as_ref().map_or(0, |w| w.count);
    format!(
        "## Prefix cache (shared ~{} token system prompt, seed {})\n\n\
         | Request | TTFT (ms) | Cached tokens |\n|---|---|---|\n\
         | First (cold) | {:.1} | {} |\n\
         | Later (warm, mean of {warm_n}) | {} | {} |\n\n\
         Cold / warm TTFT: **{}x**\n",
        p.system_tokens,
        p.seed,
        p.cold_ttft_ms,
        cached(p.cold_cached_tokens.map(f64::from)),
        mean_std(&p.warm_ttft_ms),
        cached(p.warm_cached_tokens_mean),
        p.ttft_ratio
            .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}")),
    )
}

/// Single request vs a batch of simultaneous requests.
pub fn batching_table(b: &BatchingResult) -> String {
    format!(
        "## Continuous batching\n\n\
         | Requests | Output tok/s |\n|---|---|\n\
         | 1 | {:.1} |\n| {} (simultaneous) | {:.1} |\n\n\
         Speedup: **{}x**\n",
        b.single_tok_s,
        b.batch,
        b.batch_tok_s,
        b.speedup
            .map_or_else(|| "-".to_owned(), |s| format!("{s:.2}")),
    )
}
