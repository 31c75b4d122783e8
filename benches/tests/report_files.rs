//! Presets end to end against the fake gRPC router: the Markdown tables, `report.json`,
//! the CSV files and the PNG charts.

mod common;

use std::path::Path;

use anyhow::{Context, Result};
use common::{connect, settings, spawn_fake_grpc, FAKE_CACHED};
use orchard_bench::report::charts::{draw_bars, draw_lines, BarChart, Labels, LineChart, Series};
use orchard_bench::report::{write_files, Report};
use orchard_bench::scenarios::{
    find_scenario, run_batching, run_prefix_cache, run_scenarios, BatchingSpec, PrefixSpec,
    ScenarioPlan,
};

const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

fn assert_png(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
    assert!(
        bytes.len() > 1000,
        "{} is {} bytes",
        path.display(),
        bytes.len()
    );
    assert!(
        bytes.starts_with(PNG_MAGIC),
        "{} is not a PNG",
        path.display()
    );
    Ok(())
}

async fn preset_report() -> Result<Report> {
    let client = connect(&spawn_fake_grpc().await?).await?;
    let plan = ScenarioPlan {
        scenarios: vec![
            find_scenario("s1").context("S1")?,
            find_scenario("S2").context("S2")?,
        ],
        concurrency: vec![1, 2],
        requests_per_client: 2,
        warmup_requests: 1,
        settings: settings(),
    };
    let levels = run_scenarios(&client, &plan).await?;
    let prefix = PrefixSpec {
        system_tokens: 40,
        question_tokens: 4,
        requests: 4,
        max_tokens: 3,
    };
    let batching = BatchingSpec {
        batch: 5,
        prompt_tokens: 8,
        max_tokens: 6,
    };
    Ok(Report {
        command: "scenarios".into(),
        target: "fake".into(),
        model: String::new(),
        levels,
        prefix: Some(run_prefix_cache(&client, &prefix, &settings()).await?),
        batching: Some(run_batching(&client, &batching, &settings()).await?),
    })
}

#[tokio::test]
async fn presets_produce_tables_json_csv_and_charts() -> Result<()> {
    let report = preset_report().await?;
    assert_eq!(
        report.levels.len(),
        4,
        "2 scenarios x 2 concurrency levels, warm-ups not kept"
    );
    let s2c2 = &report.levels[3];
    assert_eq!(
        (s2c2.label.as_str(), s2c2.summary.requests_ok),
        ("S2 c=2", 4)
    );
    assert_eq!(s2c2.summary.output_tokens, 4 * 64);
    let prefix = report.prefix.as_ref().context("prefix")?;
    assert_eq!(prefix.warm_ttft_ms.as_ref().map(|w| w.count), Some(3));
    assert_eq!(prefix.cold_cached_tokens, Some(FAKE_CACHED));
    let batching = report.batching.as_ref().context("batching")?;
    assert_eq!(batching.batched.summary.output_tokens, 30);

    let md = report.to_markdown();
    for needle in [
        "| S1 | 16 | 32 | 1 |",
        "| S2 c=2 |",
        "Prefix cache",
        "Continuous batching",
        "Server TTFT",
    ] {
        assert!(md.contains(needle), "markdown lacks {needle:?}:\n{md}");
    }

    let dir = tempfile::tempdir()?;
    let files = write_files(dir.path(), &report)?;
    assert_eq!(files.len(), 6, "{files:?}");
    let json: Report =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json"))?)?;
    assert_eq!(json.levels.len(), 4);
    assert_eq!(json.levels[0].run.records.len(), 2);

    let mut summary = csv::Reader::from_path(dir.path().join("summary.csv"))?;
    let headers = summary.headers()?.clone();
    let rows: Vec<csv::StringRecord> = summary.records().collect::<Result<_, _>>()?;
    assert_eq!(rows.len(), 6, "4 levels + prefix + batching");
    let col = headers
        .iter()
        .position(|h| h == "requests_ok")
        .context("requests_ok column")?;
    assert_eq!(&rows[3][col], "4");

    let mut requests = csv::Reader::from_path(dir.path().join("requests.csv"))?;
    let n = requests.records().collect::<Result<Vec<_>, _>>()?.len();
    assert_eq!(n, 2 + 4 + 2 + 4 + 4 + 5);

    for png in ["ttft_vs_prompt.png", "per_step_tps.png", "throughput.png"] {
        assert_png(&dir.path().join(png))?;
    }
    Ok(())
}

#[test]
fn charts_draw_with_and_without_text() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let lines = LineChart {
        title: "t".into(),
        x_label: "x".into(),
        y_label: "y".into(),
        series: vec![Series {
            name: "a".into(),
            points: vec![(1.0, 2.0), (2.0, 3.0)],
        }],
    };
    let bars = BarChart {
        title: "b".into(),
        y_label: "y".into(),
        bars: vec![("one".into(), 3.0)],
    };
    for (i, labels) in [Labels::On, Labels::Off].into_iter().enumerate() {
        if labels == Labels::On && orchard_bench::report::charts::system_labels() == Labels::Off {
            continue;
        }
        let line_path = dir.path().join(format!("lines{i}.png"));
        draw_lines(&line_path, &lines, labels)?;
        assert_png(&line_path)?;
        let bar_path = dir.path().join(format!("bars{i}.png"));
        draw_bars(&bar_path, &bars, labels)?;
        assert_png(&bar_path)?;
    }
    Ok(())
}
