use orchard_worker::engine::batch::{SeqSlice, StepBatch};
use orchard_worker::model::attention::{paged_attention_into, HeadLayout};
use orchard_worker::model::kv_store::KvCacheDType;
use orchard_worker::model::{KvStore, KvStoreConfig};
use std::time::Instant;

/// Prefill attention of `len` tokens (arg 1), one layer, 9 heads / 3 KV heads / d 64.
fn main() {
    let len: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(512);
    let rounds: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let heads = HeadLayout {
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
    };
    let nblk = len.div_ceil(16) + 1;
    let table: Vec<u32> = (0..nblk as u32).collect();
    let mut kv = KvStore::new(KvStoreConfig {
        num_layers: 1,
        num_blocks: nblk,
        block_size: 16,
        kv_dim: 192,
        dtype: KvCacheDType::F32,
    });
    let mut s = 1u64;
    let mut rnd = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    for p in 0..len {
        let k: Vec<f32> = (0..192).map(|_| rnd()).collect();
        let v: Vec<f32> = (0..192).map(|_| rnd()).collect();
        kv.write(0, p, &k, &v);
    }
    let q: Vec<f32> = (0..len * 576).map(|_| rnd()).collect();
    let mut b = StepBatch::default();
    b.seqs.push(SeqSlice {
        query_start: 0,
        query_len: len as u32,
        context_len: len as u32,
        block_table: table,
        needs_logits: true,
    });
    for p in 0..len {
        b.token_ids.push(0);
        b.positions.push(p as u32);
        b.slot_mapping.push(p as u32);
    }
    let mut out = vec![0f32; q.len()];
    let fmas: f64 = (0..len).map(|t| (t + 1) as f64).sum::<f64>() * 9.0 * 64.0 * 2.0;
    for _ in 0..rounds {
        let n = 10;
        let st = Instant::now();
        for _ in 0..n {
            paged_attention_into(&q, &b, &kv, 0, heads, &mut out);
        }
        let t = st.elapsed().as_secs_f64() / n as f64;
        println!("{:.3} ms  ({:.1} GFMA/s f32)", t * 1e3, fmas / t / 1e9);
    }
}
