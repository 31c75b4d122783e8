//! Request lifecycle on the default model through `EngineHandle`: finish reasons, stop strings,
//! logprobs, timings, validation, aborts and dropped streams, and freed blocks after each.

mod common;

use std::time::Duration;

use anyhow::{anyhow, Result};
use common::{collect, engine, greedy_fixed};
use orchard_common::{ErrorKind, FinishReason, SamplingParams};
use orchard_worker::engine::api::EngineEvent;

#[test]
fn max_tokens_finishes_with_length_and_measured_timings() -> Result<()> {
    let e = engine(|_| {})?;
    let prompt = e.chat("Tell me a long story about a dragon.")?;
    let o = e.run("len", prompt.clone(), greedy_fixed(5))?;
    assert_eq!(o.finished.reason, FinishReason::Length);
    assert_eq!(o.tokens.len(), 5);
    assert_eq!(o.chunks, 5, "one streamed chunk per token");
    let u = o.finished.usage;
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens),
        (prompt.len() as u32, 5)
    );
    let t = o.finished.timings;
    assert!(t.ttft > Duration::ZERO && t.prefill > Duration::ZERO);
    assert!(t.queue <= t.ttft && t.ttft <= t.e2e);
    assert!(t.mean_tpot > Duration::ZERO && t.mean_tpot <= t.e2e);
    e.wait_idle()
}

#[test]
fn eos_stop_token_and_stop_string_finish_with_stop() -> Result<()> {
    let e = engine(|_| {})?;
    let prompt = e.chat("Say hello in one short sentence.")?;
    let eos = *e
        .handle
        .info()
        .eos_token_ids
        .first()
        .ok_or(anyhow!("no eos"))?;
    let full = e.run("eos", prompt.clone(), SamplingParams::greedy(64))?;
    assert_eq!(full.finished.reason, FinishReason::Stop, "{full:?}");
    assert_eq!(full.finished.stop_reason, None);
    assert_eq!(full.tokens.last(), Some(&eos));
    assert!(
        full.tokens.len() > 3,
        "reply too short for the next checks: {full:?}"
    );

    // A stop token id: generation ends at its first occurrence and its text is the reason.
    let stop_tok = full.tokens[2];
    let cut = full.tokens.iter().position(|&t| t == stop_tok).unwrap_or(2);
    let params = SamplingParams {
        stop_token_ids: vec![stop_tok],
        ..SamplingParams::greedy(64)
    };
    let o = e.run("stop-id", prompt.clone(), params)?;
    assert_eq!(o.finished.reason, FinishReason::Stop);
    assert_eq!(o.tokens, full.tokens[..=cut]);
    assert!(o.finished.stop_reason.is_some());

    // A stop string from the middle of the reply: the text ends right before it.
    let word = full
        .text
        .split_whitespace()
        .nth(2)
        .ok_or(anyhow!("reply has < 3 words: {:?}", full.text))?
        .to_string();
    let params = SamplingParams {
        stop: vec![word.clone()],
        ..SamplingParams::greedy(64)
    };
    let o = e.run("stop-str", prompt.clone(), params)?;
    assert_eq!(o.finished.reason, FinishReason::Stop);
    assert_eq!(o.finished.stop_reason.as_deref(), Some(word.as_str()));
    let at = full
        .text
        .find(&word)
        .ok_or(anyhow!("stop word not in text"))?;
    assert_eq!(o.text, full.text[..at]);

    // min_tokens keeps EOS from ending the reply early.
    let params = SamplingParams {
        min_tokens: full.tokens.len() as u32 + 4,
        ..SamplingParams::greedy(full.tokens.len() as u32 + 8)
    };
    let o = e.run("min", prompt, params)?;
    assert!(o.tokens.len() >= full.tokens.len() + 4);
    assert!(!o.tokens[..full.tokens.len() + 3].contains(&eos));
    e.wait_idle()
}

#[test]
fn logprobs_come_with_each_token() -> Result<()> {
    let e = engine(|_| {})?;
    let params = SamplingParams {
        logprobs: Some(3),
        ..greedy_fixed(4)
    };
    let o = e.run("lp", e.chat("Name a color.")?, params)?;
    assert_eq!(o.logprobs.len(), 4);
    for (lp, &tok) in o.logprobs.iter().zip(&o.tokens) {
        assert_eq!(lp.top.len(), 3);
        assert_eq!(
            lp.top[0].token_id, tok,
            "greedy picks the most likely token"
        );
        assert!(lp.logprob <= 0.0 && (lp.logprob - lp.top[0].logprob).abs() < 1e-5);
        assert!(!lp.top[0].text.is_empty());
    }
    e.wait_idle()
}

#[test]
fn dropped_receiver_aborts_and_frees_blocks() -> Result<()> {
    let e = engine(|_| {})?;
    let mut rx = e.submit(
        "gone",
        e.chat("Count slowly from one to one hundred.")?,
        greedy_fixed(200),
    )?;
    match rx.blocking_recv() {
        Some(EngineEvent::Tokens(_)) => {}
        other => return Err(anyhow!("expected a token first, got {other:?}")),
    }
    // The gauges are published at the end of the step that sent the token.
    let deadline = std::time::Instant::now() + common::IDLE_CAP;
    while e.handle.load().kv_blocks_used == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "request never held blocks"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(rx);
    e.wait_idle()
}

#[test]
fn abort_by_id_finishes_with_abort() -> Result<()> {
    let e = engine(|_| {})?;
    let mut rx = e.submit(
        "ab",
        e.chat("Count from one to one hundred.")?,
        greedy_fixed(200),
    )?;
    match rx.blocking_recv() {
        Some(EngineEvent::Tokens(_)) => {}
        other => return Err(anyhow!("expected a token first, got {other:?}")),
    }
    e.handle.abort("ab");
    let o = collect(rx)?;
    assert_eq!(o.finished.reason, FinishReason::Abort);
    assert!(o.tokens.len() < 199);
    e.wait_idle()
}

#[test]
fn invalid_requests_are_refused_with_the_reason() -> Result<()> {
    let e = engine(|c| c.max_model_len = Some(64))?;
    let err = e.submit("empty", Vec::new(), greedy_fixed(4)).err();
    let err = err.ok_or(anyhow!("empty prompt accepted"))?;
    let err = err.downcast::<orchard_common::OrchardError>()?;
    assert_eq!(err.kind, ErrorKind::InvalidArgument);

    let err = e.submit("long", vec![1; 40], greedy_fixed(40)).err();
    let err = err.ok_or(anyhow!("over-long request accepted"))?;
    let err = err.downcast::<orchard_common::OrchardError>()?;
    assert_eq!(err.kind, ErrorKind::InvalidArgument);
    assert!(err.message.contains("max_model_len"), "{}", err.message);
    assert_eq!(e.handle.info().max_model_len, 64);
    e.wait_idle()
}
