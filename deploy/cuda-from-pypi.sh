#!/usr/bin/env bash
# Assembles a CUDA 13.0 toolkit for building Orchard with `--features cuda` on a machine that
# has no CUDA install and reaches only package registries: NVIDIA's own PyPI wheels (nvcc and
# nvvm, the cccl headers, the runtime, nvrtc, cuBLAS, cuRAND) in one folder, plus a link-time
# stub of the driver library (`libcuda.so.1`: candle links the CUDA libraries dynamically; the
# real driver library comes with the GPU driver where the binary runs). Prints the folder.
#
#   root="$(deploy/cuda-from-pypi.sh)"
#   PATH="$root/bin:$PATH" CUDA_ROOT="$root" CUDA_COMPUTE_CAP=90 RUSTFLAGS="-L $root/lib" \
#     cargo test --release -p orchard-worker --features cuda --test model_cuda --no-run
#
# CUDA_COMPUTE_CAP is the GPU's (90: H100 / H200). The test binary then runs on the GPU
# machine with its CUDA 13 libraries on LD_LIBRARY_PATH (README, "CUDA").
#
# Environment:
#   ORCHARD_CACHE   cache folder (default: ~/.cache/orchard); the toolkit goes to cuda-13.0/
set -euo pipefail

cache="${ORCHARD_CACHE:-$HOME/.cache/orchard}"
root="$cache/cuda-13.0"
if [[ -x "$root/bin/nvcc" && -e "$root/lib/libcuda.so" ]]; then
    echo "$root"
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "downloading NVIDIA's CUDA 13.0 wheels from PyPI (about 800 MB)..." >&2
python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --python-version 3.11 -d "$work/wheels" \
    "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-cccl==13.0.85" \
    "nvidia-cuda-crt==13.0.88" "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-nvrtc==13.0.88" \
    "nvidia-cublas==13.10.0.20" "nvidia-curand==10.4.5.25" >&2

echo "unpacking..." >&2
for wheel in "$work"/wheels/*.whl; do
    python3 -m zipfile -e "$wheel" "$work/unpacked"
done
staging="$root.partial"
rm -rf "$staging"
mkdir -p "$staging"
cp -r "$work/unpacked/nvidia/cu13/." "$staging/"
# Zip archives do not keep the executable bit.
chmod +x "$staging"/bin/* "$staging"/nvvm/bin/*

# Unversioned names for the linker (`-lcublas` and so on).
for lib in cublas cublasLt curand nvrtc cudart; do
    versioned="$(cd "$staging/lib" && ls "lib$lib.so."* | head -n 1)"
    ln -sf "$versioned" "$staging/lib/lib$lib.so"
done

# The driver API's functions, as empty definitions under the driver library's soname: enough
# to link; at run time the loader finds the real libcuda.so.1.
grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$staging/include/cuda.h" | sort -u |
    awk '{ print "void " $1 "(void) {}" }' >"$work/libcuda-stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$staging/lib/libcuda.so" "$work/libcuda-stub.c"

mv "$staging" "$root"
echo "$root"
