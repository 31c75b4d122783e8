use candle_core::Device;
use orchard_worker::engine::batch::{SeqSlice, StepBatch};
use orchard_worker::model::gguf::{self, default_model_path};
use orchard_worker::model::kv_store::KvCacheDType;
use orchard_worker::model::{KvStore, KvStoreConfig};
use std::time::Instant;

fn step(start: usize, len: usize, table: &[u32]) -> StepBatch {
    let mut b = StepBatch::default();
    b.seqs.push(SeqSlice {
        query_start: 0,
        query_len: len as u32,
        context_len: (start + len) as u32,
        block_table: table.to_vec(),
        needs_logits: true,
    });
    for p in start..start + len {
        b.token_ids.push(((p * 7919) % 49000) as u32);
        b.positions.push(p as u32);
        b.slot_mapping
            .push((table[p / 16] as usize * 16 + p % 16) as u32);
    }
    b
}

/// Prints the mean ms per decode step at context `ctx` (arg 1), `rounds` (arg 2) rounds of 50.
fn main() {
    let ctx: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let rounds: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let model = gguf::load(&default_model_path(), &Device::Cpu)
        .unwrap()
        .model;
    let cfg = model.config();
    let nblk = (ctx + 1).div_ceil(16) + 1;
    let table: Vec<u32> = (0..nblk as u32).rev().collect();
    let mut kv = KvStore::new(KvStoreConfig {
        num_layers: cfg.num_layers,
        num_blocks: nblk * 2,
        block_size: 16,
        kv_dim: cfg.kv_dim(),
        dtype: KvCacheDType::F32,
    });
    model.forward(&step(0, ctx, &table), &mut kv).unwrap();
    let b = step(ctx, 1, &table);
    for _ in 0..rounds {
        let n = 50;
        let s = Instant::now();
        for _ in 0..n {
            model.forward(&b, &mut kv).unwrap();
        }
        println!("{:.4}", s.elapsed().as_secs_f64() / n as f64 * 1e3);
    }
}
