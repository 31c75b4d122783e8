#!/usr/bin/env bash
# Orchard's serving stack against llama.cpp's server on the same machine, in the same run, with
# the same load generator, model file, thread count and OpenAI `/v1/completions` requests:
#
# - Orchard: one worker (the default model, all cores) behind the router's OpenAI HTTP front;
# - llama.cpp: `llama-server` with 16 parallel slots (continuous batching, its default).
#
# Only one server runs at a time (they would share the cores), and the two alternate for
# ROUNDS rounds so a change in the host's speed during the run falls on both. Each round sends,
# after 2 unmeasured warm-up requests:
#   alone: 8 requests one at a time, 64-token prompt, 64 output tokens (TTFT and TPOT p50);
#   c=16:  32 requests, 16 at a time, 32-token prompt, 64 output tokens (aggregate output tok/s).
# Every request is greedy with `ignore_eos`, so each produces exactly the tokens asked for.
#
# Usage: benches/compare-servers.sh [OUT_DIR]   (default: orchard-server-compare)
#   ROUNDS          rounds (default 2)
#   LLAMA_CPP_BIN   folder with llama-server (default: built by benches/llama-cpp.sh --server)
# Prints a Markdown table (median over rounds of each figure) on stdout and writes it to
# OUT_DIR/table.md, with every level of every round in OUT_DIR/summary.csv; every orchard-bench
# report is kept under OUT_DIR. A failed request fails the comparison. Progress goes to stderr.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-orchard-server-compare}"
rounds="${ROUNDS:-2}"
python="${PYTHON:-python3}"
model="$("$repo/deploy/fetch-model.sh")"
llama_bin="${LLAMA_CPP_BIN:-$("$repo/benches/llama-cpp.sh" --server)}"
[[ -x "$llama_bin/llama-server" ]] || { echo "error: $llama_bin/llama-server not found" >&2; exit 1; }
echo "== building Orchard's release binaries" >&2
(cd "$repo" && cargo build --quiet --release -p orchard-worker -p orchard-router -p orchard-bench --bins)
bin="${CARGO_TARGET_DIR:-$repo/target}/release"
threads="$(nproc)"
mkdir -p "$out"
tmp="$(mktemp -d)"
pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
}
cleanup() {
  local rc=$?
  stop_all
  if ((rc != 0)); then
    for log in "$tmp"/*.log; do [[ -f "$log" ]] && { echo "---- $log" >&2; tail -n 30 "$log" >&2; }; done
  fi
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
free_port() { "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# Waits until GET $1 answers 200 with a body containing $2 (up to 10 minutes); fails at once if
# one of the processes $3... (the server being started) has exited.
wait_for() {
  "$python" - "$@" <<'PY'
import os, sys, time, urllib.request
url, needle, pids = sys.argv[1], sys.argv[2], [int(p) for p in sys.argv[3:]]
deadline = time.time() + 600
while time.time() < deadline:
    for pid in pids:
        try:
            os.kill(pid, 0)
            # A zombie (exited, not yet reaped) still answers kill(0).
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    raise ProcessLookupError
        except (ProcessLookupError, FileNotFoundError):
            sys.exit(f"process {pid} exited before {url} was ready (its log follows)")
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            if r.status == 200 and needle in r.read().decode():
                sys.exit(0)
    except Exception:
        pass
    time.sleep(0.5)
sys.exit(f"{url} not ready after 10 minutes")
PY
}

start_orchard() {
  local grpc http worker
  grpc=$(free_port); http=$(free_port); worker=$(free_port)
  cat >"$tmp/worker.toml" <<TOML
id = "worker-1"
listen = "127.0.0.1:$worker"
engine_kind = "model"
[model]
path = "$model"
TOML
  cat >"$tmp/router.toml" <<TOML
listen = "127.0.0.1:$grpc"
http_listen = "127.0.0.1:$http"
[health]
poll_interval = "200ms"
[[workers]]
id = "worker-1"
address = "http://127.0.0.1:$worker"
TOML
  "$bin/orchard-worker" --config "$tmp/worker.toml" >"$tmp/orchard-worker.log" 2>&1 &
  pids+=($!)
  "$bin/orchard-router" --config "$tmp/router.toml" >"$tmp/orchard-router.log" 2>&1 &
  pids+=($!)
  wait_for "http://127.0.0.1:$http/v1/orchard/workers" '"healthy"' "${pids[@]}"
  target="http://127.0.0.1:$http"
}

start_llama() {
  local port
  port=$(free_port)
  # 16 slots of 256 tokens each: room for every request below.
  "$llama_bin/llama-server" -m "$model" -t "$threads" -np 16 -c 4096 \
    --host 127.0.0.1 --port "$port" >"$tmp/llama-server.log" 2>&1 &
  pids+=($!)
  wait_for "http://127.0.0.1:$port/health" 'ok' "${pids[@]}"
  target="http://127.0.0.1:$port"
}

bench() { # name round label args...
  local name=$1 round=$2 label=$3
  shift 3
  "$bin/orchard-bench" run --quiet --target "$target" --requests 2 --concurrency 1 \
    --prompt-tokens 16 --max-tokens 8 --out "$tmp/warmup" >/dev/null
  "$bin/orchard-bench" run --quiet --target "$target" --out "$out/$name/round-$round/$label" "$@" \
    >"$out/$name/round-$round/$label.md"
}

for round in $(seq 1 "$rounds"); do
  for name in orchard llama.cpp; do
    echo "== round $round/$rounds: $name" >&2
    mkdir -p "$out/$name/round-$round"
    case $name in
      orchard) start_orchard ;;
      llama.cpp) start_llama ;;
    esac
    bench "$name" "$round" alone --requests 8 --concurrency 1 --prompt-tokens 64 --max-tokens 64
    bench "$name" "$round" c16 --requests 32 --concurrency 16 --prompt-tokens 32 --max-tokens 64
    stop_all
  done
done

"$python" - "$out" "$rounds" "$threads" <<'PY'
import csv, statistics, sys
out, rounds, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3]
summaries = {}
for name in ("orchard", "llama.cpp"):
    for label in ("alone", "c16"):
        for r in range(1, rounds + 1):
            with open(f"{out}/{name}/round-{r}/{label}/summary.csv") as f:
                (s,) = list(csv.DictReader(f))
            if int(s["requests_failed"]) != 0:
                sys.exit(f"{name} {label} round {r}: {s['requests_failed']} requests failed")
            summaries[(name, label, r)] = s
# Every level of every round, one CSV.
with open(f"{out}/summary.csv", "w", newline="") as f:
    first = next(iter(summaries.values()))
    w = csv.DictWriter(f, fieldnames=["server", "round", "load", *first.keys()])
    w.writeheader()
    for (name, label, r), s in summaries.items():
        w.writerow({"server": name, "round": r, "load": label, **s})
def median(name, label, key):
    return statistics.median(float(summaries[(name, label, r)][key]) for r in range(1, rounds + 1))
figures = [
    ("TTFT p50, alone, 64-token prompt (ms)", "alone", "ttft_p50_ms", False),
    ("TPOT p50, alone (ms)", "alone", "tpot_p50_ms", False),
    ("Output tok/s, alone", "alone", "output_tok_s", True),
    ("TTFT p50, 16 at once, 32-token prompts (ms)", "c16", "ttft_p50_ms", False),
    ("Output tok/s, 16 at once", "c16", "output_tok_s", True),
]
lines = [
    f"Orchard (1 worker behind the router's HTTP front) and llama-server, {threads} threads, "
    f"median of {rounds} alternating round(s), OpenAI /v1/completions, greedy, ignore_eos.",
    "",
    "| Figure | Orchard | llama.cpp server | Orchard better by |",
    "|---|---:|---:|---:|",
]
for title, label, key, higher in figures:
    o, l = median("orchard", label, key), median("llama.cpp", label, key)
    better = (o / l) if higher else (l / o)
    lines.append(f"| {title} | {o:.1f} | {l:.1f} | {better:.2f}x |")
table = "\n".join(lines) + "\n"
with open(f"{out}/table.md", "w") as f:
    f.write(table)
print(table, end="")
PY
