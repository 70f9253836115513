#!/usr/bin/env bash
# compute-sanitizer over the CUDA backend's GPU tests (needs a GPU and the built extension).
#
#   tests/gpu/run_sanitizer.sh            # memcheck on the small shapes, racecheck + synccheck on a few
#   SANITIZER_K="decode and bfloat16" tests/gpu/run_sanitizer.sh   # narrow the memcheck selection
#
# PYTORCH_NO_CUDA_MEMORY_CACHING=1 gives every tensor its own cudaMalloc, so an access past a
# tensor's end is outside any allocation and memcheck reports it (inside the caching allocator's
# pools it would go unnoticed). Exits non-zero on the first report.
set -euo pipefail
cd "$(dirname "$0")/../.."

SANITIZER="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || true)}"
if [[ -z "$SANITIZER" ]]; then
  for candidate in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    [[ -x "$candidate" ]] && SANITIZER="$candidate" && break
  done
fi
[[ -n "$SANITIZER" ]] || { echo "compute-sanitizer not found (set COMPUTE_SANITIZER)" >&2; exit 2; }

export PYTORCH_NO_CUDA_MEMORY_CACHING=1
TESTS=tests/gpu/test_cuda_kernels.py
SELECT="${SANITIZER_K:-not real_shapes and not graph and (one or mixed_scales) and (T1 or T65)}"
FLAGS=(--error-exitcode 1 --print-limit 20 --target-processes all)

echo "== memcheck: -k '$SELECT'"
"$SANITIZER" --tool memcheck --leak-check no "${FLAGS[@]}" python -m pytest -q -x -p no:cacheprovider "$TESTS" -k "$SELECT"

echo "== racecheck + synccheck: shared-memory kernels (prefill, index)"
for tool in racecheck synccheck; do
  "$SANITIZER" --tool "$tool" "${FLAGS[@]}" python -m pytest -q -x -p no:cacheprovider "$TESTS" \
    -k "test_paths_match_reference and mixed_scales and T65 and d40-ff96-G16 and bfloat16"
done
echo "== compute-sanitizer: clean"
