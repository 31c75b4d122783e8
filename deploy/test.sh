#!/usr/bin/env bash
# Runs Orchard's test suite on this machine: fetches the default model if missing, runs every
# workspace test (unit and integration; the model tests run on the real default model), then
# the cluster-level checks with third-party clients and a real Prometheus
# (deploy/tests/cluster_checks.sh, which installs its Python clients and Prometheus itself).
# Arguments go to `cargo test`; with arguments the cluster-level checks are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/fetch-model.sh >/dev/null
cargo test --workspace "$@"
if (($# == 0)); then
  deploy/tests/cluster_checks.sh
fi
