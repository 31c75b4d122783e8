//! The engine benchmark's results: what was measured on each engine (and on llama.cpp with
//! `--llama-cpp`), the Orchard / candle and Orchard / llama.cpp ratios, the llama.cpp reference
//! figures the task gives (never measured by this tool), the Markdown table printed on stdout
//! and the JSON written with `--json`.

use std::fmt::Write as _;
use std::path::Path;

use orchard_common::config::{KvCacheDType, WorkerConfig};
use orchard_worker::engine::api::Finished;
use serde::Serialize;

use super::llama_cpp::LlamaCppResults;
use super::memory::{decode_roofline, Bandwidth};
use super::workload::Shape;
use super::EngineBenchError;

/// llama.cpp on the same 2-core machine, measured separately (the figures issue 2 sets as the
/// speed to reach). Reported next to the measurements, never as one of them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Reference {
    /// What these figures are.
    pub source: &'static str,
    /// Prompt processing tok/s.
    pub prompt_tok_s: f64,
    /// Single-stream decode tok/s.
    pub decode_tok_s: f64,
    /// Aggregate decode tok/s of 16 concurrent streams.
    pub aggregate_16_tok_s: f64,
}

/// The llama.cpp figures from the task.
pub const LLAMA_CPP_REFERENCE: Reference = Reference {
    source: "llama.cpp on this 2-core machine, from the task; reference, measured separately \
             (not by this run)",
    prompt_tok_s: 1650.0,
    decode_tok_s: 265.0,
    aggregate_16_tok_s: 280.0,
};

/// Mean, min and max of one figure over the measured runs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stat {
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    /// Measured runs.
    pub runs: usize,
}

impl Stat {
    /// Summary of `samples` (all zeros when there are none).
    pub fn of(samples: &[f64]) -> Self {
        let runs = samples.len();
        if runs == 0 {
            return Self {
                mean: 0.0,
                min: 0.0,
                max: 0.0,
                runs,
            };
        }
        Self {
            mean: samples.iter().sum::<f64>() / runs as f64,
            min: samples.iter().copied().fold(f64::INFINITY, f64::min),
            max: samples.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            runs,
        }
    }
}

/// Token counts the engine reported, summed over every request of a measurement: a reader
/// checks that each request got the prompt and output lengths asked for and no cache hit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
}

impl Counts {
    /// Sums the usage of finished requests.
    pub fn of(finished: &[&Finished]) -> Self {
        finished.iter().fold(Self::default(), |c, f| Self {
            requests: c.requests + 1,
            prompt_tokens: c.prompt_tokens + u64::from(f.usage.prompt_tokens),
            completion_tokens: c.completion_tokens + u64::from(f.usage.completion_tokens),
            cached_tokens: c.cached_tokens + u64::from(f.usage.cached_tokens),
        })
    }
}

/// Orchard's prefill at one prompt length.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrefillMeasure {
    pub prompt_tokens: usize,
    /// Prompt tokens / the engine's prefill time.
    pub tok_s: Stat,
    pub counts: Counts,
}

/// Orchard's single-stream decode.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DecodeMeasure {
    pub shape: Shape,
    /// 1 / the engine's mean time per output token.
    pub tok_s: Stat,
    pub counts: Counts,
}

/// Orchard's aggregate decode at one concurrency.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AggregateMeasure {
    pub concurrency: usize,
    /// Each sequence's shape.
    pub shape: Shape,
    /// Tokens of the decode phase (every sequence decoding) / its duration.
    pub decode_tok_s: Stat,
    /// All output tokens / submission to last token.
    pub e2e_tok_s: Stat,
    pub counts: Counts,
}

/// One seed scenario on Orchard, one request at a time, from the engine's own timings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScenarioMeasure {
    pub id: String,
    pub shape: Shape,
    pub ttft_ms: Stat,
    /// 1 / mean time per output token.
    pub decode_tok_s: Stat,
    /// Prompt tokens / prefill time.
    pub prefill_tok_s: Stat,
    pub e2e_ms: Stat,
    pub counts: Counts,
}

/// Everything measured on Orchard's engine.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OrchardResults {
    pub prefill: Vec<PrefillMeasure>,
    pub decode: DecodeMeasure,
    pub aggregate: Vec<AggregateMeasure>,
    pub scenarios: Vec<ScenarioMeasure>,
}

/// The baseline's prefill at one prompt length.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CandlePrefill {
    pub prompt_tokens: usize,
    /// Prompt tokens / the time of one forward over the prompt.
    pub tok_s: Stat,
}

/// The baseline's single-stream decode.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CandleDecode {
    pub shape: Shape,
    /// Tokens after the first / the time of their one-token forwards.
    pub tok_s: Stat,
}

/// Everything measured on candle's quantized Llama.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CandleResults {
    pub prefill: Vec<CandlePrefill>,
    pub decode: CandleDecode,
}

/// Orchard / candle, from the means, and Orchard's decode against the memory roofline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ratios {
    /// (prompt tokens, ratio) per prefill length.
    pub prefill: Vec<(usize, f64)>,
    pub decode: f64,
    /// The single-stream decode ceiling at the mean of the two bandwidth probes: tok/s if a
    /// step only read the weights.
    pub decode_roofline_tok_s: f64,
    /// Orchard's single-stream decode / that ceiling.
    pub decode_of_roofline: f64,
    /// Orchard / llama.cpp measured in this run, when it was.
    pub llama_cpp: Option<LlamaRatios>,
}

/// Orchard / llama.cpp, from the means of the same run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LlamaRatios {
    /// (prompt tokens, ratio) per prefill length.
    pub prefill: Vec<(usize, f64)>,
    pub decode: f64,
    /// (concurrency, ratio) of the aggregate decode.
    pub aggregate: Vec<(usize, f64)>,
}

impl LlamaRatios {
    fn of(orchard: &OrchardResults, llama: &LlamaCppResults) -> Self {
        let prefill = orchard
            .prefill
            .iter()
            .zip(&llama.prefill)
            .map(|(o, l)| (o.prompt_tokens, ratio(o.tok_s.mean, l.tok_s.mean)))
            .collect();
        let aggregate = orchard
            .aggregate
            .iter()
            .zip(&llama.aggregate)
            .map(|(o, l)| {
                (
                    o.concurrency,
                    ratio(o.decode_tok_s.mean, l.decode_tok_s.mean),
                )
            })
            .collect();
        Self {
            prefill,
            decode: ratio(orchard.decode.tok_s.mean, llama.decode.tok_s.mean),
            aggregate,
        }
    }
}

/// The engine settings the run used (defaults except the prefix cache and the KV pool).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EngineSettings {
    pub block_size: u32,
    pub num_kv_blocks: Option<u32>,
    pub kv_cache_dtype: KvCacheDType,
    pub max_num_seqs: u32,
    pub max_num_batched_tokens: u32,
    pub enable_prefix_caching: bool,
}

impl EngineSettings {
    /// The settings of `cfg`'s engine section.
    pub fn of(cfg: &WorkerConfig) -> Self {
        let e = &cfg.engine;
        Self {
            block_size: e.block_size,
            num_kv_blocks: e.num_kv_blocks,
            kv_cache_dtype: e.kv_cache_dtype,
            max_num_seqs: e.max_num_seqs,
            max_num_batched_tokens: e.max_num_batched_tokens,
            enable_prefix_caching: e.enable_prefix_caching,
        }
    }
}

/// How the run was made.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunInfo {
    pub model: String,
    /// Compute threads of each engine during the run.
    pub threads: usize,
    pub repeat: u32,
    pub warmup: u32,
    pub quick: bool,
    /// Cargo profile of this binary (`dev` builds optimise dependencies and the worker too).
    pub profile: String,
    /// Load averages (1, 5, 15 min) before and after the run, where the OS reports them.
    pub load_average: [Option<[f64; 3]>; 2],
    /// Memory read bandwidth measured just before and just after the run.
    pub memory_read: [Bandwidth; 2],
    /// Bytes of weights in the model file: what each decode step reads.
    pub weight_bytes: u64,
    pub engine: EngineSettings,
}

impl RunInfo {
    /// The mean of the bandwidth probes before and after the run, GB/s.
    pub fn mean_read_gb_s(&self) -> f64 {
        (self.memory_read[0].gb_s + self.memory_read[1].gb_s) / 2.0
    }
}

/// The whole report (the JSON written by `--json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EngineBenchReport {
    pub run: RunInfo,
    pub orchard: OrchardResults,
    pub candle: CandleResults,
    pub ratios: Ratios,
    /// llama.cpp measured in this run (`--llama-cpp`), if it was.
    pub llama_cpp: Option<LlamaCppResults>,
    pub reference: Reference,
}

impl EngineBenchReport {
    /// Assembles the report and computes the ratios.
    pub fn new(
        run: RunInfo,
        orchard: OrchardResults,
        candle: CandleResults,
        llama_cpp: Option<LlamaCppResults>,
    ) -> Self {
        let prefill = orchard
            .prefill
            .iter()
            .zip(&candle.prefill)
            .map(|(o, c)| (o.prompt_tokens, ratio(o.tok_s.mean, c.tok_s.mean)))
            .collect();
        let decode = ratio(orchard.decode.tok_s.mean, candle.decode.tok_s.mean);
        let decode_roofline_tok_s = decode_roofline(run.mean_read_gb_s(), run.weight_bytes);
        let decode_of_roofline = ratio(orchard.decode.tok_s.mean, decode_roofline_tok_s);
        let llama_ratios = llama_cpp.as_ref().map(|l| LlamaRatios::of(&orchard, l));
        Self {
            run,
            orchard,
            candle,
            ratios: Ratios {
                prefill,
                decode,
                decode_roofline_tok_s,
                decode_of_roofline,
                llama_cpp: llama_ratios,
            },
            llama_cpp,
            reference: LLAMA_CPP_REFERENCE,
        }
    }

    /// Writes the report as pretty JSON.
    pub fn write_json(&self, path: &Path) -> Result<(), EngineBenchError> {
        let output = |detail: String| EngineBenchError::Output {
            path: path.to_path_buf(),
            detail,
        };
        let json = serde_json::to_string_pretty(self).map_err(|e| output(e.to_string()))?;
        std::fs::write(path, json + "\n").map_err(|e| output(e.to_string()))
    }

    /// The Markdown tables printed on stdout.
    pub fn to_markdown(&self) -> String {
        let mut md = String::new();
        self.header(&mut md);
        self.speed_table(&mut md);
        self.scenario_table(&mut md);
        md
    }

    fn header(&self, md: &mut String) {
        let r = &self.run;
        let load = |l: Option<[f64; 3]>| l.map_or("?".to_owned(), |l| format!("{:.2}", l[0]));
        let _ = writeln!(
            md,
            "Model `{}`, {} threads, {} build, {} measured run(s) after {} warm-up(s){}; \
             prefix cache off, block size {}, {} KV cache, step budget {} tokens; 1-minute load average \
             {} before, {} after; memory read bandwidth {:.1} GB/s before, {:.1} after \
             ({} threads over {} MiB).\n",
            r.model,
            r.threads,
            r.profile,
            r.repeat,
            r.warmup,
            if r.quick { ", --quick sizes" } else { "" },
            r.engine.block_size,
            r.engine.kv_cache_dtype.name(),
            r.engine.max_num_batched_tokens,
            load(r.load_average[0]),
            load(r.load_average[1]),
            r.memory_read[0].gb_s,
            r.memory_read[1].gb_s,
            r.memory_read[0].threads,
            r.memory_read[0].bytes >> 20,
        );
    }

    fn speed_table(&self, md: &mut String) {
        let llama = self.llama_cpp.as_ref();
        md.push_str("| Measurement | Orchard | candle baseline | Orchard / candle ");
        if llama.is_some() {
            md.push_str("| llama.cpp (this run) | Orchard / llama.cpp ");
        }
        md.push_str("| llama.cpp (reference†) | Orchard / reference† |\n|---|---:|---:|---:|");
        if llama.is_some() {
            md.push_str("---:|---:|");
        }
        md.push_str("---:|---:|\n");
        let reference = &self.reference;
        for (i, (o, c)) in self
            .orchard
            .prefill
            .iter()
            .zip(&self.candle.prefill)
            .enumerate()
        {
            let row = Row {
                name: format!("Prefill, {}-token prompt (tok/s)", o.prompt_tokens),
                ours: o.tok_s.mean,
                candle: Some(c.tok_s.mean),
                llama: llama.map(|l| l.prefill.get(i).map(|p| p.tok_s.mean)),
                reference: Some(reference.prompt_tok_s),
            };
            row.write(md);
        }
        let d = &self.orchard.decode;
        Row {
            name: format!("Decode, 1 stream, {} tokens (tok/s)", d.shape.output_tokens),
            ours: d.tok_s.mean,
            candle: Some(self.candle.decode.tok_s.mean),
            llama: llama.map(|l| Some(l.decode.tok_s.mean)),
            reference: Some(reference.decode_tok_s),
        }
        .write(md);
        for (i, a) in self.orchard.aggregate.iter().enumerate() {
            Row {
                name: format!(
                    "Aggregate decode, {} seq x {} tokens (tok/s; end-to-end {:.1})",
                    a.concurrency, a.shape.output_tokens, a.e2e_tok_s.mean
                ),
                ours: a.decode_tok_s.mean,
                candle: None,
                llama: llama.map(|l| l.aggregate.get(i).map(|g| g.decode_tok_s.mean)),
                reference: (a.concurrency == 16).then_some(reference.aggregate_16_tok_s),
            }
            .write(md);
        }
        let _ = writeln!(
            md,
            "\nDecode roofline: {:.1} MB of weights read per token at {:.1} GB/s (the mean of \
             the two probes) allow at most {:.1} tok/s; Orchard's single-stream decode is \
             {:.0}% of it.",
            self.run.weight_bytes as f64 / 1e6,
            self.run.mean_read_gb_s(),
            self.ratios.decode_roofline_tok_s,
            self.ratios.decode_of_roofline * 100.0,
        );
        if let Some(l) = llama {
            let _ = writeln!(
                md,
                "\nllama.cpp (this run): {}, {} threads, {} KV cache, its own defaults \
                 otherwise; prefill and single-stream decode from `llama-bench` (pp, tg), \
                 aggregate decode from `llama-batched-bench` (S_TG), {} repetition(s) each, \
                 run after Orchard and candle.",
                l.source
                    .clone()
                    .unwrap_or_else(|| format!("build {}", l.build_commit)),
                l.threads,
                l.kv_cache_type,
                l.decode.tok_s.runs,
            );
        }
        let _ = writeln!(
            md,
            "\n† {}: prompt {} tok/s, decode {} tok/s, 16-stream aggregate {} tok/s. \
             One prompt-processing figure is set against both prompt lengths.\n",
            reference.source,
            reference.prompt_tok_s,
            reference.decode_tok_s,
            reference.aggregate_16_tok_s,
        );
    }

    fn scenario_table(&self, md: &mut String) {
        md.push_str(
            "| Scenario | Prompt / decode tokens | TTFT (ms) | Decode (tok/s) \
             | Prefill (tok/s) | End-to-end (ms) |\n|---|---:|---:|---:|---:|---:|\n",
        );
        for s in &self.orchard.scenarios {
            let _ = writeln!(
                md,
                "| {} | {} / {} | {:.1} | {:.1} | {:.1} | {:.1} |",
                s.id,
                s.shape.prompt_tokens,
                s.shape.output_tokens,
                s.ttft_ms.mean,
                s.decode_tok_s.mean,
                s.prefill_tok_s.mean,
                s.e2e_ms.mean,
            );
        }
    }
}

/// One row of the speed table; the ratio columns follow from the figures.
struct Row {
    name: String,
    ours: f64,
    candle: Option<f64>,
    /// `None`: no llama.cpp columns; `Some(None)`: llama.cpp has no such figure.
    llama: Option<Option<f64>>,
    reference: Option<f64>,
}

impl Row {
    fn write(&self, md: &mut String) {
        let figure = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
        let times =
            |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{:.2}x", ratio(self.ours, v)));
        let _ = write!(
            md,
            "| {} | {:.1} | {} | {} |",
            self.name,
            self.ours,
            figure(self.candle),
            times(self.candle),
        );
        if let Some(llama) = self.llama {
            let _ = write!(md, " {} | {} |", figure(llama), times(llama));
        }
        let _ = writeln!(
            md,
            " {} | {} |",
            figure(self.reference),
            times(self.reference)
        );
    }
}

/// `ours / theirs`, 0 when `theirs` is not a positive figure.
fn ratio(ours: f64, theirs: f64) -> f64 {
    match theirs > 0.0 {
        true => ours / theirs,
        false => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(v: f64) -> Stat {
        Stat::of(&[v])
    }

    fn fixture() -> EngineBenchReport {
        let shape = Shape {
            prompt_tokens: 16,
            output_tokens: 128,
        };
        let orchard = OrchardResults {
            prefill: vec![PrefillMeasure {
                prompt_tokens: 128,
                tok_s: stat(200.0),
                counts: Counts::default(),
            }],
            decode: DecodeMeasure {
                shape,
                tok_s: stat(50.0),
                counts: Counts::default(),
            },
            aggregate: vec![AggregateMeasure {
                concurrency: 16,
                shape,
                decode_tok_s: stat(140.0),
                e2e_tok_s: stat(100.0),
                counts: Counts::default(),
            }],
            scenarios: Vec::new(),
        };
        let candle = CandleResults {
            prefill: vec![CandlePrefill {
                prompt_tokens: 128,
                tok_s: stat(100.0),
            }],
            decode: CandleDecode {
                shape,
                tok_s: stat(100.0),
            },
        };
        let run = RunInfo {
            model: "m.gguf".into(),
            threads: 2,
            repeat: 1,
            warmup: 1,
            quick: false,
            profile: "release".into(),
            load_average: [Some([1.0, 1.0, 1.0]), None],
            memory_read: [20.0, 30.0].map(|gb_s| Bandwidth {
                gb_s,
                threads: 2,
                bytes: 256 << 20,
            }),
            weight_bytes: 100_000_000,
            engine: EngineSettings::of(&WorkerConfig::default()),
        };
        EngineBenchReport::new(run, orchard, candle, None)
    }

    #[test]
    fn ratios_divide_orchard_by_candle() {
        let report = fixture();
        assert_eq!(report.ratios.prefill, vec![(128, 2.0)]);
        assert_eq!(report.ratios.decode, 0.5);
    }

    #[test]
    fn decode_is_set_against_the_memory_roofline() {
        let report = fixture();
        // 100 MB per token at (20 + 30) / 2 GB/s.
        assert_eq!(report.ratios.decode_roofline_tok_s, 250.0);
        let decode = report.orchard.decode.tok_s.mean;
        assert_eq!(report.ratios.decode_of_roofline, decode / 250.0);
        let md = report.to_markdown();
        assert!(
            md.contains("memory read bandwidth 20.0 GB/s before, 30.0 after"),
            "{md}"
        );
        assert!(
            md.contains("100.0 MB of weights read per token at 25.0 GB/s"),
            "{md}"
        );
        assert!(md.contains("at most 250.0 tok/s"), "{md}");
    }

    #[test]
    fn the_table_labels_llama_cpp_as_a_reference_not_a_measurement() {
        let md = fixture().to_markdown();
        assert!(
            md.contains("| Prefill, 128-token prompt (tok/s) | 200.0 | 100.0 | 2.00x | 1650.0 |")
        );
        assert!(md.contains("| 140.0 | - | - | 280.0 | 0.50x |"));
        assert!(md.contains("reference, measured separately"));
    }

    #[test]
    fn llama_cpp_measured_in_the_run_gets_its_own_columns_and_ratios() {
        use crate::engine_bench::llama_cpp::{LlamaAggregate, LlamaDecode, LlamaPrefill};
        let plain = fixture();
        assert!(!plain.to_markdown().contains("llama.cpp (this run)"));
        let llama = LlamaCppResults {
            source: None,
            build_commit: "abc1234".into(),
            kv_cache_type: "f16".into(),
            threads: 2,
            prefill: vec![LlamaPrefill {
                prompt_tokens: 128,
                tok_s: stat(400.0),
            }],
            decode: LlamaDecode {
                output_tokens: 128,
                tok_s: stat(25.0),
            },
            aggregate: vec![LlamaAggregate {
                concurrency: 16,
                prompt_tokens: 16,
                output_tokens: 128,
                decode_tok_s: stat(70.0),
            }],
        };
        let report = EngineBenchReport::new(
            plain.run.clone(),
            plain.orchard.clone(),
            plain.candle.clone(),
            Some(llama),
        );
        let ratios = report.ratios.llama_cpp.clone();
        assert_eq!(
            ratios,
            Some(LlamaRatios {
                prefill: vec![(128, 0.5)],
                decode: 2.0,
                aggregate: vec![(16, 2.0)],
            })
        );
        let md = report.to_markdown();
        assert!(
            md.contains("| llama.cpp (this run) | Orchard / llama.cpp |"),
            "{md}"
        );
        assert!(
            md.contains("| 200.0 | 100.0 | 2.00x | 400.0 | 0.50x | 1650.0 | 0.12x |"),
            "{md}"
        );
        assert!(
            md.contains("| 50.0 | 100.0 | 0.50x | 25.0 | 2.00x | 265.0 |"),
            "{md}"
        );
        assert!(
            md.contains("| 140.0 | - | - | 70.0 | 2.00x | 280.0 | 0.50x |"),
            "{md}"
        );
        assert!(
            md.contains("build abc1234, 2 threads, f16 KV cache"),
            "{md}"
        );
        // Every row has as many cells as the header.
        let cells = |line: &str| line.matches('|').count();
        let table: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).take(4).collect();
        assert!(table.iter().all(|l| cells(l) == cells(table[0])), "{md}");
    }

    #[test]
    fn stat_summarises_the_runs() {
        let s = Stat::of(&[1.0, 3.0, 2.0]);
        assert_eq!((s.mean, s.min, s.max, s.runs), (2.0, 1.0, 3.0, 3));
    }
}
