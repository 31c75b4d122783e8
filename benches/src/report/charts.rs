//! PNG charts drawn with `plotters` on its bitmap backend, as in the seed report: TTFT vs
//! prompt length, per-step decode TPS, and throughput by scenario.
//!
//! Text needs a font. `plotters` is built with `ab_glyph` (pure Rust, no fontconfig), which
//! renders only fonts registered at run time: the first readable TrueType file among
//! `$ORCHARD_BENCH_FONT` and common system locations is registered once per process (its bytes
//! are kept for the life of the process, as `ab_glyph` requires). Without one, charts are drawn
//! without any text rather than failing.

use std::collections::BTreeMap;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use super::Report;
use crate::error::BenchError;
use crate::metrics::per_step_tps;
use crate::runner::LevelResult;

/// Whether chart text can be drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Labels {
    /// A font is registered: titles, axis names, tick labels, legends.
    On,
    /// No font: shapes only.
    Off,
}

/// Fonts tried in order after `$ORCHARD_BENCH_FONT` (Debian/Ubuntu, Fedora, Arch, macOS).
const FONT_CANDIDATES: [&str; 6] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
];

const FAMILY: &str = "sans-serif";

/// Registers a system font once; says whether text can be drawn.
pub fn system_labels() -> Labels {
    static LABELS: OnceLock<Labels> = OnceLock::new();
    *LABELS.get_or_init(|| {
        let env = std::env::var_os("ORCHARD_BENCH_FONT").map(PathBuf::from);
        let found = env
            .into_iter()
            .chain(FONT_CANDIDATES.iter().map(PathBuf::from))
            .filter_map(|p| std::fs::read(p).ok())
            .any(|bytes| {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                register_font(FAMILY, FontStyle::Normal, bytes).is_ok()
            });
        if found {
            Labels::On
        } else {
            Labels::Off
        }
    })
}

/// A named line of points.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend name.
    pub name: String,
    /// Points, drawn in x order.
    pub points: Vec<(f64, f64)>,
}

/// A line chart.
#[derive(Debug, Clone)]
pub struct LineChart {
    /// Title.
    pub title: String,
    /// X axis name.
    pub x_label: String,
    /// Y axis name.
    pub y_label: String,
    /// Lines.
    pub series: Vec<Series>,
}

/// A bar chart of named values.
#[derive(Debug, Clone)]
pub struct BarChart {
    /// Title.
    pub title: String,
    /// Y axis name.
    pub y_label: String,
    /// Bars, left to right.
    pub bars: Vec<(String, f64)>,
}

type DrawResult = Result<(), Box<dyn Error>>;

fn out_err(path: &Path, e: &dyn Error) -> BenchError {
    BenchError::Output {
        path: path.to_owned(),
        detail: e.to_string(),
    }
}

/// Upper bound with 10% headroom, never zero.
fn top(max: f64) -> f64 {
    if max.is_finite() && max > 0.0 {
        max * 1.1
    } else {
        1.0
    }
}

/// Draws a line chart to `path` (PNG).
pub fn draw_lines(path: &Path, chart: &LineChart, labels: Labels) -> Result<(), BenchError> {
    draw_lines_inner(path, chart, labels).map_err(|e| out_err(path, e.as_ref()))
}

fn draw_lines_inner(path: &Path, chart: &LineChart, labels: Labels) -> DrawResult {
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let all = chart.series.iter().flat_map(|s| s.points.iter());
    let x_max = top(all.clone().map(|p| p.0).fold(0.0, f64::max));
    let y_max = top(all.map(|p| p.1).fold(0.0, f64::max));
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if labels == Labels::On {
        builder
            .caption(&chart.title, (FAMILY, 22))
            .x_label_area_size(45)
            .y_label_area_size(70);
    }
    let mut ctx = builder.build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    let mut mesh = ctx.configure_mesh();
    match labels {
        Labels::On => mesh
            .x_desc(&chart.x_label)
            .y_desc(&chart.y_label)
            .label_style((FAMILY, 14)),
        Labels::Off => mesh.x_labels(0).y_labels(0),
    };
    mesh.draw()?;
    for (i, s) in chart.series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let mut points = s.points.clone();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let line = ctx.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?;
        if labels == Labels::On {
            line.label(s.name.clone()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
        if points.len() <= 64 {
            ctx.draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
        }
    }
    if labels == Labels::On && chart.series.len() > 1 {
        ctx.configure_series_labels()
            .label_font((FAMILY, 14))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// Draws a bar chart to `path` (PNG); each bar carries its name and value when text is on.
pub fn draw_bars(path: &Path, chart: &BarChart, labels: Labels) -> Result<(), BenchError> {
    draw_bars_inner(path, chart, labels).map_err(|e| out_err(path, e.as_ref()))
}

fn draw_bars_inner(path: &Path, chart: &BarChart, labels: Labels) -> DrawResult {
    let n = chart.bars.len().max(1);
    let width = u32::try_from(n * 70).unwrap_or(u32::MAX).clamp(900, 4000);
    let root = BitMapBackend::new(path, (width, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let y_max = top(chart.bars.iter().map(|b| b.1).fold(0.0, f64::max)) * 1.05;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if labels == Labels::On {
        builder
            .caption(&chart.title, (FAMILY, 22))
            .y_label_area_size(70);
    }
    let mut ctx = builder.build_cartesian_2d(0.0..n as f64, 0.0..y_max)?;
    let mut mesh = ctx.configure_mesh();
    mesh.disable_x_mesh().x_labels(0);
    match labels {
        Labels::On => mesh.y_desc(&chart.y_label).label_style((FAMILY, 14)),
        Labels::Off => mesh.y_labels(0),
    };
    mesh.draw()?;
    for (i, (name, value)) in chart.bars.iter().enumerate() {
        let x = i as f64;
        let color = Palette99::pick(i % 8).to_rgba();
        ctx.draw_series(std::iter::once(Rectangle::new(
            [(x + 0.15, 0.0), (x + 0.85, *value)],
            color.filled(),
        )))?;
        if labels == Labels::On {
            let style = TextStyle::from((FAMILY, 12)).color(&BLACK);
            let text = format!("{name}: {value:.1}");
            ctx.draw_series(std::iter::once(Text::new(
                text,
                (x + 0.1, *value + y_max * 0.03),
                style,
            )))?;
        }
    }
    root.present()?;
    Ok(())
}

/// The report's charts, written into `dir`; a chart with no data is skipped.
pub fn draw_report(dir: &Path, report: &Report) -> Result<Vec<PathBuf>, BenchError> {
    let labels = system_labels();
    let mut written = Vec::new();
    let ttft = ttft_vs_prompt(&report.levels);
    if ttft.series.iter().any(|s| !s.points.is_empty()) {
        let path = dir.join("ttft_vs_prompt.png");
        draw_lines(&path, &ttft, labels)?;
        written.push(path);
    }
    let steps = per_step_chart(&report.levels);
    if steps.series.iter().any(|s| !s.points.is_empty()) {
        let path = dir.join("per_step_tps.png");
        draw_lines(&path, &steps, labels)?;
        written.push(path);
    }
    let bars = throughput_by_level(&report.levels);
    if !bars.bars.is_empty() {
        let path = dir.join("throughput.png");
        draw_bars(&path, &bars, labels)?;
        written.push(path);
    }
    Ok(written)
}

/// Median TTFT against mean prompt tokens (server count when reported), one line per load.
pub fn ttft_vs_prompt(levels: &[LevelResult]) -> LineChart {
    let mut by_load: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for l in levels {
        let s = &l.summary;
        let (Some(ttft), true) = (&s.ttft_ms, s.requests_ok > 0 && s.prompt_tokens > 0) else {
            continue;
        };
        let x = s.prompt_tokens as f64 / s.requests_ok as f64;
        let load = match l.concurrency() {
            Some(c) => format!("concurrency {c:>3}"),
            None => l.label.clone(),
        };
        by_load.entry(load).or_default().push((x, ttft.p50));
    }
    LineChart {
        title: "TTFT vs prompt length (p50)".into(),
        x_label: "prompt tokens".into(),
        y_label: "TTFT (ms)".into(),
        series: by_load
            .into_iter()
            .map(|(name, points)| Series { name, points })
            .collect(),
    }
}

/// Decode TPS at each step for the levels with the longest decode (S6 in the presets).
pub fn per_step_chart(levels: &[LevelResult]) -> LineChart {
    let longest = levels.iter().map(|l| l.max_tokens).max().unwrap_or(0);
    let series = levels
        .iter()
        .filter(|l| l.max_tokens == longest)
        .map(|l| Series {
            name: l.label.clone(),
            points: per_step_tps(&l.run.records)
                .into_iter()
                .map(|(k, v)| (k as f64, v))
                .collect(),
        })
        .collect();
    LineChart {
        title: format!("Per-step decode TPS ({longest} output tokens, mean per request)"),
        x_label: "decode step".into(),
        y_label: "tokens/s per request".into(),
        series,
    }
}

/// Aggregate output tok/s of every level.
pub fn throughput_by_level(levels: &[LevelResult]) -> BarChart {
    BarChart {
        title: "Output throughput by level".into(),
        y_label: "output tokens/s (aggregate)".into(),
        bars: levels
            .iter()
            .filter(|l| l.summary.requests_ok > 0)
            .map(|l| (l.label.clone(), l.summary.output_tok_s))
            .collect(),
    }
}
