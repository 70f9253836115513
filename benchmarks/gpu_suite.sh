#!/usr/bin/env bash
# persona-kernels GPU suite: build, GPU tests, every GPU benchmark, one results folder, summary last.
#
#   bash benchmarks/gpu_suite.sh            # GPU machine: fits 8 minutes on one H100 (SUITE_BUDGET_S, default 470)
#   bash benchmarks/gpu_suite.sh --smoke    # any CPU: tiny shapes, no build, no pytest (CI covers those)
#
# Knobs (environment): SUITE_BUDGET_S (seconds in all), SUITE_SKIP="memory switch" (steps to leave
# out, e.g. when rerunning only what failed), KERNELS_CAP_S (the kernels step's box, default 70),
# KERNELS_ARGS (extra bench_gpu_kernels.py flags, e.g. "--tokens 1 16 64 --densities 0.5"),
# TESTS_ARGS / TESTS_CAP_S (pytest files and -k of the tests step, its box), DECODE_ARGS /
# DECODE_CAP_S (extra benchmarks.serving.decode flags, e.g. "--backend cuda --shapes 8b"),
# SANITIZER_MIN_S (seconds kept for the sanitizer step after decode, default 8).
#
# Steps (each under `timeout`, so one slow part cannot eat the lease; a step gets
# min(its cap, budget left - the minimum boxes of the steps after it), and time a step does not
# use flows on to the next):
#   env      nvidia-smi, versions
#   build    pip install --no-build-isolation -e .   (CPU + CUDA extensions)
#   tests    python -m pytest -m "not slow" on the files with GPU tests (tests/gpu first, then
#            test_cuda_build, test_triton, test_masked_ffn, test_hf), one Triton config per kernel,
#            stopped by SIGINT before its box ends
#   kernels  benchmarks/bench_gpu_kernels.py          (kernel level, Triton engineer's; skipped if absent)
#   switch   python -m benchmarks.serving.switch     (persona switch vs pre-sliced copy vs LoRA; graph checks)
#   memory   python -m benchmarks.serving.memory     (bytes per persona)
#   decode   python -m benchmarks.serving.decode     (end-to-end HF decode, 8B then 1B; skips configs past its budget)
#   sanitizer tests/gpu/run_sanitizer.sh             (compute-sanitizer; whatever budget is left)
#   summary  python -m benchmarks.serving.summary    (verdict table; printed last)
#
# Results: all JSON lines, PNGs and logs go to the work folder: benchmarks/out/<UTC timestamp>/
# without $OUT. With $OUT set (the GPU machine returns at most 8 files from it), the work folder is
# under /tmp and $OUT receives, after every step: results.tar.gz (everything), summary.md and the
# main plots (decode_speedup.png, decode_throughput.png, switch.png, memory.png, kernels_speedup.png).
set -uo pipefail

cd "$(dirname "$0")/.."
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
PY="${PYTHON:-python3}"
BUDGET="${SUITE_BUDGET_S:-470}"
SCALE=1  # CPU smoke runs Triton through its interpreter: looser boxes
if [[ $SMOKE == 1 ]]; then SCALE=4; BUDGET="${SUITE_BUDGET_S:-1800}"; fi
STAMP="$(date -u +%Y%m%d-%H%M%S)"
if [[ -n "${OUT:-}" ]]; then
  WORK="${TMPDIR:-/tmp}/persona-kernels-suite-$STAMP"
  mkdir -p "$OUT"
else
  WORK="benchmarks/out/$STAMP"
fi
mkdir -p "$WORK/logs"
STATUS="$WORK/suite_status.tsv"
printf 'step\texit\tseconds\tbox_s\n' > "$STATUS"
START=$(date +%s)
SMOKE_FLAG=()
[[ $SMOKE == 1 ]] && SMOKE_FLAG=(--smoke)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

elapsed() { echo $(( $(date +%s) - START )); }

publish() {  # copy the results to $OUT (at most 8 files come back from there)
  [[ -z "${OUT:-}" ]] && return 0
  tar czf "$OUT/results.tar.gz.partial" -C "$WORK" . 2>/dev/null && mv "$OUT/results.tar.gz.partial" "$OUT/results.tar.gz"
  [[ -f "$WORK/summary.md" ]] && cp "$WORK/summary.md" "$OUT/"
  for png in serving/decode_speedup.png serving/decode_throughput.png serving/switch.png serving/memory.png; do
    [[ -f "$WORK/$png" ]] && cp "$WORK/$png" "$OUT/"
  done
  [[ -f "$WORK/kernels/speedup.png" ]] && cp "$WORK/kernels/speedup.png" "$OUT/kernels_speedup.png"
  return 0
}

# run_step NAME CAP MIN_AFTER CMD...: run CMD under `timeout`, log to logs/NAME.log, record status.
run_step() {
  local name=$1 cap=$(( $2 * SCALE )) reserve=$(( $3 * SCALE ))
  shift 3
  if [[ " ${SUITE_SKIP:-} " == *" $name "* ]]; then
    printf '%s\tskipped(SUITE_SKIP)\t0\t0\n' "$name" >> "$STATUS"
    echo "[suite $(elapsed)s] $name: skipped (SUITE_SKIP)"
    return 0
  fi
  local left=$(( BUDGET - $(elapsed) - reserve ))
  local box=$(( cap < left ? cap : left ))
  if (( box < 10 )); then
    printf '%s\tskipped(budget)\t0\t%s\n' "$name" "$box" >> "$STATUS"
    echo "[suite $(elapsed)s] $name: skipped, budget spent"
    return 0
  fi
  echo "[suite $(elapsed)s] $name: start (box ${box}s): $*"
  local t0=$(date +%s)
  STEP_BOX=$box timeout --signal=TERM --kill-after=10 "$box" "$@" > "$WORK/logs/$name.log" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - t0 ))
  [[ $rc == 124 || $rc == 137 ]] && rc="timeout($rc)"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$took" "$box" >> "$STATUS"
  echo "[suite $(elapsed)s] $name: exit $rc after ${took}s"
  if [[ $rc != 0 ]]; then tail -n 8 "$WORK/logs/$name.log" | sed "s/^/    $name| /"; fi
  publish
}

echo "persona-kernels GPU suite: work folder $WORK, budget ${BUDGET}s, smoke=$SMOKE"

run_step env 20 0 bash -c "nvidia-smi || true; $PY -c 'import torch, sys; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())'; $PY -c 'import triton, transformers; print(\"triton\", triton.__version__, \"transformers\", transformers.__version__)'; which nvcc && nvcc --version | tail -2"

if [[ $SMOKE == 1 ]]; then
  printf 'build\tskipped(smoke)\t0\t0\ntests\tskipped(smoke)\t0\t0\n' >> "$STATUS"
  echo "[suite] build, tests: skipped in --smoke (CI builds and runs pytest)"
else
  run_step build 150 230 env MAX_JOBS="${MAX_JOBS:-16}" PERSONA_KERNELS_MAX_JOBS="${MAX_JOBS:-16}" \
    "$PY" -m pip install --no-build-isolation --no-deps -e .
  # GPU-relevant files only (CI runs the rest): no-JIT CUDA tests first, then the real-shape and graph
  # tests, then the small-shape matrices. One Triton config per kernel (no autotuning: a third of the
  # compiles; the kernels benchmark autotunes and checks every config it picks). SIGINT before the
  # box ends makes pytest stop and still print its failure summary.
  TESTS_ARGS="${TESTS_ARGS:-tests/gpu/test_cuda_kernels.py tests/test_cuda_build.py tests/gpu/test_triton_kernels.py \
    tests/gpu/test_hf_backends.py tests/test_triton.py tests/test_masked_ffn.py tests/test_hf.py}"
  run_step tests "${TESTS_CAP_S:-75}" 185 bash -c "PERSONA_KERNELS_TRITON_AUTOTUNE=0 timeout --signal=INT \$((STEP_BOX - 8)) \
    $PY -m pytest -q -p no:cacheprovider --maxfail=25 -rfE -m 'not slow' $TESTS_ARGS"
fi

if [[ -f benchmarks/bench_gpu_kernels.py ]]; then
  run_step kernels "${KERNELS_CAP_S:-70}" 150 bash -c "$PY benchmarks/bench_gpu_kernels.py ${SMOKE_FLAG[*]} --out '$WORK/kernels' --rep-ms 50 --budget-s \$((STEP_BOX - 20)) ${KERNELS_ARGS:-}"
else
  printf 'kernels\tabsent\t0\t0\n' >> "$STATUS"
fi

run_step switch 45 120 "$PY" -m benchmarks.serving.switch "${SMOKE_FLAG[@]}" --out "$WORK/serving"
run_step memory 40 90 "$PY" -m benchmarks.serving.memory "${SMOKE_FLAG[@]}" --no-disk --out "$WORK/serving"
run_step decode "${DECODE_CAP_S:-240}" "${SANITIZER_MIN_S:-8}" bash -c "$PY -m benchmarks.serving.decode ${SMOKE_FLAG[*]} --out '$WORK/serving' --time-budget \$((STEP_BOX - 30)) ${DECODE_ARGS:-}"

if [[ $SMOKE == 0 ]]; then  # whatever budget is left: compute-sanitizer over the CUDA kernels
  run_step sanitizer 300 0 bash tests/gpu/run_sanitizer.sh
fi

"$PY" -m benchmarks.serving.summary "$WORK" > "$WORK/logs/summary.log" 2>&1
publish
echo
echo "==== per-step logs: $WORK/logs ; results: $WORK${OUT:+ (copied to \$OUT: results.tar.gz, summary.md, plots)}"
echo "==== total $(elapsed)s"
cat "$WORK/logs/summary.log"
