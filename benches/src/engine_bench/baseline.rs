//! The baseline: candle-transformers' own quantized Llama (`quantized_llama::ModelWeights`) on
//! the same GGUF file, driven like candle's `quantized` example - the whole prompt in one
//! forward at position 0, then greedy decoding one token per forward. Its KV cache lives in the
//! model and is reset by every forward at position 0, so each run starts cold.
//!
//! candle's quantized matmul runs on candle's own worker pool, sized by `CANDLE_NUM_THREADS`
//! (else `RAYON_NUM_THREADS`, else the physical cores) when first used; the command line sets
//! both from `--threads` before anything starts.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use indicatif::ProgressBar;

use super::ours::rate;
use super::report::{CandleDecode, CandlePrefill, CandleResults, Stat};
use super::workload::{PromptMaker, Shape};
use super::{EngineBenchConfig, EngineBenchError};

/// candle's quantized Llama, loaded on the CPU.
pub struct Baseline {
    model: ModelWeights,
    device: Device,
}

fn candle(during: &'static str) -> impl FnOnce(candle_core::Error) -> EngineBenchError {
    move |source| EngineBenchError::Baseline { during, source }
}

impl Baseline {
    /// Loads `path` with `ModelWeights::from_gguf`, as candle's example does.
    pub fn load(path: &Path) -> Result<Self, EngineBenchError> {
        let io = |source| EngineBenchError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut reader = BufReader::new(File::open(path).map_err(io)?);
        let content = gguf_file::Content::read(&mut reader).map_err(candle("reading the GGUF"))?;
        let device = Device::Cpu;
        let model = ModelWeights::from_gguf(content, &mut reader, &device)
            .map_err(candle("loading the model"))?;
        Ok(Self { model, device })
    }

    /// One forward over `tokens` starting at `position`; returns the greedy next token.
    fn forward(&mut self, tokens: &[u32], position: usize) -> Result<u32, EngineBenchError> {
        let input = Tensor::new(tokens, &self.device)
            .and_then(|t| t.unsqueeze(0))
            .map_err(candle("building the input"))?;
        let logits = self
            .model
            .forward(&input, position)
            .map_err(candle("forward"))?;
        logits
            .squeeze(0)
            .and_then(|l| l.argmax(0))
            .and_then(|t| t.to_scalar::<u32>())
            .map_err(candle("greedy sampling"))
    }

    /// Prefill tok/s of `prompt`: one forward, first token sampled.
    fn prefill_rate(&mut self, prompt: &[u32]) -> Result<f64, EngineBenchError> {
        let start = Instant::now();
        self.forward(prompt, 0)?;
        rate(prompt.len() as f64, start.elapsed(), "candle prefill tok/s")
    }

    /// Prefills `prompt`, then decodes `output_tokens - 1` more tokens one forward each;
    /// returns decode tok/s (the tokens after the first, over their time).
    fn decode_rate(&mut self, prompt: &[u32], output_tokens: u32) -> Result<f64, EngineBenchError> {
        let mut token = self.forward(prompt, 0)?;
        let start = Instant::now();
        for i in 1..output_tokens as usize {
            token = self.forward(&[token], prompt.len() + i - 1)?;
        }
        rate(
            f64::from(output_tokens - 1),
            start.elapsed(),
            "candle decode tok/s",
        )
    }
}

/// Warm-up, prefill at every prompt length and single-stream decode on the baseline, on the
/// same sizes as Orchard's measurements.
pub fn measure(
    model: &mut Baseline,
    prompts: &mut PromptMaker,
    config: &EngineBenchConfig,
    progress: &ProgressBar,
) -> Result<CandleResults, EngineBenchError> {
    let sizes = &config.sizes;
    progress.set_message("candle: warm-up");
    for _ in 0..config.warmup {
        model.decode_rate(&prompts.next(sizes.decode.prompt_tokens)?, 4)?;
        progress.inc(1);
    }
    let mut prefill = Vec::new();
    for &tokens in &sizes.prefill_prompts {
        progress.set_message(format!("candle: prefill {tokens} tokens"));
        let mut rates = Vec::new();
        for _ in 0..config.repeat {
            rates.push(model.prefill_rate(&prompts.next(tokens)?)?);
            progress.inc(1);
        }
        prefill.push(CandlePrefill {
            prompt_tokens: tokens,
            tok_s: Stat::of(&rates),
        });
    }
    progress.set_message("candle: single-stream decode");
    let decode = measure_decode(model, prompts, sizes.decode, config.repeat, progress)?;
    Ok(CandleResults { prefill, decode })
}

fn measure_decode(
    model: &mut Baseline,
    prompts: &mut PromptMaker,
    shape: Shape,
    repeat: u32,
    progress: &ProgressBar,
) -> Result<CandleDecode, EngineBenchError> {
    let mut rates = Vec::new();
    for _ in 0..repeat {
        rates.push(model.decode_rate(&prompts.next(shape.prompt_tokens)?, shape.output_tokens)?);
        progress.inc(1);
    }
    Ok(CandleDecode {
        shape,
        tok_s: Stat::of(&rates),
    })
}
