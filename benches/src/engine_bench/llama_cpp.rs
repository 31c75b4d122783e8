//! llama.cpp measured in the same run (`--llama-cpp DIR`): its own benchmark tools, run as
//! child processes on the same model file with the same thread count, right after Orchard and
//! candle, so all three see the same machine in the same minutes.
//!
//! - `llama-bench -p P1,P2 -n N -r R -o json`: prompt processing at each prefill length and
//!   text generation of `N` tokens, one stream (its `pp` and `tg` tests);
//! - `llama-batched-bench -npp P -ntg N -npl C1,C2,... --output-format jsonl`, run `R` times:
//!   `C` sequences of `P` prompt tokens decoding `N` tokens each; its `S_TG` (tokens of the
//!   decode phase over its duration) is what Orchard's aggregate decode measures.
//!
//! `benches/llama-cpp.sh` builds both tools from the llama.cpp sources that the PyPI sdist of
//! `llama-cpp-python` vendors (the one route to llama.cpp's sources on a machine that reaches
//! only package registries), notes which llama.cpp that is in `orchard-source.txt` next to
//! them (read into the report when present), and prints the folder to pass here.
//!
//! llama.cpp keeps its own defaults (an f16 KV cache, flash attention "auto", its batch sizes);
//! the report records its build commit and KV cache type next to its figures.

use std::path::{Path, PathBuf};
use std::process::Command;

use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};

use super::report::Stat;
use super::workload::Sizes;
use super::EngineBenchError;

/// The folder holding llama.cpp's `llama-bench` and `llama-batched-bench`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlamaCppTools {
    bench: PathBuf,
    batched_bench: PathBuf,
    /// The first line of the folder's `orchard-source.txt`, if any.
    source: Option<String>,
}

/// The note `benches/llama-cpp.sh` leaves next to the tools: which llama.cpp they were built from.
const SOURCE_NOTE: &str = "orchard-source.txt";

impl LlamaCppTools {
    /// The tools in `dir` (a llama.cpp build's `bin` folder); both must be there.
    pub fn in_dir(dir: &Path) -> Result<Self, EngineBenchError> {
        let tool = |name: &str| {
            let path = dir.join(name);
            match path.is_file() {
                true => Ok(path),
                false => Err(EngineBenchError::LlamaCpp {
                    tool: "llama.cpp",
                    detail: format!(
                        "{} not found (build it with benches/llama-cpp.sh, which prints the \
                         folder to pass as --llama-cpp)",
                        path.display()
                    ),
                }),
            }
        };
        let source = std::fs::read_to_string(dir.join(SOURCE_NOTE))
            .ok()
            .and_then(|text| text.lines().next().map(|l| l.trim().to_owned()))
            .filter(|line| !line.is_empty());
        Ok(Self {
            bench: tool("llama-bench")?,
            batched_bench: tool("llama-batched-bench")?,
            source,
        })
    }
}

/// llama.cpp's prompt processing at one prompt length (`llama-bench` `pp` test).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LlamaPrefill {
    pub prompt_tokens: usize,
    /// Prompt tokens / the time of the prompt's `llama_decode`, per repetition.
    pub tok_s: Stat,
}

/// llama.cpp's single-stream generation (`llama-bench` `tg` test).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LlamaDecode {
    pub output_tokens: u32,
    /// Generated tokens / the time of their one-token `llama_decode`s, per repetition.
    pub tok_s: Stat,
}

/// llama.cpp's aggregate decode at one concurrency (`llama-batched-bench` `S_TG`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LlamaAggregate {
    pub concurrency: usize,
    pub prompt_tokens: usize,
    pub output_tokens: u32,
    /// Sequences x generated tokens / the time of the decode phase, per repetition.
    pub decode_tok_s: Stat,
}

/// Everything measured on llama.cpp in this run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LlamaCppResults {
    /// Which llama.cpp the tools were built from (`orchard-source.txt`), when noted.
    pub source: Option<String>,
    /// `llama-bench`'s `build_commit` (`unknown` when built outside a git checkout).
    pub build_commit: String,
    /// llama.cpp's KV cache element type (`type_k`), its default unless set.
    pub kv_cache_type: String,
    /// Compute threads llama.cpp reported.
    pub threads: usize,
    pub prefill: Vec<LlamaPrefill>,
    pub decode: LlamaDecode,
    pub aggregate: Vec<LlamaAggregate>,
}

/// One test of `llama-bench -o json` (the fields used here).
#[derive(Debug, Deserialize)]
struct BenchTest {
    build_commit: String,
    n_threads: usize,
    type_k: String,
    n_prompt: usize,
    n_gen: u32,
    samples_ts: Vec<f64>,
}

/// One line of `llama-batched-bench --output-format jsonl` (the fields used here).
#[derive(Debug, Deserialize)]
struct BatchedLine {
    pp: usize,
    tg: u32,
    pl: usize,
    speed_tg: f64,
}

/// Runs both tools on `model` with `threads` threads at the sizes of Orchard's measurements,
/// `repeat` measured repetitions each.
pub fn measure(
    tools: &LlamaCppTools,
    model: &Path,
    threads: usize,
    sizes: &Sizes,
    repeat: u32,
    progress: &ProgressBar,
) -> Result<LlamaCppResults, EngineBenchError> {
    let list = |v: &[String]| v.join(",");
    let prompts: Vec<String> = sizes.prefill_prompts.iter().map(usize::to_string).collect();
    progress.set_message("llama.cpp: llama-bench");
    let json = run(
        "llama-bench",
        Command::new(&tools.bench)
            .arg("-m")
            .arg(model)
            .args(["-t", &threads.to_string()])
            .args(["-p", &list(&prompts)])
            .args(["-n", &sizes.decode.output_tokens.to_string()])
            .args(["-r", &repeat.to_string()])
            .args(["-o", "json"]),
    )?;
    let mut results = parse_bench(&json, sizes)?;
    results.source = tools.source.clone();
    progress.inc(1);

    let shape = sizes.aggregate;
    let levels: Vec<String> = sizes.concurrency.iter().map(usize::to_string).collect();
    let widest = sizes.concurrency.iter().copied().max().unwrap_or(1);
    let context = widest * (shape.prompt_tokens + shape.output_tokens as usize);
    let mut lines = Vec::new();
    for run_index in 0..repeat {
        progress.set_message(format!(
            "llama.cpp: llama-batched-bench ({}/{repeat})",
            run_index + 1
        ));
        let out = run(
            "llama-batched-bench",
            Command::new(&tools.batched_bench)
                .arg("-m")
                .arg(model)
                .args(["-t", &threads.to_string()])
                .args(["-c", &context.to_string()])
                .args(["-npp", &shape.prompt_tokens.to_string()])
                .args(["-ntg", &shape.output_tokens.to_string()])
                .args(["-npl", &list(&levels)])
                .args(["--output-format", "jsonl"]),
        )?;
        lines.push(out);
    }
    results.aggregate = parse_batched(&lines, sizes)?;
    progress.inc(1);
    Ok(results)
}

/// Runs `command`, returning its stdout; a failed start or exit is an error naming the tool.
fn run(tool: &'static str, command: &mut Command) -> Result<String, EngineBenchError> {
    let failed = |detail: String| EngineBenchError::LlamaCpp { tool, detail };
    let output = command
        .output()
        .map_err(|e| failed(format!("cannot start: {e}")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(failed(format!(
            "{}: {}",
            output.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
        )));
    }
    String::from_utf8(output.stdout).map_err(|e| failed(format!("output is not UTF-8: {e}")))
}

/// The `pp` and `tg` tests of `llama-bench -o json` output, checked against what was asked.
fn parse_bench(json: &str, sizes: &Sizes) -> Result<LlamaCppResults, EngineBenchError> {
    let bad = |detail: String| EngineBenchError::LlamaCpp {
        tool: "llama-bench",
        detail,
    };
    let tests: Vec<BenchTest> =
        serde_json::from_str(json).map_err(|e| bad(format!("unreadable JSON: {e}")))?;
    let first = tests.first().ok_or_else(|| bad("no test results".into()))?;
    let stat = |t: &BenchTest| match t.samples_ts.is_empty() {
        true => Err(bad(format!(
            "test pp{} tg{} has no samples",
            t.n_prompt, t.n_gen
        ))),
        false => Ok(Stat::of(&t.samples_ts)),
    };
    let prefill = sizes
        .prefill_prompts
        .iter()
        .map(|&p| {
            let test = tests
                .iter()
                .find(|t| t.n_prompt == p && t.n_gen == 0)
                .ok_or_else(|| bad(format!("no pp{p} test in the output")))?;
            Ok(LlamaPrefill {
                prompt_tokens: p,
                tok_s: stat(test)?,
            })
        })
        .collect::<Result<_, EngineBenchError>>()?;
    let n = sizes.decode.output_tokens;
    let tg = tests
        .iter()
        .find(|t| t.n_prompt == 0 && t.n_gen == n)
        .ok_or_else(|| bad(format!("no tg{n} test in the output")))?;
    Ok(LlamaCppResults {
        source: None,
        build_commit: first.build_commit.clone(),
        kv_cache_type: first.type_k.clone(),
        threads: first.n_threads,
        prefill,
        decode: LlamaDecode {
            output_tokens: n,
            tok_s: stat(tg)?,
        },
        aggregate: Vec::new(),
    })
}

/// `S_TG` at each concurrency from the JSON lines of every `llama-batched-bench` run (other
/// lines are its log).
fn parse_batched(
    outputs: &[String],
    sizes: &Sizes,
) -> Result<Vec<LlamaAggregate>, EngineBenchError> {
    let bad = |detail: String| EngineBenchError::LlamaCpp {
        tool: "llama-batched-bench",
        detail,
    };
    let mut lines = Vec::new();
    for out in outputs {
        for line in out.lines().filter(|l| l.trim_start().starts_with('{')) {
            let parsed: BatchedLine = serde_json::from_str(line)
                .map_err(|e| bad(format!("unreadable line {line:?}: {e}")))?;
            lines.push(parsed);
        }
    }
    let shape = sizes.aggregate;
    sizes
        .concurrency
        .iter()
        .map(|&c| {
            let samples: Vec<f64> = lines
                .iter()
                .filter(|l| l.pl == c && l.pp == shape.prompt_tokens && l.tg == shape.output_tokens)
                .map(|l| l.speed_tg)
                .collect();
            if samples.len() != outputs.len() {
                return Err(bad(format!(
                    "{} results for {c} sequences from {} runs",
                    samples.len(),
                    outputs.len()
                )));
            }
            Ok(LlamaAggregate {
                concurrency: c,
                prompt_tokens: shape.prompt_tokens,
                output_tokens: shape.output_tokens,
                decode_tok_s: Stat::of(&samples),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `llama-bench -p 8,16 -n 8 -r 2 -o json` on the default model, cut to the fields read
    /// (the real output has ~40 per test).
    const BENCH_JSON: &str = r#"[
      {"build_commit": "0c1e570", "n_threads": 2, "type_k": "f16", "type_v": "f16",
       "n_prompt": 8, "n_gen": 0, "avg_ts": 49.824185, "samples_ts": [ 47.1167, 52.5316 ]},
      {"build_commit": "0c1e570", "n_threads": 2, "type_k": "f16", "type_v": "f16",
       "n_prompt": 16, "n_gen": 0, "avg_ts": 80.0, "samples_ts": [ 70.0, 90.0 ]},
      {"build_commit": "0c1e570", "n_threads": 2, "type_k": "f16", "type_v": "f16",
       "n_prompt": 0, "n_gen": 8, "avg_ts": 100.0, "samples_ts": [ 95.0, 105.0 ]}
    ]"#;

    fn sizes() -> Sizes {
        let mut sizes = Sizes::quick();
        sizes.decode.output_tokens = 8;
        sizes.aggregate.prompt_tokens = 8;
        sizes.aggregate.output_tokens = 6;
        sizes.concurrency = vec![1, 4];
        sizes
    }

    fn batched_output(speeds: [f64; 2]) -> String {
        format!(
            "main: n_kv_max = 64\n\
             {{\"n_kv_max\": 64, \"pp\": 8, \"tg\": 6, \"pl\": 1, \"n_kv\": 14, \"t_pp\": 0.1, \
             \"speed_pp\": 80.0, \"t_tg\": 0.06, \"speed_tg\": {}, \"t\": 0.16, \"speed\": 87.5}}\n\
             {{\"n_kv_max\": 64, \"pp\": 8, \"tg\": 6, \"pl\": 4, \"n_kv\": 56, \"t_pp\": 0.3, \
             \"speed_pp\": 106.0, \"t_tg\": 0.1, \"speed_tg\": {}, \"t\": 0.4, \"speed\": 140.0}}\n\n\
             llama_perf_context_print: load time = 50 ms\n",
            speeds[0], speeds[1]
        )
    }

    #[test]
    fn llama_bench_json_gives_prefill_and_decode_per_repetition() -> Result<(), EngineBenchError> {
        let r = parse_bench(BENCH_JSON, &sizes())?;
        assert_eq!(r.build_commit, "0c1e570");
        assert_eq!((r.kv_cache_type.as_str(), r.threads), ("f16", 2));
        let lens: Vec<_> = r.prefill.iter().map(|p| p.prompt_tokens).collect();
        assert_eq!(lens, [8, 16]);
        assert_eq!(r.prefill[1].tok_s, Stat::of(&[70.0, 90.0]));
        assert_eq!(r.decode.output_tokens, 8);
        assert_eq!(r.decode.tok_s, Stat::of(&[95.0, 105.0]));
        Ok(())
    }

    #[test]
    fn a_missing_test_or_bad_json_is_an_error_naming_llama_bench() {
        let mut other = sizes();
        other.decode.output_tokens = 128;
        let err = parse_bench(BENCH_JSON, &other).map(|_| ());
        assert!(
            matches!(&err, Err(EngineBenchError::LlamaCpp { tool: "llama-bench", detail }) if detail.contains("tg128")),
            "{err:?}"
        );
        assert!(parse_bench("not json", &sizes()).is_err());
        assert!(parse_bench("[]", &sizes()).is_err());
    }

    #[test]
    fn batched_bench_lines_give_one_sample_per_run_and_level() -> Result<(), EngineBenchError> {
        let outputs = [
            batched_output([100.0, 240.0]),
            batched_output([110.0, 260.0]),
        ];
        let agg = parse_batched(&outputs, &sizes())?;
        let levels: Vec<_> = agg.iter().map(|a| a.concurrency).collect();
        assert_eq!(levels, [1, 4]);
        assert_eq!(agg[0].decode_tok_s, Stat::of(&[100.0, 110.0]));
        assert_eq!(agg[1].decode_tok_s, Stat::of(&[240.0, 260.0]));
        // A run that skipped a level (its context too small) is caught.
        let short = outputs[0].replace("\"pl\": 4", "\"pl\": 2");
        assert!(parse_batched(&[short], &sizes()).is_err());
        Ok(())
    }

    /// Writes an executable shell script `name` into `dir`.
    #[cfg(unix)]
    fn script(dir: &Path, name: &str, body: &str) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n"))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
    }

    /// Stand-ins for the two tools: `llama-bench` prints [`BENCH_JSON`] only when called with
    /// the sizes' arguments, `llama-batched-bench` one output per call.
    #[cfg(unix)]
    #[test]
    fn measure_runs_both_tools_with_the_runs_sizes() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let expected = "-m model.gguf -t 2 -p 8,16 -n 8 -r 2 -o json";
        script(
            dir.path(),
            "llama-bench",
            &format!(
                "[ \"$*\" = \"{expected}\" ] || {{ echo \"args: $*\" >&2; exit 3; }}\ncat <<'EOF'\n{BENCH_JSON}\nEOF"
            ),
        )?;
        let batched = "-m model.gguf -t 2 -c 56 -npp 8 -ntg 6 -npl 1,4 --output-format jsonl";
        script(
            dir.path(),
            "llama-batched-bench",
            &format!(
                "[ \"$*\" = \"{batched}\" ] || {{ echo \"args: $*\" >&2; exit 3; }}\ncat <<'EOF'\n{}EOF",
                batched_output([100.0, 240.0])
            ),
        )?;
        let tools = LlamaCppTools::in_dir(dir.path())?;
        let r = measure(
            &tools,
            Path::new("model.gguf"),
            2,
            &sizes(),
            2,
            &ProgressBar::hidden(),
        )?;
        assert_eq!(r.decode.tok_s, Stat::of(&[95.0, 105.0]));
        assert_eq!(r.aggregate[1].decode_tok_s, Stat::of(&[240.0, 240.0]));
        // The same tools asked for other sizes fail, and the error carries the tool's stderr.
        let mut other = sizes();
        other.decode.output_tokens = 9;
        let err = measure(
            &tools,
            Path::new("model.gguf"),
            2,
            &other,
            2,
            &ProgressBar::hidden(),
        )
        .map(|_| ());
        assert!(
            matches!(&err, Err(EngineBenchError::LlamaCpp { tool: "llama-bench", detail }) if detail.contains("args: ") && detail.contains("-n 9")),
            "{err:?}"
        );
        Ok(())
    }

    #[test]
    fn the_folder_note_names_the_source() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        for tool in ["llama-bench", "llama-batched-bench"] {
            std::fs::write(dir.path().join(tool), "")?;
        }
        assert_eq!(LlamaCppTools::in_dir(dir.path())?.source, None);
        std::fs::write(dir.path().join(SOURCE_NOTE), "llama.cpp abc (vendored)\n")?;
        let tools = LlamaCppTools::in_dir(dir.path())?;
        assert_eq!(tools.source.as_deref(), Some("llama.cpp abc (vendored)"));
        Ok(())
    }

    #[test]
    fn a_folder_without_the_tools_says_how_to_build_them() {
        let err = LlamaCppTools::in_dir(Path::new("/nonexistent/llama.cpp/bin"));
        assert!(
            matches!(&err, Err(EngineBenchError::LlamaCpp { detail, .. }) if detail.contains("benches/llama-cpp.sh")),
            "{err:?}"
        );
    }
}
