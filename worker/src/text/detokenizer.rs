//! Incremental detokenization for streaming, exact for multi-byte UTF-8.
//!
//! Uses the prefix-offset / read-offset method of vLLM and TGI (`decode_token`): decoding a
//! token on its own loses context (leading-space rules, byte-fallback pieces), so each step
//! decodes a short window `tokens[prefix_offset..]` and compares it with the already-emitted
//! window `tokens[prefix_offset..read_offset]`. New text is emitted only when it does not end
//! in U+FFFD, i.e. when the last character's bytes are all present.

use tokenizers::Tokenizer;

/// The replacement character a byte-fallback decoder yields for an incomplete sequence.
const REPLACEMENT: char = '\u{FFFD}';
/// Prompt tokens kept as left context for the first output tokens (vLLM uses 5).
const PROMPT_CONTEXT: usize = 5;

/// Why a token could not be decoded; the caller fails only the affected request.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DetokenizeError {
    /// The tokenizer rejected the ids (for example an id outside its vocabulary).
    #[error("tokenizer decode failed: {0}")]
    Decode(String),
}

/// Whether special tokens (BOS, EOS, chat markers) appear in the streamed text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecialTokens {
    /// Drop them, as OpenAI-compatible servers do by default.
    Skip,
    /// Keep them in the text.
    Keep,
}

/// Per-request streaming decoder; keeps only the short token window it still needs.
#[derive(Debug, Clone)]
pub struct IncrementalDetokenizer {
    /// Tokens from `prefix_offset` on (older ones are dropped once emitted).
    tokens: Vec<u32>,
    /// Start of the context window whose text has already been emitted.
    prefix_offset: usize,
    /// End of the emitted window: tokens at and after it are not yet in the output.
    read_offset: usize,
    /// Passed to every `decode` call so window and prefix decode consistently.
    special: SpecialTokens,
}

impl IncrementalDetokenizer {
    /// Starts after `prompt`, whose last few tokens give the first output tokens context.
    pub fn new(prompt: &[u32], special: SpecialTokens) -> Self {
        let tokens = prompt[prompt.len().saturating_sub(PROMPT_CONTEXT)..].to_vec();
        Self {
            read_offset: tokens.len(),
            tokens,
            prefix_offset: 0,
            special,
        }
    }

    /// Adds one generated token; returns the text it completes (often empty while a
    /// multi-byte character is split across tokens).
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> Result<String, DetokenizeError> {
        self.tokens.push(token);
        let prefix = self.decode(tokenizer, self.prefix_offset, self.read_offset)?;
        let full = self.decode(tokenizer, self.prefix_offset, self.tokens.len())?;
        if full.len() <= prefix.len() || full.ends_with(REPLACEMENT) {
            return Ok(String::new());
        }
        let Some(new_text) = full.get(prefix.len()..) else {
            return Ok(String::new());
        };
        let new_text = new_text.to_owned();
        self.advance();
        Ok(new_text)
    }

    /// Text still held back when generation ends (an incomplete character decodes lossily).
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<String, DetokenizeError> {
        let prefix = self.decode(tokenizer, self.prefix_offset, self.read_offset)?;
        let full = self.decode(tokenizer, self.prefix_offset, self.tokens.len())?;
        self.advance();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_owned())
    }

    /// Moves the window forward and drops tokens no later decode will look at.
    fn advance(&mut self) {
        self.prefix_offset = self.read_offset;
        self.read_offset = self.tokens.len();
        self.tokens.drain(..self.prefix_offset);
        self.read_offset -= self.prefix_offset;
        self.prefix_offset = 0;
    }

    fn decode(&self, tok: &Tokenizer, from: usize, to: usize) -> Result<String, DetokenizeError> {
        let skip = self.special == SpecialTokens::Skip;
        tok.decode(&self.tokens[from..to], skip)
            .map_err(|e| DetokenizeError::Decode(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::{anyhow, Result};
    use std::str::FromStr;

    /// A Llama/SmolLM-style tokenizer: a few word pieces plus `<0xNN>` byte tokens decoded
    /// by ByteFallback + Fuse, so "é" and "€" arrive as several tokens.
    fn tokenizer() -> Result<Tokenizer> {
        let json = r#"{
          "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
          "normalizer": null, "pre_tokenizer": null, "post_processor": null,
          "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]},
          "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": true, "ignore_merges": false,
            "vocab": {"<unk>": 0, "<0xC3>": 1, "<0xA9>": 2, "<0xE2>": 3, "<0x82>": 4,
                      "<0xAC>": 5, "caf": 6, " ": 7, "5": 8, "!": 9},
            "merges": []}
        }"#;
        Tokenizer::from_str(json).map_err(|e| anyhow!("{e}"))
    }

    /// Pushes `ids` one at a time and returns every emitted chunk.
    fn stream(tok: &Tokenizer, ids: &[u32]) -> Result<Vec<String>> {
        let mut d = IncrementalDetokenizer::new(&[], SpecialTokens::Skip);
        ids.iter().map(|&id| Ok(d.push(tok, id)?)).collect()
    }

    #[test]
    fn multibyte_chars_are_emitted_only_when_complete() -> Result<()> {
        let tok = tokenizer()?;
        // "café 5€!"
        let ids = [6, 1, 2, 7, 8, 3, 4, 5, 9];
        let chunks = stream(&tok, &ids)?;
        assert_eq!(chunks, ["caf", "", "é", " ", "5", "", "", "€", "!"]);
        let full = tok.decode(&ids, true).map_err(|e| anyhow!("{e}"))?;
        assert_eq!(chunks.concat(), full);
        assert_eq!(full, "café 5€!");
        Ok(())
    }

    #[test]
    fn no_chunk_contains_a_replacement_char() -> Result<()> {
        let tok = tokenizer()?;
        let chunks = stream(&tok, &[3, 4, 5, 1, 2, 3, 4, 5])?;
        assert!(
            chunks.iter().all(|c| !c.contains(REPLACEMENT)),
            "{chunks:?}"
        );
        assert_eq!(chunks.concat(), "€é€");
        Ok(())
    }

    #[test]
    fn prompt_context_is_not_re_emitted() -> Result<()> {
        let tok = tokenizer()?;
        let mut d = IncrementalDetokenizer::new(&[6, 1, 2], SpecialTokens::Skip);
        assert_eq!(d.push(&tok, 9)?, "!");
        Ok(())
    }

    #[test]
    fn flush_releases_an_incomplete_tail() -> Result<()> {
        let tok = tokenizer()?;
        let mut d = IncrementalDetokenizer::new(&[], SpecialTokens::Skip);
        assert_eq!(d.push(&tok, 3)?, "");
        assert!(!d.flush(&tok)?.is_empty());
        Ok(())
    }

    #[test]
    fn unknown_id_is_an_error_not_a_panic() -> Result<()> {
        let tok = tokenizer()?;
        let mut d = IncrementalDetokenizer::new(&[], SpecialTokens::Skip);
        // tokenizers skips unknown ids on decode; either way no panic and no garbage text.
        let out = d.push(&tok, 10_000);
        assert!(matches!(out.as_deref(), Ok("") | Err(_)), "{out:?}");
        Ok(())
    }
}
