//! Text: tokenizer from GGUF metadata or tokenizer.json, chat templates, incremental detokenizer.
//!
//! Streaming needs two pieces that both hold text back: [`detokenizer`] waits until a
//! multi-byte UTF-8 character is complete, and [`stop`] waits until a possible stop string is
//! either confirmed or ruled out.

pub mod chat_template;
pub mod detokenizer;
pub mod frontend;
pub mod gguf_tokenizer;
pub mod stop;

pub use detokenizer::{DetokenizeError, IncrementalDetokenizer, SpecialTokens};
pub use stop::{StopChecker, StopOutcome};
