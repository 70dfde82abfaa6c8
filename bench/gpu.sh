#!/usr/bin/env bash
# One prepared run for an accelerator machine: DP and non-private tokens/s, MFU and peak memory
# for the small and base presets and the VaultGemma-1B shape (microbatched), in one table.
#
#   bench/gpu.sh            # on the accelerator (needs jax with its CUDA/TPU plugin installed)
#   bench/gpu.sh --dry      # anywhere, CPU included: tiny stand-in shapes, proves the script
#   bench/gpu.sh --small    # only the small preset at 64 × 128 (a quick check)
# Extra arguments go to bench/gpu_bench.py (e.g. --clipping per-example, --json).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PYTHONPATH="$root/operator:$root/trainer${PYTHONPATH:+:$PYTHONPATH}"
# Let XLA take what it needs as it goes, so that the allocator's peak is the program's peak.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
python="${PYTHON:-python}"
args=()
for arg in "$@"; do
  case "$arg" in
    --small) args+=(--shapes small --batch 64 --seq-len 128) ;;
    *) args+=("$arg") ;;
  esac
done
"$python" -c 'import jax; print("jax", jax.__version__, "devices:", jax.devices())' >&2
exec "$python" bench/gpu_bench.py "${args[@]}"
