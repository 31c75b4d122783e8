//! Drives load: closed loop (a fixed number of clients, each sending its next request when the
//! previous one ends) or open loop (Poisson arrivals at a mean rate, regardless of
//! completions), bounded by a request count or a duration.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use crate::client::{Client, RequestSpec};
use crate::error::{BenchError, RequestError};
use crate::metrics::{FailedRequest, RequestRecord, Summary};
use crate::progress::Progress;
use crate::prompt::PromptSource;
use crate::schedule::{poisson_arrivals, ArrivalLimit};

/// How requests arrive.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Arrival {
    /// `concurrency` clients in a closed loop.
    Closed {
        /// Simultaneous requests.
        concurrency: usize,
    },
    /// Open loop: Poisson arrivals with mean `rate` per second, seeded.
    Poisson {
        /// Mean requests per second.
        rate: f64,
        /// Generator seed, for replayable schedules.
        seed: u64,
    },
}

/// When to stop sending.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum StopCondition {
    /// After this many requests.
    Requests(usize),
    /// No new request after this long; requests in flight finish.
    Duration(Duration),
}

impl StopCondition {
    /// Whether request `index` may still start `elapsed` into the run.
    fn allows(&self, index: usize, elapsed: Duration) -> bool {
        match self {
            Self::Requests(n) => index < *n,
            Self::Duration(d) => elapsed < *d,
        }
    }
}

/// One load level.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Arrival process.
    pub arrival: Arrival,
    /// Stop condition.
    pub stop: StopCondition,
    /// Prompts.
    pub prompts: PromptSource,
    /// Output tokens per request.
    pub max_tokens: u32,
    /// Sampling temperature.
    pub temperature: f32,
    /// Generate exactly `max_tokens` (ignore EOS).
    pub ignore_eos: bool,
    /// Limit on one request; a slower one counts as a `timeout` error.
    pub request_timeout: Duration,
}

impl LoadSpec {
    /// Rejects specs that describe no load.
    pub fn validate(&self) -> Result<(), BenchError> {
        let bad = |m: &str| Err(BenchError::BadArgument(m.to_owned()));
        match self.arrival {
            Arrival::Closed { concurrency: 0 } => return bad("concurrency must be at least 1"),
            Arrival::Poisson { rate, .. } if !(rate.is_finite() && rate > 0.0) => {
                return bad("request rate must be > 0")
            }
            _ => {}
        }
        match self.stop {
            StopCondition::Requests(0) => return bad("request count must be at least 1"),
            StopCondition::Duration(d) if d.is_zero() => return bad("duration must be > 0"),
            _ => {}
        }
        if self.max_tokens == 0 {
            return bad("max tokens must be at least 1");
        }
        if let PromptSource::List(l) = &self.prompts {
            if l.is_empty() {
                return bad("no prompts");
            }
        }
        Ok(())
    }

    /// Number of requests when fixed by count.
    pub fn request_count(&self) -> Option<usize> {
        match self.stop {
            StopCondition::Requests(n) => Some(n),
            StopCondition::Duration(_) => None,
        }
    }
}

/// What one load level produced.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunResult {
    /// Successful requests, by index.
    pub records: Vec<RequestRecord>,
    /// Failed requests as `(index, kind, message)`.
    pub errors: Vec<FailedRequest>,
    /// First send to last completion, seconds.
    pub wall_s: f64,
}

impl RunResult {
    /// The level's summary.
    pub fn summary(&self) -> Summary {
        Summary::from_outcomes(&self.records, &self.errors, self.wall_s)
    }
}

type Outcome = (usize, Result<RequestRecord, RequestError>);

/// Runs one load level against `client`.
pub async fn run_load(
    client: &Client,
    spec: &LoadSpec,
    progress: &Progress,
) -> Result<RunResult, BenchError> {
    spec.validate()?;
    let spec = Arc::new(spec.clone());
    let start = Instant::now();
    let outcomes = match spec.arrival {
        Arrival::Closed { concurrency } => {
            closed_loop(client, &spec, concurrency, progress, start).await
        }
        Arrival::Poisson { rate, seed } => {
            let limit = match spec.stop {
                StopCondition::Requests(n) => ArrivalLimit::Count(n),
                StopCondition::Duration(d) => ArrivalLimit::Until(d),
            };
            let arrivals = poisson_arrivals(rate, seed, limit)?;
            open_loop(client, &spec, &arrivals, progress, start).await
        }
    };
    let wall_s = start.elapsed().as_secs_f64();
    Ok(collect(outcomes, wall_s))
}

async fn closed_loop(
    client: &Client,
    spec: &Arc<LoadSpec>,
    concurrency: usize,
    progress: &Progress,
    start: Instant,
) -> Vec<Outcome> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = JoinSet::new();
    for _ in 0..concurrency {
        let (client, spec, next, progress) =
            (client.clone(), spec.clone(), next.clone(), progress.clone());
        set.spawn(async move {
            let mut out = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                // One clock read both decides and stamps the request, so a request sent in a
                // duration window is recorded as starting inside it.
                let now = start.elapsed();
                if !spec.stop.allows(index, now) {
                    break;
                }
                out.push(one_request(&client, &spec, index, now).await);
                progress.inc();
            }
            out
        });
    }
    join_all(set).await
}

async fn open_loop(
    client: &Client,
    spec: &Arc<LoadSpec>,
    arrivals: &[Duration],
    progress: &Progress,
    start: Instant,
) -> Vec<Outcome> {
    let mut set = JoinSet::new();
    for (index, at) in arrivals.iter().enumerate() {
        tokio::time::sleep_until((start + *at).into()).await;
        let (client, spec, progress) = (client.clone(), spec.clone(), progress.clone());
        set.spawn(async move {
            let outcome = one_request(&client, &spec, index, start.elapsed()).await;
            progress.inc();
            vec![outcome]
        });
    }
    join_all(set).await
}

async fn join_all(mut set: JoinSet<Vec<Outcome>>) -> Vec<Outcome> {
    let mut all = Vec::new();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(outcomes) => all.extend(outcomes),
            Err(e) => all.push((
                usize::MAX,
                Err(RequestError::Protocol(format!("request task failed: {e}"))),
            )),
        }
    }
    all
}

/// Sends request `index` with the run's settings and stamps its position and its start time
/// (`sent`, since the run's start).
async fn one_request(client: &Client, spec: &LoadSpec, index: usize, sent: Duration) -> Outcome {
    let prompt = spec.prompts.prompt(index);
    let request = RequestSpec {
        prompt: prompt.text,
        approx_prompt_tokens: prompt.approx_tokens,
        max_tokens: spec.max_tokens,
        temperature: spec.temperature,
        ignore_eos: spec.ignore_eos,
    };
    let start_s = sent.as_secs_f64();
    let result = tokio::time::timeout(spec.request_timeout, client.generate(&request))
        .await
        .unwrap_or(Err(RequestError::Timeout(spec.request_timeout)))
        .map(|mut r| {
            r.index = index;
            r.start_s = start_s;
            r
        });
    (index, result)
}

fn collect(mut outcomes: Vec<Outcome>, wall_s: f64) -> RunResult {
    outcomes.sort_by_key(|(i, _)| *i);
    let mut result = RunResult {
        wall_s,
        ..RunResult::default()
    };
    for (index, outcome) in outcomes {
        match outcome {
            Ok(r) => result.records.push(r),
            Err(e) => result.errors.push(FailedRequest {
                index,
                kind: e.kind(),
                message: e.to_string(),
            }),
        }
    }
    result
}

/// Settings every level of a benchmark shares.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Sampling temperature (0 = greedy).
    pub temperature: f32,
    /// Generate exactly `max_tokens` per request.
    pub ignore_eos: bool,
    /// Limit on one request.
    pub request_timeout: Duration,
    /// Progress display.
    pub progress: crate::progress::ProgressMode,
    /// Base seed for prompts and arrivals.
    pub seed: u64,
}

impl Settings {
    /// A closed-loop spec with these settings.
    pub fn closed(
        &self,
        concurrency: usize,
        requests: usize,
        prompts: PromptSource,
        max_tokens: u32,
    ) -> LoadSpec {
        LoadSpec {
            arrival: Arrival::Closed { concurrency },
            stop: StopCondition::Requests(requests),
            prompts,
            max_tokens,
            temperature: self.temperature,
            ignore_eos: self.ignore_eos,
            request_timeout: self.request_timeout,
        }
    }
}

/// One row of a report: a load level, how it was produced and what it measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LevelResult {
    /// Row name ("S3 c=4", "c=8", "rate=2.0").
    pub label: String,
    /// Scenario id, for preset runs.
    pub scenario: Option<String>,
    /// Arrival process.
    pub arrival: Arrival,
    /// Requested prompt length, for synthetic prompts.
    pub prompt_tokens: Option<usize>,
    /// Output tokens per request.
    pub max_tokens: u32,
    /// The figures.
    pub summary: Summary,
    /// Every request.
    pub run: RunResult,
}

impl LevelResult {
    /// Runs `spec` as one labelled level with its own progress bar.
    pub async fn measure(
        client: &Client,
        spec: &LoadSpec,
        label: String,
        mode: crate::progress::ProgressMode,
    ) -> Result<Self, BenchError> {
        let progress = Progress::new(mode, spec.request_count().map(|n| n as u64), &label);
        let run = run_load(client, spec, &progress).await;
        progress.finish();
        let run = run?;
        let prompt_tokens = match &spec.prompts {
            PromptSource::Synthetic { tokens, .. } => Some(*tokens),
            PromptSource::SharedPrefix {
                prefix_tokens,
                suffix_tokens,
                ..
            } => Some(prefix_tokens + suffix_tokens),
            PromptSource::List(_) => None,
        };
        Ok(Self {
            label,
            scenario: None,
            arrival: spec.arrival,
            prompt_tokens,
            max_tokens: spec.max_tokens,
            summary: run.summary(),
            run,
        })
    }

    /// Concurrency of a closed-loop level.
    pub fn concurrency(&self) -> Option<usize> {
        match self.arrival {
            Arrival::Closed { concurrency } => Some(concurrency),
            Arrival::Poisson { .. } => None,
        }
    }
}
