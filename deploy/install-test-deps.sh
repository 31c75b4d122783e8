#!/usr/bin/env bash
# Installs what Orchard's cluster-level tests need besides Rust: a Python virtualenv with the
# third-party clients the tests drive (grpcio + health + reflection, the official `openai`
# package, pytest) and a real Prometheus server (Debian package `prometheus`, which ships
# promtool). Idempotent; prints the virtualenv's python on stdout.
#   ORCHARD_CACHE   cache folder (default: ~/.cache/orchard); the venv lives in $ORCHARD_CACHE/venv
set -euo pipefail
cache="${ORCHARD_CACHE:-$HOME/.cache/orchard}"
venv="$cache/venv"
requirements="$(cd "$(dirname "$0")" && pwd)/tests/requirements.txt"

if [[ ! -x "$venv/bin/python" ]]; then
  echo "creating a Python virtualenv in $venv..." >&2
  mkdir -p "$cache"
  python3 -m venv "$venv" >&2
fi
stamp="$venv/.requirements.sha"
want=$(sha256sum "$requirements" | cut -d' ' -f1)
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  echo "installing Python test clients (grpcio, openai, pytest)..." >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements" >&2
  echo "$want" >"$stamp"
fi

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  echo "installing Prometheus (Debian package)..." >&2
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq >&2
  $sudo apt-get install -y -qq --no-install-recommends prometheus >&2
fi
echo "$venv/bin/python"
