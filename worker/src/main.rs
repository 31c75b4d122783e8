//! `orchard-worker`: runs the engine from the command line.
//!
//! `orchard-worker generate --prompt "..."` loads a model (the default one when `--model` is not
//! given), renders the prompt with the model's chat template and streams a greedy completion,
//! then prints prompt and decode speed.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::{Parser, Subcommand};
use orchard_worker::engine::batch::{SeqSlice, StepBatch};
use orchard_worker::model::gguf::{self, default_model_path};
use orchard_worker::model::{KvStore, KvStoreConfig};
use orchard_worker::text::chat_template::{ChatTemplate, Message};
use orchard_worker::text::gguf_tokenizer;

#[derive(Parser)]
#[command(name = "orchard-worker", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a completion for one prompt, without the cluster.
    Generate(GenerateArgs),
}

#[derive(Parser)]
struct GenerateArgs {
    /// A `.gguf` model file; default: the default model in the Orchard cache.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Send the prompt as is, without the chat template.
    #[arg(long)]
    raw: bool,
}

const BLOCK: usize = 16;

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Generate(args) => generate(args),
    }
}

fn generate(args: GenerateArgs) -> Result<()> {
    let path = args.model.unwrap_or_else(default_model_path);
    anyhow::ensure!(
        path.exists(),
        "model {} not found (run deploy/fetch-model.sh)",
        path.display()
    );
    let loaded = gguf::load(&path, &Device::Cpu)?;
    let tokenizer = gguf_tokenizer::from_gguf(&loaded.content)?;
    let special = gguf_tokenizer::special_tokens(&loaded.content);
    let text = match (args.raw, gguf_tokenizer::chat_template(&loaded.content)) {
        (false, Some(src)) => {
            ChatTemplate::new(src, String::new(), String::new())?.render(&[Message {
                role: "user".into(),
                content: args.prompt.clone(),
            }])?
        }
        _ => args.prompt.clone(),
    };
    let prompt = tokenizer
        .encode(text, false)
        .map_err(anyhow::Error::msg)?
        .get_ids()
        .to_vec();
    let model = &loaded.model;
    let cfg = model.config();
    let capacity = prompt.len() + args.max_tokens;
    let blocks = capacity.div_ceil(BLOCK);
    let mut kv = KvStore::new(KvStoreConfig {
        num_layers: cfg.num_layers,
        num_blocks: blocks,
        block_size: BLOCK,
        kv_dim: cfg.kv_dim(),
    });
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut tokens = prompt.clone();
    let (mut feed, mut done) = (prompt.clone(), 0usize);
    let start = Instant::now();
    let mut first_token = None;
    let mut printed = 0usize;
    for _ in 0..args.max_tokens {
        let batch = single_sequence_step(&feed, done, &table);
        done += feed.len();
        let row = model
            .forward(&batch, &mut kv)?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        let next = argmax(&row).context("empty logits")?;
        first_token.get_or_insert_with(Instant::now);
        if Some(next) == special.eos {
            break;
        }
        tokens.push(next);
        let so_far = tokenizer
            .decode(&tokens[prompt.len()..], true)
            .map_err(anyhow::Error::msg)?;
        if !so_far.ends_with('\u{fffd}') {
            print!("{}", &so_far[printed.min(so_far.len())..]);
            std::io::stdout().flush()?;
            printed = so_far.len();
        }
        feed = vec![next];
    }
    report(
        start,
        first_token,
        prompt.len(),
        tokens.len() - prompt.len(),
    );
    Ok(())
}

fn single_sequence_step(feed: &[u32], done: usize, table: &[u32]) -> StepBatch {
    let positions: Vec<u32> = (done..done + feed.len()).map(|p| p as u32).collect();
    let slot_mapping = positions
        .iter()
        .map(|&p| table[p as usize / BLOCK] * BLOCK as u32 + p % BLOCK as u32)
        .collect();
    StepBatch {
        token_ids: feed.to_vec(),
        positions,
        slot_mapping,
        seqs: vec![SeqSlice {
            query_start: 0,
            query_len: feed.len() as u32,
            context_len: (done + feed.len()) as u32,
            block_table: table.to_vec(),
            needs_logits: true,
        }],
    }
}

fn argmax(row: &[f32]) -> Option<u32> {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
        .map(|(i, _)| i as u32)
}

fn report(start: Instant, first: Option<Instant>, prompt: usize, generated: usize) {
    let now = Instant::now();
    let ttft = first.map(|f| f - start).unwrap_or_default();
    let decode = now - first.unwrap_or(now);
    let decode_tps = match generated > 1 {
        true => (generated - 1) as f64 / decode.as_secs_f64().max(1e-9),
        false => 0.0,
    };
    eprintln!(
        "\n[prompt {prompt} tokens, prefill {:.0} tok/s, TTFT {:.1} ms; {generated} tokens, decode {decode_tps:.1} tok/s]",
        prompt as f64 / ttft.as_secs_f64().max(1e-9),
        ttft.as_secs_f64() * 1e3
    );
}
