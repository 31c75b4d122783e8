//! Helpers for the metrics unit tests.

use anyhow::{anyhow, Result};

/// The value of the sample whose series (name and labels, exactly as exposed) is `series`.
pub fn sample(text: &str, series: &str) -> Result<f64> {
    let line = text
        .lines()
        .find(|l| {
            l.strip_prefix(series)
                .is_some_and(|rest| rest.starts_with(' '))
        })
        .ok_or_else(|| anyhow!("no sample `{series}` in:\n{text}"))?;
    let value = line[series.len()..].trim();
    Ok(value.parse()?)
}
