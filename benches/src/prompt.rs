//! Prompts: synthesised text of a given approximate token length, or prompts read from a file.
//!
//! **Tokenizer-free approximation.** The benchmark does not load the server's tokenizer, so a
//! synthetic prompt of `n` tokens is `n` common short English words, each written with a
//! leading space (" the", " water", ...). Byte-pair tokenizers of the Llama / GPT-2 family
//! (SmolLM2 included) encode each such word as one token, so the prompt is `n` tokens give or
//! take a token or two at the start. Where the server reports usage, the true prompt length is
//! recorded next to the requested one. The words are drawn from a generator seeded per request,
//! so prompts are deterministic across runs but differ from each other from the first word on:
//! no unintended prefix-cache hits between requests.

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::BenchError;

/// Words that byte-pair tokenizers encode as one token each when preceded by a space.
const WORDS: [&str; 64] = [
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at",
    "from", "his", "her", "an", "they", "be", "this", "are", "or", "had", "not", "but", "one",
    "all", "were", "we", "when", "there", "can", "been", "has", "more", "if", "will", "would",
    "so", "no", "out", "up", "into", "time", "new", "after", "first", "year", "people", "water",
    "world", "city", "house", "school", "light", "music", "river", "green", "small", "long",
    "great", "little", "old",
];

/// About `tokens` tokens of deterministic text for `seed` (see the module docs).
pub fn synthetic_prompt(tokens: usize, seed: u64) -> String {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut text = String::with_capacity(tokens * 6);
    for _ in 0..tokens {
        text.push(' ');
        text.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    text
}

/// One prompt to send, with its requested length when the benchmark chose it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// The prompt text.
    pub text: String,
    /// Requested length in tokens (synthetic prompts only).
    pub approx_tokens: Option<usize>,
}

/// Where a run's prompts come from.
#[derive(Debug, Clone)]
pub enum PromptSource {
    /// Synthetic prompts of about `tokens` tokens; request `i` uses seed `seed + i`.
    Synthetic {
        /// Approximate prompt length.
        tokens: usize,
        /// Base seed.
        seed: u64,
    },
    /// Prompts from a file, used in order and cycled.
    List(Vec<String>),
    /// A shared prefix followed by a per-request synthetic suffix: the prefix-cache test.
    SharedPrefix {
        /// Text every request starts with.
        prefix: String,
        /// Approximate tokens of the prefix.
        prefix_tokens: usize,
        /// Approximate tokens of the per-request suffix.
        suffix_tokens: usize,
        /// Base seed of the suffixes.
        seed: u64,
    },
}

impl PromptSource {
    /// The prompt of request `index`.
    pub fn prompt(&self, index: usize) -> Prompt {
        match self {
            Self::Synthetic { tokens, seed } => Prompt {
                text: synthetic_prompt(*tokens, seed.wrapping_add(index as u64)),
                approx_tokens: Some(*tokens),
            },
            Self::List(list) => Prompt {
                text: list[index % list.len()].clone(),
                approx_tokens: None,
            },
            Self::SharedPrefix {
                prefix,
                prefix_tokens,
                suffix_tokens,
                seed,
            } => Prompt {
                text: format!(
                    "{prefix}{}",
                    synthetic_prompt(*suffix_tokens, seed.wrapping_add(1 + index as u64))
                ),
                approx_tokens: Some(prefix_tokens + suffix_tokens),
            },
        }
    }
}

/// Reads prompts from a file: JSONL (`.jsonl`: one JSON object per line with a `prompt` or
/// `text` string, or a bare JSON string) or plain text (one prompt per non-empty line).
pub fn load_prompt_file(path: &Path) -> Result<Vec<String>, BenchError> {
    let bad = |detail: String| BenchError::PromptFile {
        path: path.to_owned(),
        detail,
    };
    let content = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let jsonl = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("jsonl"));
    let mut prompts = Vec::new();
    for (n, line) in content.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if jsonl {
            prompts.push(parse_jsonl_line(line).map_err(|e| bad(format!("line {}: {e}", n + 1)))?);
        } else {
            prompts.push(line.to_owned());
        }
    }
    if prompts.is_empty() {
        return Err(bad("no prompts in the file".to_owned()));
    }
    Ok(prompts)
}

fn parse_jsonl_line(line: &str) -> Result<String, String> {
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    match value {
        serde_json::Value::String(s) => Ok(s),
        serde_json::Value::Object(map) => ["prompt", "text"]
            .iter()
            .find_map(|k| map.get(*k).and_then(|v| v.as_str()).map(str::to_owned))
            .ok_or_else(|| "object has no string `prompt` or `text`".to_owned()),
        _ => Err("expected a JSON object or string".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_prompts_are_deterministic_sized_and_distinct() {
        let a = synthetic_prompt(100, 7);
        assert_eq!(a, synthetic_prompt(100, 7));
        assert_eq!(a.split_whitespace().count(), 100);
        let source = PromptSource::Synthetic {
            tokens: 32,
            seed: 1,
        };
        assert_ne!(source.prompt(0).text, source.prompt(1).text);
    }

    #[test]
    fn reads_plain_and_jsonl_files() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let txt = dir.path().join("p.txt");
        std::fs::write(&txt, "hello there\n\nsecond prompt\n")?;
        assert_eq!(
            load_prompt_file(&txt)?,
            vec!["hello there", "second prompt"]
        );
        let jsonl = dir.path().join("p.jsonl");
        std::fs::write(&jsonl, "{\"prompt\": \"a\"}\n\"b\"\n{\"text\": \"c\"}\n")?;
        assert_eq!(load_prompt_file(&jsonl)?, vec!["a", "b", "c"]);
        std::fs::write(&jsonl, "{\"other\": 1}\n")?;
        assert!(load_prompt_file(&jsonl).is_err());
        Ok(())
    }
}
