#!/usr/bin/env bash
# Checks Orchard's dashboard and alert queries against a real Prometheus scraping the given
# targets: starts a throw-away Prometheus (temp dir, free port, 1 s scrape interval, the
# alert rules loaded), waits until every target is up and scraped a few times, runs
# promql_check.py against it, and stops it.
#
#   deploy/tests/prometheus_check.sh --router HOST:PORT --worker HOST:PORT [--worker ...]
#
# Options:
#   --router HOST:PORT    a router's metrics address (telemetry.metrics_listen); repeatable
#   --worker HOST:PORT    a worker's metrics address; repeatable
#   --timeout SECONDS     how long to wait for Prometheus and the targets (default 60)
#   --keep                leave the temp dir (config, TSDB, prometheus.log) for inspection
# Environment: PROMETHEUS = the prometheus binary (default: `prometheus` on PATH; Debian:
# apt-get install prometheus). Extra arguments after `--` go to promql_check.py.
# Exit status: promql_check.py's (0 = every expression returned data), 2 = set-up failed.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
deploy="$(dirname "$here")"
routers=()
workers=()
timeout=60
keep=0
check_args=()
while (($#)); do
  case "$1" in
    --router) routers+=("$2"); shift 2 ;;
    --worker) workers+=("$2"); shift 2 ;;
    --timeout) timeout="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    --) shift; check_args=("$@"); break ;;
    *) echo "unknown argument: $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
if ((${#routers[@]} + ${#workers[@]} == 0)); then
  echo "give at least one --router or --worker target" >&2
  exit 2
fi
prometheus="${PROMETHEUS:-$(command -v prometheus || true)}"
if [[ -z "$prometheus" ]]; then
  echo "prometheus not found: apt-get install prometheus, or set PROMETHEUS" >&2
  exit 2
fi

tmp="$(mktemp -d)"
prom_pid=""
cleanup() {
  if [[ -n "$prom_pid" ]]; then
    kill "$prom_pid" 2>/dev/null || true
    wait "$prom_pid" 2>/dev/null || true
  fi
  if ((keep)); then echo "kept $tmp" >&2; else rm -rf "$tmp"; fi
}
trap cleanup EXIT

# YAML flow list of quoted targets: ["a:1", "b:2"]
yaml_list() {
  local out="" t
  for t in "$@"; do out+="${out:+, }\"$t\""; done
  echo "[$out]"
}

cp "$deploy/prometheus/alerts.yml" "$tmp/alerts.yml"
{
  echo "global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}"
  echo "rule_files: [alerts.yml]"
  echo "scrape_configs:"
  if ((${#routers[@]})); then
    echo "  - {job_name: orchard-router, static_configs: [{targets: $(yaml_list "${routers[@]}")}]}"
  fi
  if ((${#workers[@]})); then
    echo "  - {job_name: orchard-worker, static_configs: [{targets: $(yaml_list "${workers[@]}")}]}"
  fi
} >"$tmp/prometheus.yml"

port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
base="http://127.0.0.1:$port"
"$prometheus" --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/data" \
  --web.listen-address="127.0.0.1:$port" >"$tmp/prometheus.log" 2>&1 &
prom_pid=$!
echo "prometheus $("$prometheus" --version 2>&1 | head -1 | awk '{print $3}') on $base (pid $prom_pid)" >&2

# Polls $base until the Python expression over the JSON answer of $1 is true.
wait_for() {
  local path="$1" condition="$2" what="$3" deadline=$((SECONDS + timeout))
  until python3 - "$base$path" "$condition" <<'PY' 2>/dev/null; do
import json, sys, urllib.request
body = json.load(urllib.request.urlopen(sys.argv[1], timeout=2))
sys.exit(0 if eval(sys.argv[2], {"body": body}) else 1)
PY
    if ! kill -0 "$prom_pid" 2>/dev/null; then
      echo "prometheus exited; its log:" >&2; cat "$tmp/prometheus.log" >&2; exit 2
    fi
    if ((SECONDS > deadline)); then
      echo "timed out after ${timeout}s waiting for $what" >&2
      python3 -c "import json,urllib.request; print(json.dumps(json.load(urllib.request.urlopen('$base/api/v1/targets')), indent=1))" >&2 || true
      exit 2
    fi
    sleep 0.5
  done
}

expected=$((${#routers[@]} + ${#workers[@]}))
wait_for "/api/v1/status/buildinfo" 'body["status"] == "success"' "Prometheus to answer"
wait_for "/api/v1/targets" \
  "len(body['data']['activeTargets']) == $expected and all(t['health'] == 'up' for t in body['data']['activeTargets'])" \
  "all $expected targets to be up"
# rate() needs two samples inside its window; wait for >= 3 scrapes of every target.
wait_for "/api/v1/query?query=min(count_over_time(up%5B1m%5D))" \
  "body['data']['result'] and float(body['data']['result'][0]['value'][1]) >= 3" \
  "three scrapes of every target"
echo "all $expected targets up; checking queries" >&2

python3 "$here/promql_check.py" --prometheus "$base" --check-loaded-rules "${check_args[@]}"
