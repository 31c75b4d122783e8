//! The two output shapes, completions and chat completions, behind one trait so the streaming
//! and collecting code in [`super::generate`] is written once.

use serde::Serialize;

use super::response::{
    ChatChoice, ChatChunk, ChatChunkChoice, ChatCompletion, ChatDelta, ChatLogprobs,
    ChatMessageOut, Completion, CompletionChoice, CompletionLogprobs, Finish, Header, Piece,
    TimingsBody, TokenLogprob,
};

/// Identity of one response, shared by all of its chunks.
#[derive(Debug, Clone)]
pub struct Meta {
    /// `cmpl-...` / `chatcmpl-...`; also the request id the router and workers log.
    pub id: String,
    /// Unix seconds when the request arrived.
    pub created: u64,
    /// The model name as the client sent it.
    pub model: String,
}

impl Meta {
    fn header(&self, object: &'static str) -> Header {
        Header {
            id: self.id.clone(),
            object,
            created: self.created,
            model: self.model.clone(),
        }
    }
}

/// A whole generation, gathered for a non-streamed response.
#[derive(Debug, Clone)]
pub struct Collected {
    pub text: String,
    /// Per stream message: the character offset its text started at, and its tokens.
    pub logprob_runs: Vec<(usize, Vec<TokenLogprob>)>,
    pub finish: Finish,
}

impl Collected {
    fn has_logprobs(&self) -> bool {
        self.logprob_runs.iter().any(|(_, run)| !run.is_empty())
    }
}

/// What the finishing chunk should carry besides the finish reason.
#[derive(Debug, Clone, Default)]
pub struct ChunkExtras {
    /// Set on the last chunk of the stream.
    pub timings: Option<TimingsBody>,
}

/// An endpoint's response shapes.
pub trait OutputFormat: Send + 'static {
    /// A streamed chunk.
    type Chunk: Serialize;
    /// A non-streamed response.
    type Whole: Serialize;

    /// Sent before any token (chat announces the assistant role).
    fn opening(&self) -> Option<Self::Chunk>;
    /// The chunk for one stream message; `offset` is the character count sent before it.
    fn chunk(&self, piece: &Piece, offset: usize, extras: ChunkExtras) -> Self::Chunk;
    /// The `stream_options.include_usage` chunk: no choices, usage and timings.
    fn usage_chunk(&self, finish: &Finish) -> Self::Chunk;
    /// The non-streamed response.
    fn whole(&self, collected: Collected) -> Self::Whole;
}

/// `/v1/completions`.
#[derive(Debug, Clone)]
pub struct CompletionFormat {
    pub meta: Meta,
}

const TEXT_COMPLETION: &str = "text_completion";

impl OutputFormat for CompletionFormat {
    type Chunk = Completion;
    type Whole = Completion;

    fn opening(&self) -> Option<Completion> {
        None
    }

    fn chunk(&self, piece: &Piece, offset: usize, extras: ChunkExtras) -> Completion {
        let logprobs = (!piece.logprobs.is_empty()).then(|| {
            let mut lp = CompletionLogprobs::default();
            lp.push(&piece.logprobs, offset);
            lp
        });
        Completion {
            header: self.meta.header(TEXT_COMPLETION),
            choices: vec![CompletionChoice {
                index: 0,
                text: piece.text.clone(),
                logprobs,
                finish_reason: piece.finish.as_ref().map(|f| f.reason),
            }],
            usage: None,
            orchard_timings: extras.timings,
        }
    }

    fn usage_chunk(&self, finish: &Finish) -> Completion {
        Completion {
            header: self.meta.header(TEXT_COMPLETION),
            choices: Vec::new(),
            usage: Some(finish.usage.clone()),
            orchard_timings: finish.timings.clone(),
        }
    }

    fn whole(&self, collected: Collected) -> Completion {
        let logprobs = collected.has_logprobs().then(|| {
            let mut lp = CompletionLogprobs::default();
            for (offset, run) in &collected.logprob_runs {
                lp.push(run, *offset);
            }
            lp
        });
        Completion {
            header: self.meta.header(TEXT_COMPLETION),
            choices: vec![CompletionChoice {
                index: 0,
                text: collected.text,
                logprobs,
                finish_reason: Some(collected.finish.reason),
            }],
            usage: Some(collected.finish.usage),
            orchard_timings: collected.finish.timings,
        }
    }
}

/// `/v1/chat/completions`.
#[derive(Debug, Clone)]
pub struct ChatFormat {
    pub meta: Meta,
}

const CHAT_CHUNK: &str = "chat.completion.chunk";
const ASSISTANT: &str = "assistant";

impl OutputFormat for ChatFormat {
    type Chunk = ChatChunk;
    type Whole = ChatCompletion;

    fn opening(&self) -> Option<ChatChunk> {
        Some(ChatChunk {
            header: self.meta.header(CHAT_CHUNK),
            choices: vec![ChatChunkChoice {
                index: 0,
                delta: ChatDelta {
                    role: Some(ASSISTANT),
                    content: Some(String::new()),
                },
                logprobs: None,
                finish_reason: None,
            }],
            usage: None,
            orchard_timings: None,
        })
    }

    fn chunk(&self, piece: &Piece, _offset: usize, extras: ChunkExtras) -> ChatChunk {
        let content =
            (!piece.text.is_empty() || piece.finish.is_none()).then(|| piece.text.clone());
        let logprobs =
            (!piece.logprobs.is_empty()).then(|| ChatLogprobs::from_tokens(&piece.logprobs));
        ChatChunk {
            header: self.meta.header(CHAT_CHUNK),
            choices: vec![ChatChunkChoice {
                index: 0,
                delta: ChatDelta {
                    role: None,
                    content,
                },
                logprobs,
                finish_reason: piece.finish.as_ref().map(|f| f.reason),
            }],
            usage: None,
            orchard_timings: extras.timings,
        }
    }

    fn usage_chunk(&self, finish: &Finish) -> ChatChunk {
        ChatChunk {
            header: self.meta.header(CHAT_CHUNK),
            choices: Vec::new(),
            usage: Some(finish.usage.clone()),
            orchard_timings: finish.timings.clone(),
        }
    }

    fn whole(&self, collected: Collected) -> ChatCompletion {
        let logprobs = collected.has_logprobs().then(|| {
            let tokens: Vec<TokenLogprob> = collected
                .logprob_runs
                .iter()
                .flat_map(|(_, run)| run.iter().cloned())
                .collect();
            ChatLogprobs::from_tokens(&tokens)
        });
        ChatCompletion {
            header: self.meta.header("chat.completion"),
            choices: vec![ChatChoice {
                index: 0,
                message: ChatMessageOut {
                    role: ASSISTANT,
                    content: collected.text,
                },
                logprobs,
                finish_reason: collected.finish.reason,
            }],
            usage: collected.finish.usage,
            orchard_timings: collected.finish.timings,
        }
    }
}
