//! Helpers for the metrics unit tests.

use anyhow::{anyhow, Result};

/// The value of the sample whose series is `series`, or an error showing the whole scrape.
pub fn sample(text: &str, series: &str) -> Result<f64> {
    super::sample_value(text, series).ok_or_else(|| anyhow!("no sample `{series}` in:\n{text}"))
}
