use orchard_common::config::WorkerConfig;
use orchard_worker::engine::batch::{SeqSlice, StepBatch};
use orchard_worker::engine::load_model;
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

fn main() {
    let ctx: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let rounds: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let cfg = WorkerConfig::default();
    let (mut parts, _) = load_model(&cfg).unwrap();
    let nblk = (ctx + 1).div_ceil(16) + 1;
    let table: Vec<u32> = (0..nblk as u32).rev().collect();
    parts.runner.execute(&step(0, ctx, &table)).unwrap();
    let b = step(ctx, 1, &table);
    for _ in 0..rounds {
        let n = 50;
        let s = Instant::now();
        for _ in 0..n {
            parts.runner.execute(&b).unwrap();
        }
        println!("{:.4}", s.elapsed().as_secs_f64() / n as f64 * 1e3);
    }
}
