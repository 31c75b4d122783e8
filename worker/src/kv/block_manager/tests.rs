//! Behaviour tests ported from vLLM `tests/v1/core/test_prefix_caching.py` and
//! `test_kv_cache_utils.py`.

use super::*;
use anyhow::{ensure, Result};

const BS: u32 = 16;

fn manager(num_blocks: u32, block_size: u32) -> Result<BlockManager> {
    Ok(BlockManager::new(BlockManagerConfig {
        num_blocks,
        block_size,
        enable_prefix_caching: true,
    })?)
}

/// `n` distinct tokens starting at `start`.
fn tokens(start: u32, n: u32) -> Vec<u32> {
    (start..start + n).collect()
}

/// Runs a sequence's prefill: lookup, allocate for the whole prompt, register full blocks.
fn prefill(m: &mut BlockManager, seq: u64, prompt: &[u32]) -> Result<u32> {
    let cached = m.get_computed_blocks(seq, prompt, &[])?;
    m.allocate_slots(seq, prompt.len() as u32)?;
    m.cache_full_blocks(seq, prompt);
    Ok(cached)
}

fn ref_cnt(m: &BlockManager, id: u32) -> u32 {
    m.blocks[id as usize].ref_cnt
}

fn free_order(m: &BlockManager) -> Vec<u32> {
    m.free_queue.iter().collect()
}

#[test]
fn second_request_hits_shared_full_blocks() -> Result<()> {
    let mut m = manager(10, BS)?;
    // 3 full blocks + 3 tokens.
    let p1 = tokens(0, 3 * BS + 3);
    ensure!(prefill(&mut m, 1, &p1)? == 0);
    ensure!(m.block_table(1) == [0, 1, 2, 3]);

    let mut p2 = tokens(0, 3 * BS);
    p2.extend([900, 901, 902, 903, 904]);
    let cached = m.get_computed_blocks(2, &p2, &[])?;
    ensure!(cached == 3 * BS, "expected 48 cached tokens, got {cached}");
    ensure!(m.block_table(2) == [0, 1, 2]);
    for id in 0..3 {
        ensure!(ref_cnt(&m, id) == 2, "block {id} should be shared");
    }
    ensure!(ref_cnt(&m, 3) == 1, "partial block is private");
    m.allocate_slots(2, p2.len() as u32)?;
    ensure!(m.block_table(2) == [0, 1, 2, 4]);
    ensure!(m.num_used_blocks() == 5);

    let stats = m.prefix_cache_stats();
    ensure!(stats.requests == 2);
    ensure!(stats.queries == (p1.len() + p2.len()) as u64);
    ensure!(stats.hits == u64::from(3 * BS));
    Ok(())
}

#[test]
fn hit_on_free_block_takes_it_out_of_free_queue() -> Result<()> {
    let mut m = manager(6, BS)?;
    let p = tokens(0, 2 * BS + 1);
    prefill(&mut m, 1, &p)?;
    m.free(1);
    ensure!(m.num_free_blocks() == 6);
    ensure!(m.get_computed_blocks(2, &p, &[])? == 2 * BS);
    ensure!(m.num_free_blocks() == 4);
    ensure!(!free_order(&m).contains(&0) && !free_order(&m).contains(&1));
    ensure!(ref_cnt(&m, 0) == 1 && ref_cnt(&m, 1) == 1);
    Ok(())
}

#[test]
fn hits_capped_to_leave_one_prompt_token() -> Result<()> {
    let mut m = manager(10, BS)?;
    let p = tokens(0, 2 * BS); // exactly 2 full blocks
    prefill(&mut m, 1, &p)?;
    ensure!(
        m.get_computed_blocks(2, &p, &[])? == BS,
        "only 1 of 2 blocks may hit"
    );
    ensure!(m.block_table(2) == [0]);
    // A prompt one token longer can use both blocks.
    let mut longer = p.clone();
    longer.push(7);
    ensure!(m.get_computed_blocks(3, &longer, &[])? == 2 * BS);
    // A prompt shorter than one block never hits.
    ensure!(m.get_computed_blocks(4, &p[..1], &[])? == 0);
    Ok(())
}

#[test]
fn freed_sequence_is_evicted_tail_first_and_lru_across_sequences() -> Result<()> {
    let mut m = manager(6, 4)?;
    prefill(&mut m, 1, &tokens(0, 12))?; // blocks 0,1,2
    prefill(&mut m, 2, &tokens(100, 12))?; // blocks 3,4,5
    m.free(1);
    m.free(2);
    ensure!(
        free_order(&m) == vec![2, 1, 0, 5, 4, 3],
        "got {:?}",
        free_order(&m)
    );

    m.allocate_slots(3, 4 * 2)?;
    ensure!(
        m.block_table(3) == [2, 1],
        "tail of the older sequence goes first"
    );
    // Seq 1's prefix blocks 0 and 1 ... block 1 was reused, so only block 0 still hits.
    let mut p1 = tokens(0, 12);
    p1.push(99);
    ensure!(m.get_computed_blocks(4, &p1, &[])? == 4);
    ensure!(m.block_table(4) == [0]);
    Ok(())
}

#[test]
fn reused_block_loses_its_hash() -> Result<()> {
    let mut m = manager(2, 4)?;
    let p = tokens(0, 5);
    prefill(&mut m, 1, &p)?; // block 0 full+hashed, block 1 partial
    m.free(1);
    ensure!(m.cached.len() == 1);
    // Free order is [1, 0]; taking 2 blocks reuses the cached block 0 too.
    m.allocate_slots(2, 8)?;
    ensure!(m.cached.is_empty(), "reuse must evict from the hash map");
    ensure!(m.blocks[0].hash.is_none());
    m.free(2);
    ensure!(
        m.get_computed_blocks(3, &p, &[])? == 0,
        "evicted block must not hit"
    );
    Ok(())
}

#[test]
fn failed_allocation_changes_nothing() -> Result<()> {
    let mut m = manager(4, 4)?;
    let cached_prompt = tokens(0, 5);
    prefill(&mut m, 1, &cached_prompt)?; // blocks 0,1
    m.free(1); // 0 stays cached but free
    m.allocate_slots(2, 12)?; // free order was [1, 0, 2, 3]: takes 1, 0, 2
    let before_free = m.num_free_blocks();
    let before_table = m.block_table(2).to_vec();
    let before_cached = m.cached.len();

    let err = m.allocate_slots(3, 8);
    ensure!(
        err == Err(KvError::NoFreeBlocks { needed: 2, free: 1 }),
        "got {err:?}"
    );
    ensure!(m.block_table(3).is_empty());
    ensure!(
        !m.seqs.contains_key(&3),
        "failed allocation must not create a table"
    );
    let err = m.allocate_slots(2, 20);
    ensure!(matches!(err, Err(KvError::NoFreeBlocks { .. })));
    ensure!(m.num_free_blocks() == before_free);
    ensure!(m.block_table(2) == before_table.as_slice());
    ensure!(m.cached.len() == before_cached);
    Ok(())
}

#[test]
fn failed_allocation_does_not_evict_cached_free_blocks() -> Result<()> {
    let mut m = manager(3, 4)?;
    let p = tokens(0, 5);
    prefill(&mut m, 1, &p)?; // blocks 0 (cached), 1
    m.free(1);
    ensure!(m.allocate_slots(2, 16).is_err(), "4 blocks cannot fit in 3");
    ensure!(
        m.get_computed_blocks(3, &p, &[])? == 4,
        "cached block survived"
    );
    Ok(())
}

#[test]
fn free_returns_every_block_and_is_idempotent() -> Result<()> {
    let mut m = manager(8, BS)?;
    let p = tokens(0, 3 * BS + 1);
    prefill(&mut m, 1, &p)?;
    prefill(&mut m, 2, &p)?; // shares 3 blocks
    ensure!(m.num_used_blocks() == 5);
    m.free(1);
    ensure!(m.num_used_blocks() == 4, "shared blocks stay used by seq 2");
    ensure!(m.block_table(1).is_empty());
    m.free(2);
    m.free(2);
    m.free(42);
    ensure!(m.num_used_blocks() == 0);
    ensure!(m.num_free_blocks() == 8);
    ensure!(m.usage() == 0.0);
    ensure!(m.blocks.iter().all(|b| b.ref_cnt == 0));
    Ok(())
}

#[test]
fn usage_reports_fraction_in_use() -> Result<()> {
    let mut m = manager(4, 4)?;
    m.allocate_slots(1, 5)?;
    ensure!((m.usage() - 0.5).abs() < 1e-9);
    ensure!(m.block_size() == 4);
    Ok(())
}

#[test]
fn hash_chain_depends_on_parent() -> Result<()> {
    let mut m = manager(10, 4)?;
    let shared_block = [50, 51, 52, 53];
    let mut p1 = vec![1, 2, 3, 4];
    p1.extend(shared_block);
    p1.push(9);
    prefill(&mut m, 1, &p1)?;
    let mut p2 = vec![5, 6, 7, 8];
    p2.extend(shared_block);
    p2.push(9);
    ensure!(
        m.get_computed_blocks(2, &p2, &[])? == 0,
        "same block after a different prefix"
    );
    Ok(())
}

#[test]
fn extra_keys_separate_caches() -> Result<()> {
    let mut m = manager(10, 4)?;
    let p = tokens(0, 9);
    m.get_computed_blocks(1, &p, &[7])?;
    m.allocate_slots(1, 9)?;
    m.cache_full_blocks(1, &p);
    ensure!(
        m.get_computed_blocks(2, &p, &[])? == 0,
        "no extra key: miss"
    );
    ensure!(
        m.get_computed_blocks(3, &p, &[8])? == 0,
        "other extra key: miss"
    );
    ensure!(
        m.get_computed_blocks(4, &p, &[7])? == 8,
        "same extra key: hit"
    );
    Ok(())
}

#[test]
fn decode_tokens_fill_and_register_blocks() -> Result<()> {
    let mut m = manager(10, 4)?;
    let mut seq = tokens(0, 3);
    prefill(&mut m, 1, &seq)?;
    ensure!(m.cached.is_empty(), "partial block is not cached");
    for t in 3..9 {
        seq.push(t);
        m.allocate_slots(1, seq.len() as u32)?;
        m.cache_full_blocks(1, &seq);
    }
    ensure!(m.block_table(1).len() == 3);
    ensure!(m.cached.len() == 2);
    ensure!(m.seqs[&1].hashes.len() == 2);
    // A new prompt equal to the generated text hits both blocks.
    ensure!(m.get_computed_blocks(2, &seq, &[])? == 8);
    Ok(())
}

#[test]
fn duplicate_blocks_keep_first_registration() -> Result<()> {
    let mut m = manager(2, 4)?;
    let p = tokens(0, 4);
    // Both sequences start before either caches, so both compute block [0..4].
    m.get_computed_blocks(1, &p, &[])?;
    m.get_computed_blocks(2, &p, &[])?;
    m.allocate_slots(1, 4)?;
    m.allocate_slots(2, 4)?;
    m.cache_full_blocks(1, &p);
    m.cache_full_blocks(2, &p);
    ensure!(m.cached.len() == 1);
    ensure!(m.blocks[1].hash.is_none(), "duplicate stays private");
    m.free(2);
    m.free(1);
    ensure!(free_order(&m) == vec![1, 0]);
    // Reusing the private duplicate must not evict the registered copy.
    m.allocate_slots(3, 4)?;
    ensure!(m.block_table(3) == [1]);
    ensure!(m.cached.len() == 1);
    ensure!(m.get_computed_blocks(4, &tokens(0, 5), &[])? == 4);
    Ok(())
}

#[test]
fn disabled_prefix_caching_never_hits() -> Result<()> {
    let mut m = BlockManager::new(BlockManagerConfig {
        num_blocks: 10,
        block_size: 4,
        enable_prefix_caching: false,
    })?;
    let p = tokens(0, 9);
    prefill(&mut m, 1, &p)?;
    ensure!(m.cached.is_empty());
    ensure!(m.get_computed_blocks(2, &p, &[])? == 0);
    ensure!(m.prefix_cache_stats() == PrefixCacheStats::default());
    Ok(())
}

#[test]
fn reset_prefix_cache_requires_idle_pool() -> Result<()> {
    let mut m = manager(10, 4)?;
    let p = tokens(0, 9);
    prefill(&mut m, 1, &p)?;
    ensure!(m.reset_prefix_cache() == Err(KvError::BlocksInUse(3)));
    m.free(1);
    m.reset_prefix_cache()?;
    ensure!(m.get_computed_blocks(2, &p, &[])? == 0, "cache was cleared");
    Ok(())
}

#[test]
fn starting_a_sequence_twice_is_an_error() -> Result<()> {
    let mut m = manager(4, 4)?;
    m.get_computed_blocks(1, &tokens(0, 3), &[])?;
    ensure!(m.get_computed_blocks(1, &tokens(0, 3), &[]) == Err(KvError::SeqAlreadyExists(1)));
    Ok(())
}

#[test]
fn invalid_config_is_rejected() -> Result<()> {
    let bad = |num_blocks, block_size| {
        BlockManager::new(BlockManagerConfig {
            num_blocks,
            block_size,
            enable_prefix_caching: true,
        })
    };
    ensure!(matches!(bad(4, 0), Err(KvError::InvalidConfig(_))));
    ensure!(matches!(bad(0, 4), Err(KvError::InvalidConfig(_))));
    Ok(())
}
