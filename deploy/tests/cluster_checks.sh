#!/usr/bin/env bash
# Cluster-level checks with clients and servers no one here wrote: starts a router and two
# workers on the default model (the debug binaries cargo builds for the tests), then
#   1. deploy/tests/grpc_client.py   - Python grpcio: health check, reflection, streamed Generate
#   2. deploy/tests/test_openai.py   - the official `openai` package against the HTTP front
#   3. orchard-bench                 - a short load run over gRPC (gives the metrics data)
#   4. deploy/tests/prometheus_check.sh - a real Prometheus scrapes router and workers; every
#      PromQL expression of the shipped dashboard and alert rules must parse and return data
# Needs deploy/install-test-deps.sh (venv with grpcio/openai/pytest, Debian prometheus).
# Exit status non-zero when any check fails; process logs are printed on failure.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
python="$(deploy/install-test-deps.sh)"
model="$(deploy/fetch-model.sh)"
target="${CARGO_TARGET_DIR:-$root/target}"
echo "== building orchard-worker, orchard-router and orchard-bench binaries" >&2
cargo build --quiet -p orchard-worker -p orchard-router -p orchard-bench --bins
bin="$target/debug"

tmp="$(mktemp -d)"
pids=()
cleanup() {
  local rc=$?
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if ((rc != 0)); then
    for log in "$tmp"/*.log; do echo "---- $log" >&2; tail -n 40 "$log" >&2; done
  fi
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
free_port() { "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

router_grpc=$(free_port); router_http=$(free_port); router_metrics=$(free_port)
workers_toml=""
worker_metrics=()
for i in 1 2; do
  port=$(free_port); mport=$(free_port)
  worker_metrics+=("127.0.0.1:$mport")
  cat >"$tmp/worker-$i.toml" <<TOML
id = "worker-$i"
listen = "127.0.0.1:$port"
engine_kind = "model"
[model]
path = "$model"
[engine]
kv_cache_mb = 512
[telemetry]
metrics_listen = "127.0.0.1:$mport"
TOML
  workers_toml+=$'\n'"[[workers]]"$'\n'"id = \"worker-$i\""$'\n'"address = \"http://127.0.0.1:$port\""$'\n'
  "$bin/orchard-worker" --config "$tmp/worker-$i.toml" >"$tmp/worker-$i.log" 2>&1 &
  pids+=($!)
done
cat >"$tmp/router.toml" <<TOML
listen = "127.0.0.1:$router_grpc"
http_listen = "127.0.0.1:$router_http"
[health]
poll_interval = "200ms"
[telemetry]
metrics_listen = "127.0.0.1:$router_metrics"
$workers_toml
TOML
"$bin/orchard-router" --config "$tmp/router.toml" >"$tmp/router.log" 2>&1 &
pids+=($!)

echo "== waiting for both workers to be healthy in the router's view" >&2
"$python" - "http://127.0.0.1:$router_http" <<'PY'
import json, sys, time, urllib.request
url = sys.argv[1] + "/v1/orchard/workers"
deadline = time.time() + 600
while time.time() < deadline:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            workers = json.load(r)["workers"]
        if len(workers) == 2 and all(w["state"] == "healthy" for w in workers):
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.5)
sys.exit("workers did not become healthy within 600 s")
PY

echo "== 1. Python grpcio client (health, reflection, streamed Generate)" >&2
"$python" deploy/tests/grpc_client.py "127.0.0.1:$router_grpc"

echo "== 2. official openai package against the HTTP front" >&2
ORCHARD_HTTP_URL="http://127.0.0.1:$router_http" "$python" -m pytest -q -p no:cacheprovider deploy/tests/test_openai.py

echo "== 3. orchard-bench load over gRPC" >&2
"$bin/orchard-bench" run --target "grpc://127.0.0.1:$router_grpc" --requests 8 --concurrency 4 \
  --prompt-tokens 32 --max-tokens 16 --out "$tmp/bench" -q

echo "== 4. real Prometheus: every dashboard and alert expression returns data" >&2
deploy/tests/prometheus_check.sh --router "127.0.0.1:$router_metrics" \
  --worker "${worker_metrics[0]}" --worker "${worker_metrics[1]}" --timeout 120
echo "cluster checks passed" >&2
