//! The engine loop, on its own OS thread: take requests off the channel, schedule a step, run
//! the model, sample, check stop conditions, detokenize and stream events to each request.
//!
//! The loop blocks on the request channel only while it has nothing to do, so an idle worker
//! costs nothing and a busy one never waits for new requests between steps.

use std::collections::HashMap;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use orchard_common::{FinishReason, OrchardError, RequestTimings, Usage};
use tokenizers::Tokenizer;

use super::api::{EngineEvent, EngineRequest, Finished, LoadSnapshot};
use super::handle::Shared;
use super::request::{RequestState, TokenOutcome};
use super::runner::ModelRunner;
use super::scheduler::{Scheduler, SchedulerOutput};
use super::sequence::{SeqId, Sequence};
use super::EngineParts;

/// How long an engine with work but nothing schedulable waits for a command before retrying.
const STALL_WAIT: Duration = Duration::from_millis(5);

/// Messages from handles to the engine thread.
#[derive(Debug)]
pub(crate) enum Command {
    Submit(EngineRequest),
    Abort(String),
}

/// Whether the command channel can still deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Channel {
    Open,
    /// Every handle is gone: finish the requests in flight, then stop.
    Closed,
}

/// Everything the engine thread owns.
pub(crate) struct EngineCore {
    scheduler: Scheduler,
    runner: Box<dyn ModelRunner>,
    tokenizer: Arc<Tokenizer>,
    eos_token_ids: Vec<u32>,
    max_model_len: usize,
    /// Streaming state of every live request, by sequence id.
    requests: HashMap<SeqId, RequestState>,
    /// Client request id -> sequence id, for aborts by id.
    ids: HashMap<String, SeqId>,
    next_id: SeqId,
    commands: mpsc::Receiver<Command>,
    channel: Channel,
    shared: Arc<Shared>,
    num_kv_blocks: u32,
}

impl EngineCore {
    pub(crate) fn new(
        parts: EngineParts,
        scheduler: Scheduler,
        commands: mpsc::Receiver<Command>,
        shared: Arc<Shared>,
    ) -> Self {
        Self {
            scheduler,
            runner: parts.runner,
            tokenizer: parts.tokenizer,
            eos_token_ids: parts.eos_token_ids,
            max_model_len: parts.max_model_len as usize,
            requests: HashMap::new(),
            ids: HashMap::new(),
            next_id: 0,
            commands,
            channel: Channel::Open,
            shared,
            num_kv_blocks: parts.num_kv_blocks,
        }
    }

    /// Runs until every handle is dropped and no request is left.
    pub(crate) fn run(mut self) {
        loop {
            if self.receive_commands() == Channel::Closed && !self.scheduler.has_work() {
                break;
            }
            self.drop_closed_streams();
            self.step();
            self.publish_gauges();
        }
        tracing::debug!("engine thread stopped");
    }

    /// Blocks for a command when idle, then drains whatever else is queued.
    fn receive_commands(&mut self) -> Channel {
        if self.channel == Channel::Open && !self.scheduler.has_work() {
            self.publish_gauges();
            match self.commands.recv() {
                Ok(cmd) => self.handle_command(cmd),
                Err(_) => self.channel = Channel::Closed,
            }
        }
        while self.channel == Channel::Open {
            match self.commands.try_recv() {
                Ok(cmd) => self.handle_command(cmd),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => self.channel = Channel::Closed,
            }
        }
        self.channel
    }

    fn handle_command(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(req) => {
                self.shared.received();
                self.admit(req);
            }
            Command::Abort(id) => {
                if let Some(&seq_id) = self.ids.get(&id) {
                    self.finish(seq_id, FinishReason::Abort, None);
                }
            }
        }
    }

    fn admit(&mut self, req: EngineRequest) {
        if req.events.is_closed() {
            return;
        }
        if self.ids.contains_key(&req.id) {
            let err = OrchardError::invalid(format!("request id `{}` is already running", req.id));
            let _ = req.events.send(EngineEvent::Failed(err));
            return;
        }
        let seq_id = self.next_id;
        self.next_id += 1;
        let state = RequestState::new(&req);
        self.scheduler
            .add(Sequence::new(seq_id, req.prompt_token_ids));
        self.ids.insert(req.id, seq_id);
        self.requests.insert(seq_id, state);
    }

    /// A dropped receiver means the client is gone: abort silently and free the blocks.
    fn drop_closed_streams(&mut self) {
        let gone: Vec<SeqId> = self
            .requests
            .iter()
            .filter(|(_, r)| r.events.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.remove(id);
        }
    }

    fn step(&mut self) {
        let out = self.scheduler.schedule(Instant::now());
        if out.is_empty() {
            if self.scheduler.has_work() {
                self.wait_for_command();
            }
            return;
        }
        let result = self.runner.execute(&out.batch);
        let expected = out.batch.num_logit_rows();
        match result {
            Ok(rows) if rows.len() == expected => {
                self.scheduler.on_step_done(&out);
                self.process_rows(&out, rows);
            }
            Ok(rows) => self.fail_step(
                &out,
                &format!(
                    "model returned {} logit rows, expected {expected}",
                    rows.len()
                ),
            ),
            Err(e) => self.fail_step(&out, &e.to_string()),
        }
    }

    /// Nothing fits right now (should not happen once requests are validated): wait briefly
    /// for an abort or a new request instead of spinning.
    fn wait_for_command(&mut self) {
        if self.channel == Channel::Closed {
            std::thread::sleep(STALL_WAIT);
            return;
        }
        match self.commands.recv_timeout(STALL_WAIT) {
            Ok(cmd) => self.handle_command(cmd),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => self.channel = Channel::Closed,
        }
    }

    /// A runner error fails the requests of the step; the engine keeps serving the others.
    fn fail_step(&mut self, out: &SchedulerOutput, message: &str) {
        tracing::error!(error = message, "engine step failed");
        for s in &out.scheduled {
            self.fail(
                s.id,
                OrchardError::internal(format!("engine step failed: {message}")),
            );
        }
    }

    fn fail(&mut self, id: SeqId, err: OrchardError) {
        if let Some(state) = self.remove(id) {
            let _ = state.events.send(EngineEvent::Failed(err));
        }
    }

    fn process_rows(&mut self, out: &SchedulerOutput, rows: Vec<Vec<f32>>) {
        let now = Instant::now();
        let sampled = out.scheduled.iter().filter(|s| s.needs_logits);
        for (s, row) in sampled.zip(rows) {
            self.process_token(s.id, row, now);
        }
    }

    /// Samples one token for a sequence, applies stop conditions and streams the result.
    fn process_token(&mut self, id: SeqId, mut row: Vec<f32>, now: Instant) {
        let (Some(state), Some(seq)) = (self.requests.get_mut(&id), self.scheduler.get(id)) else {
            return;
        };
        state.mask_before_min_tokens(&mut row, seq.output().len(), &self.eos_token_ids);
        let sampled = match state.sampler.sample(&mut row, seq.prompt(), seq.output()) {
            Ok(s) => s,
            Err(e) => return self.fail(id, OrchardError::internal(format!("sampling: {e}"))),
        };
        let total_len = seq.tokens.len() + 1;
        let output_len = seq.output().len() + 1;
        self.scheduler.append_token(id, sampled.token_id);
        let ctx = super::request::TokenContext {
            tokenizer: &self.tokenizer,
            eos_token_ids: &self.eos_token_ids,
            output_len,
            at_max_model_len: total_len >= self.max_model_len,
            now,
        };
        let outcome = match state.on_token(&sampled, &ctx) {
            Ok(o) => o,
            Err(e) => return self.fail(id, OrchardError::internal(e.to_string())),
        };
        self.emit(id, outcome);
    }

    fn emit(&mut self, id: SeqId, outcome: TokenOutcome) {
        let Some(state) = self.requests.get(&id) else {
            return;
        };
        if state
            .events
            .send(EngineEvent::Tokens(outcome.chunk))
            .is_err()
        {
            self.remove(id);
            return;
        }
        if let Some((reason, stop_reason)) = outcome.finish {
            self.finish(id, reason, stop_reason);
        }
    }

    /// Ends a request with a `Finished` event carrying usage and timings, and frees it.
    fn finish(&mut self, id: SeqId, reason: FinishReason, stop_reason: Option<String>) {
        let now = Instant::now();
        let (usage, first_scheduled) = match self.scheduler.get(id) {
            Some(seq) => (
                Usage {
                    prompt_tokens: seq.prompt_len as u32,
                    completion_tokens: seq.output().len() as u32,
                    cached_tokens: seq.cached_tokens,
                },
                seq.first_scheduled,
            ),
            None => (Usage::default(), None),
        };
        let Some(state) = self.remove(id) else {
            return;
        };
        let timings: RequestTimings = state.timings(first_scheduled, now);
        let _ = state.events.send(EngineEvent::Finished(Finished {
            reason,
            stop_reason,
            usage,
            timings,
        }));
    }

    /// Forgets a request and frees its blocks; returns its streaming state.
    fn remove(&mut self, id: SeqId) -> Option<RequestState> {
        self.scheduler.remove(id);
        let state = self.requests.remove(&id)?;
        self.ids.remove(&state.request_id);
        Some(state)
    }

    /// Publishes the gauges the handles read.
    pub(crate) fn publish_gauges(&self) {
        let stats = self.scheduler.prefix_cache_stats();
        let cfg = self.scheduler.config();
        self.shared.publish(LoadSnapshot {
            running: self.scheduler.num_running() as u32,
            waiting: self.scheduler.num_waiting() as u32,
            kv_blocks_used: self.scheduler.kv_blocks_used(),
            kv_blocks_total: self.num_kv_blocks,
            max_num_seqs: cfg.max_num_seqs,
            block_size: cfg.blocks.block_size,
            prefix_cache_queries: stats.queries,
            prefix_cache_hits: stats.hits,
            preemptions: self.scheduler.num_preemptions(),
        });
    }
}

impl std::fmt::Debug for EngineCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineCore")
            .field("running", &self.scheduler.num_running())
            .field("waiting", &self.scheduler.num_waiting())
            .finish_non_exhaustive()
    }
}

/// The chunk text of a token id, for logprob alternatives.
pub(crate) fn token_text(tokenizer: &Tokenizer, id: u32) -> String {
    tokenizer.decode(&[id], false).unwrap_or_default()
}
