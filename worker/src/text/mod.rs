//! Text: tokenizer from GGUF metadata or tokenizer.json, chat templates, incremental detokenizer.
