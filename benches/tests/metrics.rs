//! Percentiles, summaries and Poisson schedules from known inputs.

use std::time::Duration;

use anyhow::{Context, Result};
use orchard_bench::metrics::{
    per_step_tps, quantile_sorted, FailedRequest, Percentiles, RequestRecord, Summary,
};
use orchard_bench::schedule::{poisson_arrivals, ArrivalLimit};

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn percentiles_interpolate_between_closest_ranks() -> Result<()> {
    let samples: Vec<f64> = (1..=100).rev().map(f64::from).collect();
    let p = Percentiles::from_samples(&samples).context("samples")?;
    assert_eq!((p.count, p.min, p.max), (100, 1.0, 100.0));
    assert!(close(p.mean, 50.5));
    assert!(close(p.p50, 50.5));
    assert!(close(p.p90, 90.1));
    assert!(close(p.p99, 99.01));
    let one = Percentiles::from_samples(&[7.0]).context("one")?;
    assert_eq!((one.p50, one.p99, one.std), (7.0, 7.0, 0.0));
    assert!(Percentiles::from_samples(&[]).is_none());
    assert!(Percentiles::from_samples(&[1.0, f64::NAN]).is_none());
    assert!(close(quantile_sorted(&[10.0, 20.0], 0.25), 12.5));
    Ok(())
}

fn record(ttft_s: f64, e2e_s: f64, output_tokens: u32, itl_s: Vec<f64>) -> RequestRecord {
    RequestRecord {
        prompt_tokens: Some(100),
        output_tokens,
        ttft_s,
        e2e_s,
        itl_s,
        ..RequestRecord::default()
    }
}

#[test]
fn summary_derives_tpot_throughput_and_errors() -> Result<()> {
    let records = [
        record(0.1, 1.1, 11, vec![0.1; 10]),
        record(0.3, 2.3, 11, vec![0.2; 10]),
    ];
    let failed = [FailedRequest {
        index: 2,
        kind: "timeout".into(),
        message: "slow".into(),
    }];
    let s = Summary::from_outcomes(&records, &failed, 2.0);
    assert_eq!((s.requests_ok, s.requests_failed), (2, 1));
    assert_eq!(s.errors_by_kind.get("timeout"), Some(&1));
    assert_eq!((s.output_tokens, s.prompt_tokens), (22, 200));
    assert!(close(s.output_tok_s, 11.0));
    assert!(close(s.total_tok_s, 111.0));
    let tpot = s.tpot_ms.context("tpot")?;
    assert!(close(tpot.min, 100.0) && close(tpot.max, 200.0));
    let ttft = s.ttft_ms.context("ttft")?;
    assert!(close(ttft.p50, 200.0));
    let decode = s.decode_tps.context("decode")?;
    assert!(close(decode.mean, 7.5), "mean of 10 and 5 tok/s");
    let prefill = s.prefill_tps.context("prefill")?;
    assert!(close(prefill.max, 1000.0));
    assert_eq!(s.itl_ms.map(|p| p.count), Some(20));
    let steps = per_step_tps(&records);
    assert_eq!(steps.len(), 10);
    assert!(steps.iter().all(|(_, tps)| (tps - 1.0 / 0.15).abs() < 1e-6));
    Ok(())
}

#[test]
fn poisson_schedule_is_reproducible_and_has_the_requested_rate() -> Result<()> {
    let a = poisson_arrivals(5.0, 42, ArrivalLimit::Count(20_000))?;
    assert_eq!(a, poisson_arrivals(5.0, 42, ArrivalLimit::Count(20_000))?);
    assert_ne!(a, poisson_arrivals(5.0, 43, ArrivalLimit::Count(20_000))?);
    assert!(a.windows(2).all(|w| w[0] <= w[1]));
    let last = a.last().context("arrivals")?.as_secs_f64();
    let rate = a.len() as f64 / last;
    assert!((rate - 5.0).abs() < 0.15, "observed rate {rate}");
    let gaps: Vec<f64> = std::iter::once(a[0].as_secs_f64())
        .chain(a.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()))
        .collect();
    let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
    let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64;
    assert!(
        (var.sqrt() / mean - 1.0).abs() < 0.05,
        "exponential gaps have CV 1"
    );
    let until = poisson_arrivals(5.0, 42, ArrivalLimit::Until(Duration::from_secs(100)))?;
    assert!(until.iter().all(|t| *t < Duration::from_secs(100)));
    assert_eq!(until[..], a[..until.len()]);
    assert!(poisson_arrivals(0.0, 1, ArrivalLimit::Count(3)).is_err());
    Ok(())
}
