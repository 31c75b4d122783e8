//! The offline engine benchmark in `--quick` mode on the default model (fetched by
//! deploy/fetch-model.sh): the report has every measurement, each request got exactly the
//! tokens asked for with no prefix-cache hit, and every figure is a positive, consistent rate.
//! Behaviour only - how fast the machine is never decides the outcome.

use anyhow::{ensure, Result};
use orchard_bench::engine_bench::report::Counts;
use orchard_bench::engine_bench::{self, EngineBenchConfig, EngineBenchError, Sizes};
use orchard_bench::progress::ProgressMode;
use orchard_worker::model::gguf::default_model_path;

fn quick_config() -> EngineBenchConfig {
    EngineBenchConfig {
        progress: ProgressMode::Hidden,
        repeat: 2,
        ..EngineBenchConfig::new(default_model_path(), Sizes::quick())
    }
}

/// Every request asked for `prompt` + `output` tokens, `requests` of them.
fn check_counts(what: &str, c: &Counts, requests: u64, prompt: usize, output: u32) -> Result<()> {
    let expected = Counts {
        requests,
        prompt_tokens: requests * prompt as u64,
        completion_tokens: requests * u64::from(output),
        cached_tokens: 0,
    };
    ensure!(
        *c == expected,
        "{what}: counts {c:?}, expected {expected:?}"
    );
    Ok(())
}

#[test]
fn quick_run_reports_every_measurement_with_exact_token_counts() -> Result<()> {
    let config = quick_config();
    let sizes = &config.sizes;
    let repeat = u64::from(config.repeat);
    let report = engine_bench::run(&config)?;

    let prefill_lens: Vec<_> = report
        .orchard
        .prefill
        .iter()
        .map(|p| p.prompt_tokens)
        .collect();
    ensure!(
        prefill_lens == sizes.prefill_prompts,
        "prefill lengths {prefill_lens:?}"
    );
    for p in &report.orchard.prefill {
        check_counts("prefill", &p.counts, repeat, p.prompt_tokens, 1)?;
        ensure!(p.tok_s.min > 0.0 && p.tok_s.runs == config.repeat as usize);
    }
    let d = &report.orchard.decode;
    check_counts(
        "decode",
        &d.counts,
        repeat,
        d.shape.prompt_tokens,
        d.shape.output_tokens,
    )?;
    ensure!(d.tok_s.min > 0.0);

    let levels: Vec<_> = report
        .orchard
        .aggregate
        .iter()
        .map(|a| a.concurrency)
        .collect();
    ensure!(levels == sizes.concurrency, "concurrency levels {levels:?}");
    for a in &report.orchard.aggregate {
        let requests = repeat * a.concurrency as u64;
        check_counts(
            "aggregate",
            &a.counts,
            requests,
            a.shape.prompt_tokens,
            a.shape.output_tokens,
        )?;
        ensure!(a.decode_tok_s.min > 0.0 && a.e2e_tok_s.min > 0.0);
    }

    let ids: Vec<_> = report
        .orchard
        .scenarios
        .iter()
        .map(|s| s.id.as_str())
        .collect();
    ensure!(
        ids == ["S1", "S2", "S3", "S4", "S5", "S6"],
        "scenarios {ids:?}"
    );
    for s in &report.orchard.scenarios {
        let (p, o) = (s.shape.prompt_tokens, s.shape.output_tokens);
        check_counts(&s.id, &s.counts, repeat, p, o)?;
        ensure!(
            s.decode_tok_s.min > 0.0 && s.prefill_tok_s.min > 0.0,
            "{}: rates",
            s.id
        );
        ensure!(s.ttft_ms.max > 0.0, "{}: TTFT", s.id);
        // Per run TTFT <= e2e, so the means and the extremes keep that order.
        ensure!(
            s.ttft_ms.mean <= s.e2e_ms.mean,
            "{}: TTFT after the end",
            s.id
        );
        ensure!(
            s.ttft_ms.max <= s.e2e_ms.max,
            "{}: TTFT after the end",
            s.id
        );
    }

    for (c, (len, ratio)) in report.candle.prefill.iter().zip(&report.ratios.prefill) {
        ensure!(c.prompt_tokens == *len && c.tok_s.min > 0.0 && *ratio > 0.0);
    }
    ensure!(report.candle.decode.tok_s.min > 0.0 && report.ratios.decode > 0.0);

    // Every weight byte of the file is tensor data but for the header, vocabulary and chat
    // template (a few MB for the default model).
    let file_bytes = std::fs::metadata(&config.model)?.len();
    let weights = report.run.weight_bytes;
    ensure!(
        weights <= file_bytes && weights + 16_000_000 > file_bytes,
        "weight bytes {weights} of a {file_bytes}-byte file"
    );
    for b in &report.run.memory_read {
        ensure!(b.gb_s > 0.0 && b.bytes >= 64 << 20, "memory probe {b:?}");
    }
    let roofline = report.ratios.decode_roofline_tok_s;
    ensure!(
        roofline > 0.0 && report.ratios.decode_of_roofline == d.tok_s.mean / roofline,
        "decode roofline {roofline}"
    );

    let md = report.to_markdown();
    ensure!(md.contains("| S6 |") && md.contains("reference, measured separately"));
    ensure!(md.contains("Decode roofline") && md.contains("memory read bandwidth"));
    let json = serde_json::to_value(&report)?;
    ensure!(
        json["reference"]["prompt_tok_s"] == 1650.0,
        "reference figures in the JSON"
    );
    Ok(())
}

#[test]
fn a_missing_model_names_the_fetch_script() {
    let config = EngineBenchConfig {
        model: "/nonexistent/model.gguf".into(),
        ..quick_config()
    };
    let err = engine_bench::run(&config).err();
    assert!(
        matches!(&err, Some(EngineBenchError::ModelMissing { .. })),
        "{err:?}"
    );
    let message = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("deploy/fetch-model.sh"), "{message}");
}
