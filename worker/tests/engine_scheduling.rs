//! Continuous batching on the default model: batching, chunked prefill, preemption and prefix
//! caching must not change greedy tokens, and every block must come back afterwards.

mod common;

use anyhow::Result;
use common::{collect, engine, greedy_fixed, TestEngine, PROMPTS};

const GEN: u32 = 16;

/// Each prompt run on its own, one after another.
fn solo_runs(e: &TestEngine, prompts: &[Vec<u32>]) -> Result<Vec<Vec<u32>>> {
    let mut out = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        out.push(
            e.run(&format!("solo-{i}"), p.clone(), greedy_fixed(GEN))?
                .tokens,
        );
    }
    e.wait_idle()?;
    Ok(out)
}

/// All prompts submitted at once; returns tokens in prompt order.
fn batched_runs(e: &TestEngine, prompts: &[Vec<u32>]) -> Result<Vec<Vec<u32>>> {
    let streams = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| e.submit(&format!("batch-{i}"), p.clone(), greedy_fixed(GEN)))
        .collect::<Result<Vec<_>>>()?;
    let mut out = Vec::new();
    for rx in streams {
        let o = collect(rx)?;
        assert_eq!(o.finished.usage.completion_tokens, GEN);
        out.push(o.tokens);
    }
    e.wait_idle()?;
    Ok(out)
}

#[test]
fn batched_chunked_prefill_gives_the_same_tokens_as_solo_runs() -> Result<()> {
    let solo = engine(|c| c.enable_prefix_caching = false)?;
    let prompts = PROMPTS
        .iter()
        .map(|p| solo.chat(p))
        .collect::<Result<Vec<_>>>()?;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let expected = solo_runs(&solo, &prompts)?;
    drop(solo);

    // A budget below the longest prompt forces chunked prefill next to other sequences' decodes.
    let batched = engine(|c| {
        c.enable_prefix_caching = false;
        c.max_num_batched_tokens = 24;
        c.max_num_seqs = 8;
    })?;
    assert!(
        longest > 24,
        "the longest prompt ({longest}) must need chunking"
    );
    let got = batched_runs(&batched, &prompts)?;
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(g, e, "prompt {i} differs when batched");
    }
    Ok(())
}

#[test]
fn preemption_by_recompute_gives_the_same_tokens() -> Result<()> {
    let solo = engine(|c| c.enable_prefix_caching = false)?;
    let prompts = PROMPTS[2..6]
        .iter()
        .map(|p| solo.chat(p))
        .collect::<Result<Vec<_>>>()?;
    let expected = solo_runs(&solo, &prompts)?;
    drop(solo);

    // Room for every prompt alone but not for all four growing together.
    let tight = engine(|c| {
        c.num_kv_blocks = Some(10);
        c.enable_prefix_caching = false;
    })?;
    let got = batched_runs(&tight, &prompts)?;
    let load = tight.handle.load();
    assert!(load.preemptions > 0, "no sequence was preempted: {load:?}");
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(g, e, "prompt {i} differs after preemption");
    }
    Ok(())
}

#[test]
fn prefix_cache_hits_give_the_same_tokens_as_uncached_runs() -> Result<()> {
    let system = "You are Orchard, a careful assistant. Answer in one short paragraph, avoid \
                  lists, never invent facts, and mention when you are unsure. The user is a \
                  gardener who grows apples, pears and plums in a cold northern climate.";
    let question = |q: &str| format!("{system}\n\n{q}");
    let uncached = engine(|c| c.enable_prefix_caching = false)?;
    let first = uncached.chat(&question("When should I prune my apple trees?"))?;
    let second = uncached.chat(&question("How do I protect pears from frost?"))?;
    let expected = solo_runs(&uncached, &[first.clone(), second.clone()])?;
    drop(uncached);

    let cached = engine(|c| c.enable_prefix_caching = true)?;
    let a = cached.run("a", first.clone(), greedy_fixed(GEN))?;
    assert_eq!(a.finished.usage.cached_tokens, 0, "cold cache");
    let again = cached.run("again", first, greedy_fixed(GEN))?;
    let b = cached.run("b", second, greedy_fixed(GEN))?;
    assert!(again.finished.usage.cached_tokens > 0);
    assert!(
        b.finished.usage.cached_tokens >= 32,
        "shared system prompt was not reused"
    );
    assert_eq!(a.tokens, expected[0]);
    assert_eq!(again.tokens, expected[0]);
    assert_eq!(b.tokens, expected[1]);
    let load = cached.handle.load();
    assert!(load.prefix_cache_hits > 0 && load.prefix_cache_queries >= load.prefix_cache_hits);
    cached.wait_idle()
}
