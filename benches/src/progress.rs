//! Progress bar while load runs: shown on a terminal, hidden when stdout is piped (so results
//! captured to a file stay clean) or with `--quiet`.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Whether to draw progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// Draw when stdout is a terminal.
    Auto,
    /// Never draw (`--quiet`, tests).
    Hidden,
}

/// A cheap-to-clone progress handle shared by request tasks.
#[derive(Debug, Clone)]
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar for `total` requests (or a spinner when the run is bounded by time).
    pub fn new(mode: ProgressMode, total: Option<u64>, label: &str) -> Self {
        let visible = mode == ProgressMode::Auto && std::io::stdout().is_terminal();
        let bar = match total {
            Some(n) => ProgressBar::new(n),
            None => ProgressBar::new_spinner(),
        };
        if visible {
            let template = match total {
                Some(_) => "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} requests",
                None => "{prefix} [{elapsed_precise}] {spinner} {pos} requests",
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style);
            }
        } else {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        bar.set_prefix(label.to_owned());
        Self { bar }
    }

    /// One request finished.
    pub fn inc(&self) {
        self.bar.inc(1);
    }

    /// Requests finished so far.
    pub fn position(&self) -> u64 {
        self.bar.position()
    }

    /// Removes the bar from the terminal.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
