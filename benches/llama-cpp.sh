#!/usr/bin/env bash
# Builds llama.cpp's benchmark tools (llama-bench, llama-batched-bench) for CPU, so that
# `orchard-engine-bench --llama-cpp DIR` can measure llama.cpp in the same run as Orchard;
# with --server also its OpenAI-compatible `llama-server` (for benches/compare-servers.sh).
#
# The sources are the llama.cpp tree that the PyPI sdist of llama-cpp-python vendors (a
# machine that reaches only package registries has no other route to them), pinned by version
# and SHA-256. The build is llama.cpp's own CMake release build with GGML_NATIVE (this CPU's
# instruction set) and OpenMP, the defaults of its README, with one change: its AMX matrix
# kernels are compiled out (the AMX macros that -march=native defines are undefined). On a
# CPU that reports AMX (this project's host since 2026-12) that build's Q4_1 prompt processing
# dies at once with SIGILL inside `tinygemm_kernel_amx<block_q8_1, block_q4_1>`, although the
# tile state is granted to processes here (a C test ran `tdpbssd`), so the fastest llama.cpp
# that runs here is its AVX-512 path.
#
# Prints the folder holding the two tools on stdout; progress goes to stderr. Idempotent: a
# second run only prints the folder. Takes ~5 minutes on 2 cores (more with --server).
#   ORCHARD_CACHE   cache folder (default: ~/.cache/orchard)
set -euo pipefail
targets=(llama-bench llama-batched-bench)
case "${1:-}" in
  "") ;;
  --server) targets+=(llama-server) ;;
  *) echo "usage: $0 [--server]" >&2; exit 2 ;;
esac
version=0.3.36
sha256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
url="https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-$version.tar.gz"
cache="${ORCHARD_CACHE:-$HOME/.cache/orchard}"
root="$cache/llama.cpp/llama-cpp-python-$version"
src="$root/src"
build="$root/build-noamx"
bin="$build/bin"
# llama-cpp-python 0.3.36 vendors this llama.cpp commit (its CHANGELOG); the benchmark reports it.
source_note="llama.cpp 0c1e57098 (vendored by llama-cpp-python $version; AMX kernels compiled out)"
built=1
for target in "${targets[@]}"; do [[ -x "$bin/$target" ]] || built=0; done
if ((built)) && [[ -f "$bin/orchard-source.txt" ]]; then
  echo "$bin"
  exit 0
fi
for tool in c++ make; do
  command -v "$tool" >/dev/null || { echo "error: $tool is needed to build llama.cpp" >&2; exit 1; }
done
if ! command -v cmake >/dev/null; then
  echo "installing cmake from PyPI..." >&2
  python3 -m pip install --quiet cmake >&2
fi
mkdir -p "$root"
if [[ ! -f "$src/CMakeLists.txt" ]]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "fetching llama-cpp-python $version (sdist, 77 MB) from PyPI..." >&2
  python3 - "$url" "$sha256" "$tmp/sdist.tar.gz" <<'PY'
import hashlib, shutil, sys, urllib.request
url, want, out = sys.argv[1:]
with urllib.request.urlopen(url) as r, open(out, "wb") as f:
    shutil.copyfileobj(r, f, 1 << 20)
got = hashlib.sha256(open(out, "rb").read()).hexdigest()
if got != want:
    sys.exit(f"error: SHA-256 of the sdist is {got}, expected {want}")
PY
  echo "unpacking its vendored llama.cpp..." >&2
  tar -xzf "$tmp/sdist.tar.gz" -C "$tmp" "llama_cpp_python-$version/vendor/llama.cpp"
  rm -rf "$src"
  mv "$tmp/llama_cpp_python-$version/vendor/llama.cpp" "$src"
fi
echo "configuring llama.cpp (release, GGML_NATIVE)..." >&2
server=OFF
[[ " ${targets[*]} " == *" llama-server "* ]] && server=ON
no_amx="-U__AMX_TILE__ -U__AMX_INT8__ -U__AMX_BF16__"
cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DCMAKE_C_FLAGS="$no_amx" -DCMAKE_CXX_FLAGS="$no_amx" \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER="$server" >&2
echo "building ${targets[*]}..." >&2
cmake --build "$build" -j "$(nproc)" --target "${targets[@]}" >&2
echo "$source_note" > "$bin/orchard-source.txt"
echo "$bin"
