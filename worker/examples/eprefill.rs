use orchard_common::config::WorkerConfig;
use orchard_common::SamplingParams;
use orchard_worker::engine::api::{EngineEvent, EngineRequest};
use orchard_worker::engine::batch::{SeqSlice, StepBatch};
use orchard_worker::engine::{load_model, EngineHandle};
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

/// Alternates: engine TPOT of a 16-token prompt x 128 tokens, and runner.execute at ctx 80.
fn main() {
    let plen: usize = std::env::var("PLEN")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(128);
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let mut cfg = WorkerConfig::default();
    cfg.engine.enable_prefix_caching = false;
    if let Some(n) = std::env::var("BLOCKS").ok().and_then(|s| s.parse().ok()) {
        cfg.engine.num_kv_blocks = Some(n);
    }
    let (mut parts, _) = load_model(&cfg).unwrap();
    let (eparts, _) = load_model(&cfg).unwrap();
    let handle = EngineHandle::spawn(eparts).unwrap();
    let table: Vec<u32> = (0..(plen as u32 / 16 + 2)).rev().collect();
    let b = step(0, plen, &table);
    for r in 0..rounds {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let prompt: Vec<u32> = (0..plen)
            .map(|i| ((i + r * plen) * 7919 % 49000) as u32)
            .collect();
        handle
            .submit(EngineRequest {
                id: format!("r{r}"),
                prompt_token_ids: prompt,
                params: SamplingParams {
                    ignore_eos: true,
                    ..SamplingParams::greedy(1)
                },
                arrival: Instant::now(),
                events: tx,
            })
            .unwrap();
        let mut pre = 0.0;
        while let Some(ev) = rx.blocking_recv() {
            if let EngineEvent::Finished(f) = ev {
                pre = f.timings.prefill.as_secs_f64() * 1e3;
            }
        }
        let s = Instant::now();
        parts.runner.execute(&b).unwrap();
        let ex = s.elapsed().as_secs_f64() * 1e3;
        println!("engine prefill {pre:.2} ms   runner.execute {ex:.2} ms");
    }
}
