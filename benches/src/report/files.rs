//! Result files: `report.json` (everything, every request), `summary.csv` (one row per level),
//! `requests.csv` (one row per request) and the PNG charts.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{charts, Report};
use crate::error::BenchError;
use crate::metrics::Percentiles;
use crate::runner::{Arrival, LevelResult};

/// Writes every result file into `dir` (created if missing) and returns their paths.
pub fn write_files(dir: &Path, report: &Report) -> Result<Vec<PathBuf>, BenchError> {
    let out_err = |path: &Path, e: &dyn std::fmt::Display| BenchError::Output {
        path: path.to_owned(),
        detail: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| out_err(dir, &e))?;
    let json = dir.join("report.json");
    let text = serde_json::to_string_pretty(report).map_err(|e| out_err(&json, &e))?;
    std::fs::write(&json, text).map_err(|e| out_err(&json, &e))?;
    let summary = dir.join("summary.csv");
    write_csv(
        &summary,
        report.all_levels().into_iter().map(SummaryRow::from),
    )?;
    let requests = dir.join("requests.csv");
    write_csv(
        &requests,
        report.all_levels().into_iter().flat_map(request_rows),
    )?;
    let mut files = vec![json, summary, requests];
    files.extend(charts::draw_report(dir, report)?);
    Ok(files)
}

fn write_csv<T: Serialize>(path: &Path, rows: impl Iterator<Item = T>) -> Result<(), BenchError> {
    let err = |e: csv::Error| BenchError::Output {
        path: path.to_owned(),
        detail: e.to_string(),
    };
    let mut w = csv::Writer::from_path(path).map_err(err)?;
    for row in rows {
        w.serialize(row).map_err(err)?;
    }
    w.flush().map_err(|e| err(e.into()))
}

/// One `summary.csv` row; latencies in ms.
#[derive(Debug, Serialize)]
struct SummaryRow {
    label: String,
    scenario: Option<String>,
    concurrency: Option<usize>,
    rate: Option<f64>,
    prompt_tokens: Option<usize>,
    max_tokens: u32,
    requests_ok: usize,
    requests_failed: usize,
    wall_s: f64,
    ttft_p50_ms: Option<f64>,
    ttft_p90_ms: Option<f64>,
    ttft_p99_ms: Option<f64>,
    tpot_p50_ms: Option<f64>,
    tpot_p90_ms: Option<f64>,
    tpot_p99_ms: Option<f64>,
    itl_p50_ms: Option<f64>,
    itl_p90_ms: Option<f64>,
    itl_p99_ms: Option<f64>,
    e2e_p50_ms: Option<f64>,
    e2e_p90_ms: Option<f64>,
    e2e_p99_ms: Option<f64>,
    decode_tps_mean: Option<f64>,
    prefill_tps_mean: Option<f64>,
    output_tok_s: f64,
    total_tok_s: f64,
    request_rate: f64,
    server_ttft_p50_ms: Option<f64>,
    cached_tokens: Option<u64>,
}

impl From<&LevelResult> for SummaryRow {
    fn from(l: &LevelResult) -> Self {
        let s = &l.summary;
        let q = |p: &Option<Percentiles>, f: fn(&Percentiles) -> f64| p.as_ref().map(f);
        Self {
            label: l.label.clone(),
            scenario: l.scenario.clone(),
            concurrency: l.concurrency(),
            rate: match l.arrival {
                Arrival::Poisson { rate, .. } => Some(rate),
                Arrival::Closed { .. } => None,
            },
            prompt_tokens: l.prompt_tokens,
            max_tokens: l.max_tokens,
            requests_ok: s.requests_ok,
            requests_failed: s.requests_failed,
            wall_s: s.wall_s,
            ttft_p50_ms: q(&s.ttft_ms, |p| p.p50),
            ttft_p90_ms: q(&s.ttft_ms, |p| p.p90),
            ttft_p99_ms: q(&s.ttft_ms, |p| p.p99),
            tpot_p50_ms: q(&s.tpot_ms, |p| p.p50),
            tpot_p90_ms: q(&s.tpot_ms, |p| p.p90),
            tpot_p99_ms: q(&s.tpot_ms, |p| p.p99),
            itl_p50_ms: q(&s.itl_ms, |p| p.p50),
            itl_p90_ms: q(&s.itl_ms, |p| p.p90),
            itl_p99_ms: q(&s.itl_ms, |p| p.p99),
            e2e_p50_ms: q(&s.e2e_ms, |p| p.p50),
            e2e_p90_ms: q(&s.e2e_ms, |p| p.p90),
            e2e_p99_ms: q(&s.e2e_ms, |p| p.p99),
            decode_tps_mean: q(&s.decode_tps, |p| p.mean),
            prefill_tps_mean: q(&s.prefill_tps, |p| p.mean),
            output_tok_s: s.output_tok_s,
            total_tok_s: s.total_tok_s,
            request_rate: s.request_rate,
            server_ttft_p50_ms: q(&s.server_ttft_ms, |p| p.p50),
            cached_tokens: s.cached_tokens,
        }
    }
}

/// One `requests.csv` row; successful and failed requests alike, times in ms.
#[derive(Debug, Serialize)]
struct RequestRow {
    level: String,
    index: usize,
    start_s: Option<f64>,
    prompt_tokens_requested: Option<usize>,
    prompt_tokens: Option<u32>,
    output_tokens: Option<u32>,
    cached_tokens: Option<u32>,
    ttft_ms: Option<f64>,
    tpot_ms: Option<f64>,
    e2e_ms: Option<f64>,
    itl_count: Option<usize>,
    server_ttft_ms: Option<f64>,
    server_queue_ms: Option<f64>,
    server_e2e_ms: Option<f64>,
    worker_id: Option<String>,
    finish_reason: Option<String>,
    error_kind: Option<String>,
    error: Option<String>,
}

fn request_rows(l: &LevelResult) -> Vec<RequestRow> {
    let ok = l.run.records.iter().map(|r| RequestRow {
        level: l.label.clone(),
        index: r.index,
        start_s: Some(r.start_s),
        prompt_tokens_requested: r.prompt_tokens_requested,
        prompt_tokens: r.prompt_tokens,
        output_tokens: Some(r.output_tokens),
        cached_tokens: r.cached_tokens,
        ttft_ms: Some(r.ttft_s * 1e3),
        tpot_ms: r.tpot_s().map(|t| t * 1e3),
        e2e_ms: Some(r.e2e_s * 1e3),
        itl_count: Some(r.itl_s.len()),
        server_ttft_ms: r.server.as_ref().map(|s| s.ttft_s * 1e3),
        server_queue_ms: r.server.as_ref().map(|s| s.queue_s * 1e3),
        server_e2e_ms: r.server.as_ref().map(|s| s.e2e_s * 1e3),
        worker_id: r.server.as_ref().map(|s| s.worker_id.clone()),
        finish_reason: r.finish_reason.clone(),
        error_kind: None,
        error: None,
    });
    let failed = l.run.errors.iter().map(|e| RequestRow {
        level: l.label.clone(),
        index: e.index,
        start_s: None,
        prompt_tokens_requested: None,
        prompt_tokens: None,
        output_tokens: None,
        cached_tokens: None,
        ttft_ms: None,
        tpot_ms: None,
        e2e_ms: None,
        itl_count: None,
        server_ttft_ms: None,
        server_queue_ms: None,
        server_e2e_ms: None,
        worker_id: None,
        finish_reason: None,
        error_kind: Some(e.kind.clone()),
        error: Some(e.message.clone()),
    });
    ok.chain(failed).collect()
}
