//! Our Llama against candle-transformers' `quantized_llama` on the default model, teacher-forced
//! on the reference's greedy continuation of four prompts (64 tokens each), with the KV cache
//! in f32 (the reference's own cache type and the engine's default) and in f16.

use std::fs::File;
use std::io::BufReader;

mod tiny_llama;

use anyhow::Result;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
#[cfg(target_arch = "x86_64")]
use orchard_worker::kernels::Isa;
use orchard_worker::model::gguf::{self, default_model_path};
use orchard_worker::model::kv_store::KvCacheDType;
use orchard_worker::model::{KvStore, KvStoreConfig};
use orchard_worker::text::gguf_tokenizer;
use tiny_llama::{one_sequence_step, run_steps_in};

const PROMPTS: [&str; 4] = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
];
const STEPS: usize = 64;
const BLOCK: usize = 16;

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// The default model's path; an error saying how to fetch it when it is missing.
fn model_path() -> Result<std::path::PathBuf> {
    let path = default_model_path();
    anyhow::ensure!(
        path.exists(),
        "default model missing at {} (run deploy/fetch-model.sh)",
        path.display()
    );
    Ok(path)
}

/// candle-transformers' `quantized_llama` on the model at `path`, with an empty KV cache.
fn load_reference(path: &std::path::Path) -> Result<ModelWeights> {
    let mut reader = BufReader::new(File::open(path)?);
    let ct = candle_core::quantized::gguf_file::Content::read(&mut reader)?;
    Ok(ModelWeights::from_gguf(ct, &mut reader, &Device::Cpu)?)
}

/// The reference's greedy continuation, with its logits at each step.
fn reference(path: &std::path::Path, prompt: &[u32]) -> Result<(Vec<u32>, Vec<Vec<f32>>)> {
    let mut m = load_reference(path)?;
    let (mut tokens, mut logits) = (Vec::new(), Vec::new());
    let mut input = prompt.to_vec();
    let mut pos = 0;
    for _ in 0..STEPS {
        let x = Tensor::new(input.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let row = m.forward(&x, pos)?.squeeze(0)?.to_vec1::<f32>()?;
        pos += input.len();
        let next = argmax(&row) as u32;
        tokens.push(next);
        logits.push(row);
        input = vec![next];
    }
    Ok((tokens, logits))
}

/// One sequence through our model, fed `prompt` then `forced` one token at a time; the logits
/// after the prompt and after each forced token.
fn ours_forced(
    model: &orchard_worker::model::Llama,
    prompt: &[u32],
    forced: &[u32],
    dtype: KvCacheDType,
) -> Result<Vec<Vec<f32>>> {
    let cfg = model.config();
    let total = prompt.len() + forced.len();
    let blocks = total.div_ceil(BLOCK);
    let mut kv = KvStore::new(KvStoreConfig {
        num_layers: cfg.num_layers,
        num_blocks: blocks + 1,
        block_size: BLOCK,
        kv_dim: cfg.kv_dim(),
        dtype,
    });
    // Blocks in reverse order, so the block table really is consulted.
    let table: Vec<u32> = (0..blocks as u32).rev().collect();
    let steps = STEPS.min(forced.len() + 1);
    let (rows, _) = run_steps_in(model, &mut kv, &table, prompt, steps, Some(forced))?;
    Ok(rows)
}

/// How our model compares with the reference over every teacher-forced position.
#[derive(Debug, Default)]
struct Comparison {
    /// Positions where our argmax equals the reference's.
    agree: usize,
    /// Positions where our logits equal the reference's bit for bit.
    identical: usize,
    total: usize,
    /// Argmax mismatches where the reference's top-2 logits are 0.5 or more apart.
    not_near_ties: Vec<String>,
}

/// Compares every teacher-forced position with a cache of each of `dtypes`.
fn compare_with_reference(dtypes: &[KvCacheDType]) -> Result<Vec<Comparison>> {
    let path = model_path()?;
    let loaded = gguf::load(&path, &Device::Cpu)?;
    let tokenizer = gguf_tokenizer::from_gguf(&loaded.content)?;
    let mut all: Vec<Comparison> = dtypes.iter().map(|_| Comparison::default()).collect();
    for prompt in PROMPTS {
        let ids = tokenizer
            .encode(prompt, false)
            .map_err(anyhow::Error::msg)?
            .get_ids()
            .to_vec();
        let (ref_tokens, ref_logits) = reference(&path, &ids)?;
        for (&dtype, c) in dtypes.iter().zip(&mut all) {
            let ours = ours_forced(&loaded.model, &ids, &ref_tokens, dtype)?;
            compare(prompt, &ours, &ref_tokens, &ref_logits, c);
        }
    }
    for c in &all {
        anyhow::ensure!(c.total == PROMPTS.len() * STEPS, "compared {}", c.total);
    }
    Ok(all)
}

/// Adds one prompt's positions to `c`.
fn compare(
    prompt: &str,
    ours: &[Vec<f32>],
    ref_tokens: &[u32],
    ref_logits: &[Vec<f32>],
    c: &mut Comparison,
) {
    for (i, (row, &b)) in ours.iter().zip(ref_tokens).enumerate() {
        c.total += 1;
        if *row == ref_logits[i] {
            c.identical += 1;
        }
        let a = argmax(row) as u32;
        if a == b {
            c.agree += 1;
            continue;
        }
        let mut sorted = ref_logits[i].clone();
        sorted.sort_by(|x, y| y.total_cmp(x));
        if sorted[0] - sorted[1] >= 0.5 {
            c.not_near_ties.push(format!(
                "prompt {prompt:?} step {i}: ours {a} vs reference {b} ({} vs {})",
                sorted[0], sorted[1]
            ));
        }
    }
}

/// The bar with the default f32 cache: argmax agreement >= 98%, every mismatch a
/// near-tie (reference top-2 logits within 0.5). The opt-in f16 cache rounds K and V, and the
/// model's output is chaotic under that rounding: it agreed at 247/256 (all near-ties) when it
/// was introduced, but rounding V alone flipped a position with a 1.2-logit margin, so it is
/// held to 95% agreement only. With an f32 cache, where candle's f32 matmuls run gemm's AVX2 kernels (an x86-64 CPU with
/// AVX2 and FMA but no AVX-512, like the CI machine), our attention follows their operation
/// order, so every position's logits must also be the reference's bits.
#[test]
fn teacher_forced_logits_agree_with_candle_quantized_llama() -> Result<()> {
    let dtypes = [KvCacheDType::F32, KvCacheDType::F16];
    let all = compare_with_reference(&dtypes)?;
    for (dtype, c) in dtypes.iter().zip(&all) {
        eprintln!(
            "{dtype:?} cache: argmax agreement {}/{} ({} not near-ties), bit-identical logits at \
             {}/{} positions",
            c.agree,
            c.total,
            c.not_near_ties.len(),
            c.identical,
            c.total
        );
        for far in &c.not_near_ties {
            eprintln!("  {far}");
        }
        let floor = match dtype {
            KvCacheDType::F32 => {
                anyhow::ensure!(c.not_near_ties.is_empty(), "{:?}", c.not_near_ties);
                98
            }
            KvCacheDType::F16 => 95,
        };
        anyhow::ensure!(
            c.agree * 100 >= c.total * floor,
            "{dtype:?} cache: argmax agreement {}/{} below {floor}%",
            c.agree,
            c.total
        );
    }
    let c = &all[0];
    if gemm_runs_avx2_kernels() {
        anyhow::ensure!(
            c.identical == c.total,
            "logits differ from the reference at {} of {} positions",
            c.total - c.identical,
            c.total
        );
    }
    Ok(())
}

/// Whether gemm (candle's f32 matmul) picks its AVX2 + FMA kernels on this CPU, the ones our
/// attention kernels reproduce: our kernels run their AVX2 path and gemm has no AVX-512 to
/// prefer.
fn gemm_runs_avx2_kernels() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        Isa::detect() == Isa::Avx2 && !is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// With one token the attention is a softmax over one position, so this compares everything
/// else - embedding, RMSNorm, the Q4_1 and Q8_0 matmuls (stacked q/k/v and gate/up), SwiGLU,
/// the LM head: our logits must equal the reference's bit for bit.
#[test]
fn single_token_logits_equal_the_reference_bit_for_bit() -> Result<()> {
    let path = model_path()?;
    let loaded = gguf::load(&path, &Device::Cpu)?;
    let mut reference = load_reference(&path)?;
    let cfg = loaded.model.config();
    for id in [1u32, 504, 28_000] {
        let x = Tensor::new(&[id], &Device::Cpu)?.unsqueeze(0)?;
        let want = reference.forward(&x, 0)?.squeeze(0)?.to_vec1::<f32>()?;
        let mut kv = KvStore::new(KvStoreConfig {
            num_layers: cfg.num_layers,
            num_blocks: 1,
            block_size: BLOCK,
            kv_dim: cfg.kv_dim(),
            dtype: KvCacheDType::F32,
        });
        let batch = one_sequence_step(&kv, &[0], &[id], 0)?;
        let got = loaded
            .model
            .forward(&batch, &mut kv)?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        anyhow::ensure!(got == want, "token {id}: logits differ from the reference");
    }
    Ok(())
}
