//! The Grafana dashboard and the alert rules in `deploy/` may only use metric names that
//! `orchard_common::metrics::names` defines (plus a histogram's `_bucket` / `_sum` /
//! `_count` series), so renaming a metric without updating the dashboards fails here.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use orchard_common::metrics::names;

fn deploy_file(relative: &str) -> Result<String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(relative);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// Every `orchard_...` identifier in `text`.
fn orchard_identifiers(text: &str) -> BTreeSet<&str> {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("orchard_") {
        let preceded_by_ident = rest[..start].chars().next_back().is_some_and(is_ident);
        let tail = &rest[start..];
        let end = tail.find(|c: char| !is_ident(c)).unwrap_or(tail.len());
        if !preceded_by_ident {
            found.insert(&tail[..end]);
        }
        rest = &tail[end..];
    }
    found
}

fn is_known(name: &str) -> bool {
    let defined = |n: &str| names::ALL.iter().any(|spec| spec.name == n);
    defined(name)
        || ["_bucket", "_sum", "_count"]
            .iter()
            .any(|suffix| name.strip_suffix(suffix).is_some_and(defined))
}

fn check(relative: &str, at_least: usize) -> Result<()> {
    let text = deploy_file(relative)?;
    let used = orchard_identifiers(&text);
    let unknown: Vec<_> = used.iter().filter(|n| !is_known(n)).collect();
    ensure!(
        unknown.is_empty(),
        "{relative} uses undefined metrics: {unknown:?}"
    );
    ensure!(
        used.len() >= at_least,
        "{relative}: only {} metric names found: {used:?}",
        used.len()
    );
    Ok(())
}

#[test]
fn dashboard_uses_only_defined_metric_names() -> Result<()> {
    check("grafana/dashboards/orchard.json", 20)
}

#[test]
fn alert_rules_use_only_defined_metric_names() -> Result<()> {
    check("prometheus/alerts.yml", 5)
}

#[test]
fn scanner_catches_an_undefined_name() {
    let used = orchard_identifiers("rate(orchard_worker_no_such_metric_total[1m]) x_orchard_y");
    assert_eq!(
        used.into_iter().collect::<Vec<_>>(),
        ["orchard_worker_no_such_metric_total"]
    );
    assert!(!is_known("orchard_worker_no_such_metric_total"));
    assert!(is_known(
        "orchard_worker_time_to_first_token_seconds_bucket"
    ));
}
