use candle_core::Device;
use orchard_worker::engine::batch::{SeqSlice, StepBatch};
use orchard_worker::model::gguf::{self, default_model_path};
use orchard_worker::model::kv_store::KvCacheDType;
use orchard_worker::model::{KvStore, KvStoreConfig};
use std::time::Instant;

/// Prefill of `len` (arg 1) tokens, `rounds` (arg 2) times; prints ms per prefill.
fn main() {
    let len: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(128);
    let rounds: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let model = gguf::load(&default_model_path(), &Device::Cpu)
        .unwrap()
        .model;
    let cfg = model.config();
    let nblk = (len + 1).div_ceil(16) + 1;
    let table: Vec<u32> = (0..nblk as u32).collect();
    let mut kv = KvStore::new(KvStoreConfig {
        num_layers: cfg.num_layers,
        num_blocks: nblk,
        block_size: 16,
        kv_dim: cfg.kv_dim(),
        dtype: KvCacheDType::F32,
    });
    let mut b = StepBatch::default();
    b.seqs.push(SeqSlice {
        query_start: 0,
        query_len: len as u32,
        context_len: len as u32,
        block_table: table.clone(),
        needs_logits: true,
    });
    for p in 0..len {
        b.token_ids.push(((p * 7919) % 49000) as u32);
        b.positions.push(p as u32);
        b.slot_mapping
            .push((table[p / 16] as usize * 16 + p % 16) as u32);
    }
    for _ in 0..rounds {
        let s = Instant::now();
        model.forward(&b, &mut kv).unwrap();
        println!("{:.3}", s.elapsed().as_secs_f64() * 1e3);
    }
}
