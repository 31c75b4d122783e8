#!/usr/bin/env bash
# Runs Orchard's test suite on this machine: fetches the default model if missing, then runs
# every workspace test (unit and integration; the model tests run on the real default model).
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/fetch-model.sh >/dev/null
cargo test --workspace "$@"
