//! Results: one [`Report`] per invocation, printed as Markdown and written as JSON, CSV and PNG
//! charts by [`write_files`].

pub mod charts;
mod files;
pub mod markdown;

use serde::{Deserialize, Serialize};

pub use files::write_files;

use crate::runner::LevelResult;
use crate::scenarios::{BatchingResult, PrefixResult};

/// Everything one `orchard-bench` invocation measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// Subcommand (`run`, `sweep`, `scenarios`).
    pub command: String,
    /// Target as given.
    pub target: String,
    /// Model name sent (empty = server default).
    pub model: String,
    /// Load levels, in the order run.
    pub levels: Vec<LevelResult>,
    /// Shared-prefix test, when run.
    pub prefix: Option<PrefixResult>,
    /// Continuous-batching test, when run.
    pub batching: Option<BatchingResult>,
}

impl Report {
    /// Every level, including those inside the prefix and batching tests (for CSV rows).
    pub fn all_levels(&self) -> Vec<&LevelResult> {
        let mut all: Vec<&LevelResult> = self.levels.iter().collect();
        all.extend(self.prefix.as_ref().map(|p| &p.level));
        all.extend(self.batching.as_ref().map(|b| &b.batched));
        all
    }

    /// The report as Markdown tables.
    pub fn to_markdown(&self) -> String {
        markdown::report(self)
    }
}
