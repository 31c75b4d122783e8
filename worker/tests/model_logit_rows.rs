//! The last layer runs its attention and MLP only for the rows whose logits a step returns.
//! These tests check that the rows it drops still leave their K and V in the store, and that
//! the kept rows' logits are the bits of a run that never drops a row: the same tokens fed one
//! per step, each step's only row wanting logits.

mod tiny_llama;

use anyhow::{ensure, Result};
use candle_core::quantized::GgmlDType;
use candle_core::Device;
use orchard_worker::engine::batch::{SeqSlice, StepBatch};
use orchard_worker::model::kv_store::KvCacheDType;
use orchard_worker::model::{gguf, KvStore, KvStoreConfig, Llama};
use tiny_llama::{one_sequence_step, random_weights, write_gguf_as};

const BLOCK: usize = 4;

fn store(model: &Llama) -> KvStore {
    let cfg = model.config();
    KvStore::new(KvStoreConfig {
        num_layers: cfg.num_layers,
        num_blocks: 16,
        block_size: BLOCK,
        kv_dim: cfg.kv_dim(),
        dtype: KvCacheDType::F32,
    })
}

/// A tiny random Llama with Q4_1 matrices (the CPU kernels' path).
fn model() -> Result<Llama> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("tiny-q4_1.gguf");
    write_gguf_as(&path, &random_weights()?, GgmlDType::Q4_1)?;
    Ok(gguf::load(&path, &Device::Cpu)?.model)
}

/// Logits of one step, one row per sequence that wants them.
fn logits(model: &Llama, batch: &StepBatch, kv: &mut KvStore) -> Result<Vec<Vec<f32>>> {
    Ok(model.forward(batch, kv)?.to_vec2::<f32>()?)
}

/// The logits after the last of `tokens`, fed one token per step into a fresh store (every
/// row of every step wants logits, so no step drops any).
fn one_token_steps(model: &Llama, table: &[u32], tokens: &[u32]) -> Result<Vec<f32>> {
    let mut kv = store(model);
    let mut last = Vec::new();
    for (pos, &id) in tokens.iter().enumerate() {
        last = logits(model, &one_sequence_step(&kv, table, &[id], pos)?, &mut kv)?.remove(0);
    }
    Ok(last)
}

/// Appends `feed` at positions `first..` of a sequence with block table `table` to `batch`.
fn push_seq(
    batch: &mut StepBatch,
    kv: &KvStore,
    table: &[u32],
    feed: &[u32],
    first: usize,
    needs_logits: bool,
) -> Result<()> {
    let start = batch.num_tokens();
    for (i, &id) in feed.iter().enumerate() {
        let pos = first + i;
        let slot = kv
            .slot_of(table, pos)
            .ok_or_else(|| anyhow::anyhow!("table too short"))?;
        batch.token_ids.push(id);
        batch.positions.push(pos as u32);
        batch.slot_mapping.push(slot as u32);
    }
    batch.seqs.push(SeqSlice {
        query_start: start as u32,
        query_len: feed.len() as u32,
        context_len: (first + feed.len()) as u32,
        block_table: table.to_vec(),
        needs_logits,
    });
    Ok(())
}

#[test]
fn a_prompt_chunk_without_logits_still_fills_its_cache_and_changes_no_logits() -> Result<()> {
    let model = model()?;
    let a: Vec<u32> = vec![3, 77, 12, 90, 41, 8, 115, 27, 60];
    let b: Vec<u32> = vec![5, 19, 64, 101, 33, 72];
    let (table_a, table_b) = (vec![9u32, 2, 14], vec![4u32, 11]);

    // One step: A's first five tokens (a chunk, no logits) and all of B (logits).
    let mut kv = store(&model);
    let mut mixed = StepBatch::default();
    push_seq(&mut mixed, &kv, &table_a, &a[..5], 0, false)?;
    push_seq(&mut mixed, &kv, &table_b, &b, 0, true)?;
    let rows = logits(&model, &mixed, &mut kv)?;
    ensure!(
        rows.len() == 1,
        "{} logit rows for one sequence",
        rows.len()
    );

    ensure!(
        rows[0] == one_token_steps(&model, &table_b, &b)?,
        "B's logits differ"
    );

    // A's second chunk reads the first chunk's K and V of every layer, the last included.
    let rest = one_sequence_step(&kv, &table_a, &a[5..], 5)?;
    let got_a = logits(&model, &rest, &mut kv)?;
    ensure!(
        got_a[0] == one_token_steps(&model, &table_a, &a)?,
        "A's logits differ"
    );
    Ok(())
}

#[test]
fn a_step_of_chunks_only_returns_no_logits_and_fills_the_cache() -> Result<()> {
    let model = model()?;
    let a: Vec<u32> = vec![14, 2, 99, 57, 31, 120, 6];
    let table = vec![7u32, 1];
    let mut kv = store(&model);
    let mut chunk = StepBatch::default();
    push_seq(&mut chunk, &kv, &table, &a[..4], 0, false)?;
    let none = model.forward(&chunk, &mut kv)?;
    ensure!(
        none.dims() == [0, model.config().vocab_size],
        "{:?}",
        none.dims()
    );
    let got = logits(
        &model,
        &one_sequence_step(&kv, &table, &a[4..], 4)?,
        &mut kv,
    )?;
    ensure!(
        got[0] == one_token_steps(&model, &table, &a)?,
        "logits after the chunk differ"
    );
    Ok(())
}
