use std::time::Instant;

use super::*;

const BS: u32 = 4;

fn scheduler(num_blocks: u32, max_seqs: u32, budget: u32) -> Scheduler {
    Scheduler::new(SchedulerConfig {
        max_num_seqs: max_seqs,
        max_num_batched_tokens: budget,
        blocks: BlockManagerConfig {
            num_blocks,
            block_size: BS,
            enable_prefix_caching: true,
        },
    })
    .expect("valid test config")
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| seed * 1000 + i).collect()
}

/// Plays the engine: appends one token to every sequence that got logits.
fn step(s: &mut Scheduler) -> SchedulerOutput {
    let out = s.schedule(Instant::now());
    s.on_step_done(&out);
    for seq in out.scheduled.iter().filter(|x| x.needs_logits) {
        s.append_token(seq.id, 7);
    }
    out
}

fn chunk_of(out: &SchedulerOutput, id: SeqId) -> Option<ScheduledSeq> {
    out.scheduled.iter().copied().find(|s| s.id == id)
}

#[test]
fn budget_is_respected_and_long_prompts_are_chunked() {
    let mut s = scheduler(64, 8, 10);
    s.add(Sequence::new(1, prompt(1, 25)));
    s.add(Sequence::new(2, prompt(2, 3)));
    let out = step(&mut s);
    assert_eq!(out.batch.num_tokens(), 10);
    assert_eq!(
        out.scheduled.len(),
        1,
        "the long prompt takes the whole budget"
    );
    assert!(
        !out.batch.seqs[0].needs_logits,
        "a mid-prompt chunk gets no logits"
    );
    assert_eq!(out.batch.positions, (0..10).collect::<Vec<u32>>());

    let out = step(&mut s);
    assert_eq!(out.batch.num_tokens(), 10);
    assert_eq!(
        out.batch.positions[0], 10,
        "the next chunk continues the prompt"
    );

    let out = step(&mut s);
    // 5 tokens finish seq 1's prompt, then seq 2's prompt (3 tokens) fits in the rest.
    assert_eq!(
        chunk_of(&out, 1).map(|c| (c.num_new_tokens, c.needs_logits)),
        Some((5, true))
    );
    assert_eq!(
        chunk_of(&out, 2).map(|c| (c.num_new_tokens, c.needs_logits)),
        Some((3, true))
    );
    assert_eq!(out.batch.seqs[1].query_start, 5);
    assert_eq!(out.batch.seqs[0].context_len, 25);

    let out = step(&mut s);
    assert_eq!(out.batch.num_tokens(), 2, "then one decode token each");
    assert!(out
        .batch
        .seqs
        .iter()
        .all(|q| q.needs_logits && q.query_len == 1));
    assert_eq!(out.batch.positions, vec![25, 3]);
}

#[test]
fn chunked_prefill_mixes_with_decodes_and_running_goes_first() {
    let mut s = scheduler(64, 8, 8);
    s.add(Sequence::new(1, prompt(1, 4)));
    step(&mut s);
    s.add(Sequence::new(2, prompt(2, 20)));
    let out = step(&mut s);
    assert_eq!(out.scheduled[0].id, 1, "running decode first");
    assert_eq!(out.scheduled[0].num_new_tokens, 1);
    assert_eq!(chunk_of(&out, 2).map(|c| c.num_new_tokens), Some(7));
    assert_eq!(out.batch.num_tokens(), 8);
}

#[test]
fn slot_mapping_follows_block_table() {
    let mut s = scheduler(16, 4, 64);
    s.add(Sequence::new(1, prompt(1, 6)));
    let out = step(&mut s);
    let table = &out.batch.seqs[0].block_table;
    assert_eq!(table.len(), 2);
    for (i, &slot) in out.batch.slot_mapping.iter().enumerate() {
        assert_eq!(slot, table[i / BS as usize] * BS + i as u32 % BS);
    }
}

#[test]
fn max_num_seqs_caps_running() {
    let mut s = scheduler(64, 2, 64);
    for id in 0..4 {
        s.add(Sequence::new(id, prompt(id as u32, 3)));
    }
    let out = step(&mut s);
    assert_eq!(out.scheduled.len(), 2);
    assert_eq!((s.num_running(), s.num_waiting()), (2, 2));
}

/// Three 8-token prompts fill a 6-block pool (2 blocks each) in the first step; each needs a
/// third block for its 9th token in the second step.
fn full_pool() -> Scheduler {
    let mut s = scheduler(6, 8, 64);
    for id in 1..=3 {
        s.add(Sequence::new(id, prompt(id as u32, 8)));
    }
    step(&mut s);
    s
}

#[test]
fn preemption_takes_the_newest_and_requeues_at_front() {
    let mut s = full_pool();
    s.add(Sequence::new(4, prompt(4, 3)));
    let out = step(&mut s);
    assert_eq!(out.preempted, vec![3], "newest running first");
    assert_eq!(s.num_preemptions(), 1);
    let ids: Vec<SeqId> = out.scheduled.iter().map(|q| q.id).collect();
    assert_eq!(
        ids,
        vec![1, 2],
        "no waiting sequence admitted in a step that preempted"
    );
    // Requeued at the front, ahead of the never-run sequence 4.
    let order: Vec<SeqId> = s.waiting.iter().map(|q| q.id).collect();
    assert_eq!(order, vec![3, 4]);
    let victim = s.get(3).expect("still known");
    assert_eq!(victim.tokens.len(), 9, "generated tokens are kept");
    assert_eq!(victim.num_computed, 0);
    assert_eq!(s.kv_blocks_used(), 6);
}

#[test]
fn preempted_sequence_is_recomputed_as_prefill() {
    let mut s = full_pool();
    step(&mut s); // preempts 3
    s.remove(1);
    let out = step(&mut s);
    let i = out
        .scheduled
        .iter()
        .position(|q| q.id == 3)
        .expect("victim is readmitted");
    // Prompt + generated token come back as one 9-token prefill that ends with logits.
    assert_eq!(
        (
            out.scheduled[i].num_new_tokens,
            out.scheduled[i].needs_logits
        ),
        (9, true)
    );
    let slice = &out.batch.seqs[i];
    assert_eq!(slice.context_len, 9);
    let start = slice.query_start as usize;
    assert_eq!(
        out.batch.positions[start..start + 9],
        (0..9).collect::<Vec<u32>>()[..]
    );
    assert_eq!(
        out.batch.token_ids[start + 8],
        7,
        "the generated token is recomputed too"
    );
}

#[test]
fn abort_frees_blocks_waiting_or_running() {
    let mut s = scheduler(16, 1, 64);
    s.add(Sequence::new(1, prompt(1, 9)));
    s.add(Sequence::new(2, prompt(2, 9)));
    step(&mut s);
    assert_eq!(s.kv_blocks_used(), 3);
    assert!(s.remove(2).is_some(), "abort while waiting");
    assert!(s.remove(1).is_some(), "abort while running");
    assert_eq!(s.kv_blocks_used(), 0);
    assert!(!s.has_work());
    assert!(s.remove(1).is_none(), "aborting twice is harmless");
}

#[test]
fn usage_returns_to_zero_after_mixed_workload() {
    let mut s = scheduler(12, 4, 6);
    for id in 0..6 {
        s.add(Sequence::new(id, prompt(id as u32 % 2, 5 + id as usize)));
    }
    for _ in 0..40 {
        let out = step(&mut s);
        for id in 0..6 {
            if s.get(id).is_some_and(|q| q.output().len() >= 3) {
                s.remove(id);
            }
        }
        if out.is_empty() && !s.has_work() {
            break;
        }
    }
    assert!(!s.has_work());
    assert_eq!(s.kv_blocks_used(), 0);
}

#[test]
fn prefix_cache_hit_on_first_schedule() {
    let mut s = scheduler(32, 4, 64);
    s.add(Sequence::new(1, prompt(1, 13)));
    step(&mut s);
    s.remove(1);
    s.add(Sequence::new(2, prompt(1, 13)));
    let out = step(&mut s);
    let c = chunk_of(&out, 2).expect("scheduled");
    assert_eq!(c.num_new_tokens, 1, "12 of 13 tokens served from the cache");
    assert_eq!(s.get(2).map(|q| q.cached_tokens), Some(12));
    assert_eq!(out.batch.positions, vec![12]);
}
