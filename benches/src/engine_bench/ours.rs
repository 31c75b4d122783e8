//! Drives Orchard's engine through its public API, the way `orchard-worker generate` does:
//! `load_model` + `EngineHandle::spawn`, greedy requests with `ignore_eos` submitted on the
//! handle, each request's events read to its `Finished` (whose timings the engine measured).
//! Token arrival times are also stamped here, on the receiving side, for the aggregate decode
//! rate of concurrent sequences.

use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use orchard_common::config::WorkerConfig;
use orchard_common::SamplingParams;
use orchard_worker::engine::api::{EngineEvent, EngineRequest, Finished};
use orchard_worker::engine::{load_model, EngineHandle};
use orchard_worker::text::frontend::TextFrontend;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::report::{
    AggregateMeasure, Counts, DecodeMeasure, OrchardResults, PrefillMeasure, ScenarioMeasure, Stat,
};
use super::workload::{PromptMaker, Shape};
use super::{EngineBenchConfig, EngineBenchError};

/// A running engine on the benchmark's model.
pub struct Engine {
    handle: EngineHandle,
    frontend: TextFrontend,
    next_id: u64,
}

/// One request: its prompt and fixed output length.
struct Request {
    prompt: Vec<u32>,
    output_tokens: u32,
}

/// What one request produced.
struct Outcome {
    finished: Finished,
    submitted: Instant,
    /// When each chunk of tokens arrived, and how many tokens it held.
    token_times: Vec<(Instant, usize)>,
}

impl Engine {
    /// Loads the model named by `cfg` and starts the engine thread.
    pub fn load(cfg: &WorkerConfig) -> Result<Self, EngineBenchError> {
        let (parts, frontend) = load_model(cfg)?;
        Ok(Self {
            handle: EngineHandle::spawn(parts)?,
            frontend,
            next_id: 0,
        })
    }

    /// The model's tokenizer and chat template.
    pub fn frontend(&self) -> &TextFrontend {
        &self.frontend
    }

    /// Submits every request at once and waits for all of them.
    fn run(&mut self, requests: Vec<Request>) -> Result<Vec<Outcome>, EngineBenchError> {
        let mut streams = Vec::with_capacity(requests.len());
        for request in requests {
            let (tx, rx) = unbounded_channel();
            let submitted = Instant::now();
            // Dropping the receivers of earlier requests (on an error here) aborts them.
            self.handle.submit(EngineRequest {
                id: format!("engine-bench-{}", self.next_id),
                prompt_token_ids: request.prompt,
                params: SamplingParams {
                    ignore_eos: true,
                    ..SamplingParams::greedy(request.output_tokens)
                },
                arrival: submitted,
                events: tx,
            })?;
            self.next_id += 1;
            streams.push(collect(submitted, rx));
        }
        futures::executor::block_on(futures::future::join_all(streams))
            .into_iter()
            .collect()
    }

    /// Runs one request of `shape` on a fresh prompt.
    fn run_one(
        &mut self,
        prompts: &mut PromptMaker,
        shape: Shape,
    ) -> Result<Outcome, EngineBenchError> {
        let request = Request {
            prompt: prompts.next(shape.prompt_tokens)?,
            output_tokens: shape.output_tokens,
        };
        self.run(vec![request])?
            .pop()
            .ok_or(EngineBenchError::EngineStopped)
    }
}

/// Reads one request's events to its end, stamping token arrivals.
async fn collect(
    submitted: Instant,
    mut rx: UnboundedReceiver<EngineEvent>,
) -> Result<Outcome, EngineBenchError> {
    let mut token_times = Vec::new();
    while let Some(event) = rx.recv().await {
        match event {
            EngineEvent::Tokens(chunk) => token_times.push((Instant::now(), chunk.token_ids.len())),
            EngineEvent::Finished(finished) => {
                return Ok(Outcome {
                    finished,
                    submitted,
                    token_times,
                })
            }
            EngineEvent::Failed(e) => return Err(e.into()),
        }
    }
    Err(EngineBenchError::EngineStopped)
}

/// Every measurement on Orchard's engine: warm-up, prefill, single-stream decode, aggregate
/// decode, the seed scenarios.
pub fn measure(
    engine: &mut Engine,
    prompts: &mut PromptMaker,
    config: &EngineBenchConfig,
    progress: &ProgressBar,
) -> Result<OrchardResults, EngineBenchError> {
    let sizes = &config.sizes;
    let repeat = config.repeat as usize;
    progress.set_message("orchard: warm-up");
    for _ in 0..config.warmup {
        engine.run_one(prompts, sizes.decode)?;
        progress.inc(1);
    }
    let mut prefill = Vec::new();
    for &tokens in &sizes.prefill_prompts {
        progress.set_message(format!("orchard: prefill {tokens} tokens"));
        prefill.push(measure_prefill(engine, prompts, tokens, repeat, progress)?);
    }
    progress.set_message("orchard: single-stream decode");
    let decode = measure_decode(engine, prompts, sizes.decode, repeat, progress)?;
    let mut aggregate = Vec::new();
    for &concurrency in &sizes.concurrency {
        progress.set_message(format!("orchard: {concurrency} concurrent sequences"));
        let level = Level {
            concurrency,
            shape: sizes.aggregate,
            repeat,
        };
        aggregate.push(measure_aggregate(engine, prompts, level, progress)?);
    }
    let mut scenarios = Vec::new();
    for scenario in &sizes.scenarios {
        progress.set_message(format!("orchard: scenario {}", scenario.id));
        let runs = repeat_runs(engine, prompts, scenario.shape, repeat, progress)?;
        scenarios.push(scenario_measure(&scenario.id, scenario.shape, &runs)?);
    }
    Ok(OrchardResults {
        prefill,
        decode,
        aggregate,
        scenarios,
    })
}

/// `repeat` single requests of `shape`, each on a fresh prompt.
fn repeat_runs(
    engine: &mut Engine,
    prompts: &mut PromptMaker,
    shape: Shape,
    repeat: usize,
    progress: &ProgressBar,
) -> Result<Vec<Outcome>, EngineBenchError> {
    (0..repeat)
        .map(|_| {
            let outcome = engine.run_one(prompts, shape);
            progress.inc(1);
            outcome
        })
        .collect()
}

/// Prompt tokens / the engine's prefill time, for a request that generates one token.
fn measure_prefill(
    engine: &mut Engine,
    prompts: &mut PromptMaker,
    tokens: usize,
    repeat: usize,
    progress: &ProgressBar,
) -> Result<PrefillMeasure, EngineBenchError> {
    let shape = Shape {
        prompt_tokens: tokens,
        output_tokens: 1,
    };
    let runs = repeat_runs(engine, prompts, shape, repeat, progress)?;
    let rates = runs
        .iter()
        .map(|o| rate(tokens as f64, o.finished.timings.prefill, "prefill tok/s"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(PrefillMeasure {
        prompt_tokens: tokens,
        tok_s: Stat::of(&rates),
        counts: Counts::of(&runs.iter().map(|o| &o.finished).collect::<Vec<_>>()),
    })
}

/// 1 / the engine's mean time per output token (the tokens after the first).
fn measure_decode(
    engine: &mut Engine,
    prompts: &mut PromptMaker,
    shape: Shape,
    repeat: usize,
    progress: &ProgressBar,
) -> Result<DecodeMeasure, EngineBenchError> {
    let runs = repeat_runs(engine, prompts, shape, repeat, progress)?;
    let rates = runs
        .iter()
        .map(|o| rate(1.0, o.finished.timings.mean_tpot, "decode tok/s"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(DecodeMeasure {
        shape,
        tok_s: Stat::of(&rates),
        counts: Counts::of(&runs.iter().map(|o| &o.finished).collect::<Vec<_>>()),
    })
}

/// One concurrency level of the aggregate decode measurement.
struct Level {
    concurrency: usize,
    shape: Shape,
    repeat: usize,
}

fn measure_aggregate(
    engine: &mut Engine,
    prompts: &mut PromptMaker,
    level: Level,
    progress: &ProgressBar,
) -> Result<AggregateMeasure, EngineBenchError> {
    let (mut decode, mut e2e, mut finished) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..level.repeat {
        let requests = (0..level.concurrency)
            .map(|_| {
                Ok(Request {
                    prompt: prompts.next(level.shape.prompt_tokens)?,
                    output_tokens: level.shape.output_tokens,
                })
            })
            .collect::<Result<Vec<_>, EngineBenchError>>()?;
        let outcomes = engine.run(requests)?;
        let (d, e) = aggregate_rates(&outcomes)?;
        decode.push(d);
        e2e.push(e);
        finished.extend(outcomes.into_iter().map(|o| o.finished));
        progress.inc(1);
    }
    Ok(AggregateMeasure {
        concurrency: level.concurrency,
        shape: level.shape,
        decode_tok_s: Stat::of(&decode),
        e2e_tok_s: Stat::of(&e2e),
        counts: Counts::of(&finished.iter().collect::<Vec<_>>()),
    })
}

/// (decode-phase tok/s, end-to-end output tok/s) of sequences run together.
///
/// The decode phase starts at `s0`, when the last sequence to start received its first token
/// (from then on every sequence decodes), and ends with the last token. The engine sends a
/// step's tokens in one burst at the step's end, so arrival instants cluster per step; the
/// tokens counted are those that arrived after the midpoint between `s0` and that sequence's
/// second token - a quiet instant between two bursts - i.e. exactly the tokens of the steps
/// that ran after `s0`, whatever order the burst at `s0` was read in.
fn aggregate_rates(outcomes: &[Outcome]) -> Result<(f64, f64), EngineBenchError> {
    let none = || EngineBenchError::Degenerate("aggregate decode (a sequence had < 2 tokens)");
    let times = |o: &Outcome| o.token_times.iter().map(|&(t, _)| t).collect::<Vec<_>>();
    let last_started = outcomes
        .iter()
        .map(times)
        .max_by_key(|t| t.first().copied())
        .ok_or_else(none)?;
    let (s0, s1) = match last_started[..] {
        [s0, s1, ..] => (s0, s1),
        _ => return Err(none()),
    };
    let cut = s0 + (s1 - s0) / 2;
    let arrivals = || outcomes.iter().flat_map(|o| &o.token_times);
    let end = arrivals().map(|&(t, _)| t).max().ok_or_else(none)?;
    let submitted = outcomes
        .iter()
        .map(|o| o.submitted)
        .min()
        .ok_or_else(none)?;
    let decoded: usize = arrivals().filter(|&&(t, _)| t > cut).map(|&(_, n)| n).sum();
    let total: usize = arrivals().map(|&(_, n)| n).sum();
    let decode = rate(decoded as f64, end - s0, "aggregate decode tok/s")?;
    let e2e = rate(total as f64, end - submitted, "aggregate end-to-end tok/s")?;
    Ok((decode, e2e))
}

fn scenario_measure(
    id: &str,
    shape: Shape,
    runs: &[Outcome],
) -> Result<ScenarioMeasure, EngineBenchError> {
    let ms = |f: fn(&Outcome) -> Duration| {
        Stat::of(
            &runs
                .iter()
                .map(|o| f(o).as_secs_f64() * 1e3)
                .collect::<Vec<_>>(),
        )
    };
    let rates = |what, f: &dyn Fn(&Outcome) -> (f64, Duration)| {
        runs.iter()
            .map(|o| {
                let (n, d) = f(o);
                rate(n, d, what)
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|r| Stat::of(&r))
    };
    Ok(ScenarioMeasure {
        id: id.to_owned(),
        shape,
        ttft_ms: ms(|o| o.finished.timings.ttft),
        e2e_ms: ms(|o| o.finished.timings.e2e),
        decode_tok_s: rates("scenario decode tok/s", &|o| {
            (1.0, o.finished.timings.mean_tpot)
        })?,
        prefill_tok_s: rates("scenario prefill tok/s", &|o| {
            (shape.prompt_tokens as f64, o.finished.timings.prefill)
        })?,
        counts: Counts::of(&runs.iter().map(|o| &o.finished).collect::<Vec<_>>()),
    })
}

/// `count / elapsed` per second; an empty duration or count is an error, never infinity.
pub(crate) fn rate(
    count: f64,
    elapsed: Duration,
    what: &'static str,
) -> Result<f64, EngineBenchError> {
    let secs = elapsed.as_secs_f64();
    match secs > 0.0 && count > 0.0 {
        true => Ok(count / secs),
        false => Err(EngineBenchError::Degenerate(what)),
    }
}

#[cfg(test)]
mod tests {
    use orchard_common::{FinishReason, RequestTimings, Usage};

    use super::*;

    fn outcome(submitted: Instant, arrivals_ms: &[f64]) -> Outcome {
        let at = |ms: f64| submitted + Duration::from_secs_f64(ms / 1e3);
        Outcome {
            finished: Finished {
                reason: FinishReason::Length,
                stop_reason: None,
                usage: Usage::default(),
                timings: RequestTimings::default(),
            },
            submitted,
            token_times: arrivals_ms.iter().map(|&ms| (at(ms), 1)).collect(),
        }
    }

    #[test]
    fn aggregate_decode_counts_the_steps_after_every_sequence_started(
    ) -> Result<(), EngineBenchError> {
        let t = Instant::now();
        // Steps end every 10 ms; B joins at the step ending at 20 ms, whose burst is read
        // B first, then A (A's token arrives after B's first token but belongs to that step).
        let a = outcome(t, &[10.0, 20.2, 30.0, 40.0]);
        let b = outcome(t, &[20.1, 30.1, 40.1]);
        let (decode, e2e) = aggregate_rates(&[a, b])?;
        // Steps at 30 and 40 ms: 4 tokens over 40.1 - 20.1 = 20 ms.
        assert!((decode - 200.0).abs() < 1e-6, "{decode}");
        // 7 tokens from submission to 40.1 ms.
        assert!((e2e - 7.0 / 0.0401).abs() < 1e-6, "{e2e}");
        Ok(())
    }

    #[test]
    fn a_sequence_with_one_token_has_no_decode_phase() {
        let t = Instant::now();
        let only_first = [outcome(t, &[10.0, 20.0]), outcome(t, &[15.0])];
        assert!(matches!(
            aggregate_rates(&only_first),
            Err(EngineBenchError::Degenerate(_))
        ));
    }
}
