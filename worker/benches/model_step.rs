//! One engine step of the default model (SmolLM2-135M Q4_1) on the CPU, reported as tokens/s:
//! a single-sequence decode step at a ~100-token context, prefill of 128 and 512 tokens, a
//! 16-sequence decode step (each sequence at ~100 tokens of context), and a single-sequence
//! decode step at a 1000-token context with the KV cache in f32 and in f16.
//!
//! `cargo bench -p orchard-worker --bench model_step`; skipped with a message when the model
//! file is absent (`deploy/fetch-model.sh` fetches it).

use std::hint::black_box;

use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use orchard_worker::engine::batch::{SeqSlice, StepBatch};
use orchard_worker::model::gguf::{self, default_model_path};
use orchard_worker::model::kv_store::KvCacheDType;
use orchard_worker::model::{KvStore, KvStoreConfig, Llama};

const BLOCK: usize = 16;
const CONTEXT: usize = 100;
const LONG_CONTEXT: usize = 1000;

/// A step holding, for each sequence `s`, tokens `start..start + len` with blocks
/// `s * blocks_per_seq ..`.
fn step(seqs: usize, start: usize, len: usize, blocks_per_seq: usize) -> StepBatch {
    let mut b = StepBatch::default();
    for s in 0..seqs {
        let table: Vec<u32> = (0..blocks_per_seq)
            .map(|i| (s * blocks_per_seq + i) as u32)
            .collect();
        b.seqs.push(SeqSlice {
            query_start: b.token_ids.len() as u32,
            query_len: len as u32,
            context_len: (start + len) as u32,
            block_table: table.clone(),
            needs_logits: true,
        });
        for p in start..start + len {
            // Arbitrary but valid ids spread over the vocabulary.
            b.token_ids.push(((p * 7919 + s * 104729) % 49000) as u32);
            b.positions.push(p as u32);
            b.slot_mapping
                .push((table[p / BLOCK] as usize * BLOCK + p % BLOCK) as u32);
        }
    }
    b
}

fn store(model: &Llama, blocks: usize, dtype: KvCacheDType) -> KvStore {
    let cfg = model.config();
    KvStore::new(KvStoreConfig {
        num_layers: cfg.num_layers,
        num_blocks: blocks,
        block_size: BLOCK,
        kv_dim: cfg.kv_dim(),
        dtype,
    })
}

fn bench(c: &mut Criterion) {
    let path = default_model_path();
    if !path.exists() {
        eprintln!("model_step: {} missing, skipping", path.display());
        return;
    }
    let model = gguf::load(&path, &Device::Cpu).expect("load model").model;
    let per_seq = 512 / BLOCK + 1;
    let mut g = c.benchmark_group("model_step");
    g.sample_size(10);
    for prompt in [128usize, 512] {
        let mut kv = store(&model, per_seq, KvCacheDType::F32);
        let b = step(1, 0, prompt, per_seq);
        g.throughput(Throughput::Elements(prompt as u64));
        g.bench_function(format!("prefill_{prompt}"), |bn| {
            bn.iter(|| model.forward(black_box(&b), &mut kv).expect("forward"))
        });
    }
    for seqs in [1usize, 16] {
        let mut kv = store(&model, seqs * per_seq, KvCacheDType::F32);
        model
            .forward(&step(seqs, 0, CONTEXT, per_seq), &mut kv)
            .expect("prefill context");
        let b = step(seqs, CONTEXT, 1, per_seq);
        g.throughput(Throughput::Elements(seqs as u64));
        g.bench_function(format!("decode_{seqs}seq_ctx{CONTEXT}"), |bn| {
            bn.iter(|| model.forward(black_box(&b), &mut kv).expect("forward"))
        });
    }
    let long = LONG_CONTEXT / BLOCK + 1;
    for dtype in [KvCacheDType::F32, KvCacheDType::F16] {
        let mut kv = store(&model, long, dtype);
        model
            .forward(&step(1, 0, LONG_CONTEXT, long), &mut kv)
            .expect("prefill context");
        let b = step(1, LONG_CONTEXT, 1, long);
        g.throughput(Throughput::Elements(1));
        let name = format!("decode_1seq_ctx{LONG_CONTEXT}_{}", dtype.name());
        g.bench_function(name, |bn| {
            bn.iter(|| model.forward(black_box(&b), &mut kv).expect("forward"))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
