#!/usr/bin/env bash
# Everything the GPU has to do, in one device call of at most 10 minutes. Each
# stage has its own time budget (seconds), so a slow stage cannot eat the ones after it:
#   1. nvidia-smi and versions                                   -> env.txt
#   2. pytest tests/ on CUDA tensors, DECO_OPS_AUTOTUNE=0        -> pytest.log   (TESTS_S=150; plus the
#      (one fixed config per kernel, nothing timed; test_aot is     benchmark suite's agreement checks
#      compile-only and covered by the CPU suite)                   at the real shapes)
#   3. compute-sanitizer, one tiny case per kernel               -> sanitizer.log (SANITIZER_S=60)
#   4. python -m deco_ops.tune: the GPU's tuning table           -> tuning/<GPU>.json + tune.log (TUNE_S=120),
#      copied into deco_ops/tuning/ so stage 5 (and anything run after this script) launches tuned configs
#   5. python -m benchmarks, every named shape                   -> results/{results.json,results.md,speedup.png}
#                                                                   + benchmarks.log (BENCH_S=150)
# Installs nothing beyond making this checkout importable (pip install -e . --no-deps, offline).
#
# Usage, from the repository root (on the device: the tool's $OUT is the default folder):
#   DECO_OPS_COMMIT=$(git rev-parse HEAD) bash benchmarks/run_gpu.sh [OUT_DIR]
# Knobs: DECO_OPS_GPU_BUDGET (seconds for the whole script, default 570; no stage starts past it),
#        DECO_OPS_GPU_STEPS (any of "tests sanitizer tune bench", default all four),
#        TESTS_S / SANITIZER_S / TUNE_S / BENCH_S (stage budgets),
#        DECO_OPS_TUNE_ARGS (extra arguments to python -m deco_ops.tune, e.g. "--dtypes bf16 fp16"),
#        DECO_OPS_BENCH_ARGS (extra arguments to python -m benchmarks, e.g. "--shapes llava15_7b").
# Then copy OUT_DIR/results to benchmarks/results/<device>-<date>/ and OUT_DIR/tuning/*.json to
# deco_ops/tuning/, and commit them; python -m benchmarks.readme_table <that folder> --write README.md
# refreshes the README table.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-benchmarks/results/gpu-run}}
BUDGET=${DECO_OPS_GPU_BUDGET:-570}
STEPS=${DECO_OPS_GPU_STEPS:-"tests sanitizer tune bench"}
TESTS_S=${TESTS_S:-150} SANITIZER_S=${SANITIZER_S:-60} TUNE_S=${TUNE_S:-120} BENCH_S=${BENCH_S:-150}
mkdir -p "$OUT_DIR/results" "$OUT_DIR/tuning"
export PYTHONUNBUFFERED=1
unset DECO_OPS_BACKEND TRITON_INTERPRET
PY=${PYTHON:-python3}
# seconds a stage may run: its budget, never past the script's (at least 1)
cap() { local l=$((BUDGET - SECONDS)); local want=$(( $1 < l ? $1 : l )); echo $(( want < 1 ? 1 : want )); }
has_step() { case " $STEPS " in *" $1 "*) return 0;; esac; return 1; }

{
  echo "== $(date -u +%FT%TZ)  commit ${DECO_OPS_COMMIT:-unknown}"
  nvidia-smi || echo "nvidia-smi failed"
  $PY - <<'PY'
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
PY
  if ! $PY -c "import deco_ops.kernels" 2>/dev/null; then
    echo "deco_ops not importable: pip install -e . --no-deps --no-build-isolation"
    $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . || echo "editable install failed"
  fi
  $PY -c "import deco_ops, deco_ops.kernels; print('deco_ops from', deco_ops.__file__)"
} 2>&1 | tee "$OUT_DIR/env.txt"

if has_step tests; then
  T=$(cap "$TESTS_S")
  echo "== pytest tests/ on CUDA, DECO_OPS_AUTOTUNE=0 (cap ${T}s, then the benchmarks' agreement checks)"
  DECO_OPS_AUTOTUNE=0 timeout -k 10 $((T * 4 / 5)) $PY -m pytest tests -q -p no:cacheprovider --maxfail=25 \
    --ignore=tests/test_aot.py --durations=15 -rs 2>&1 | tee "$OUT_DIR/pytest.log" | grep -E "passed|failed|FAILED|ERROR" | tail -30
  echo "pytest exit ${PIPESTATUS[0]} (124 = timed out)" | tee -a "$OUT_DIR/pytest.log"
  DECO_OPS_AUTOTUNE=0 timeout -k 10 $((T / 5)) $PY -m pytest benchmarks -q -p no:cacheprovider --benchmark-disable \
    -k "agrees or counts" 2>&1 | tee -a "$OUT_DIR/pytest.log" | tail -5
fi

if has_step sanitizer; then
  if command -v compute-sanitizer >/dev/null; then
    T=$(cap "$SANITIZER_S")
    echo "== compute-sanitizer memcheck (cap ${T}s)"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 DECO_OPS_AUTOTUNE=0 timeout -k 10 "$T" \
      compute-sanitizer --tool memcheck --error-exitcode 99 $PY -m benchmarks.sanitize_cases \
      >"$OUT_DIR/sanitizer.log" 2>&1
    echo "sanitizer exit $? (99 = memcheck errors; 124 = timed out)" | tee -a "$OUT_DIR/sanitizer.log"
    grep -E "ran|skipped|FAILED|ERROR SUMMARY|Invalid" "$OUT_DIR/sanitizer.log" | head -20
  else
    echo "compute-sanitizer not on PATH" | tee "$OUT_DIR/sanitizer.log"
  fi
fi

if has_step tune; then
  T=$(cap "$TUNE_S")
  echo "== python -m deco_ops.tune (cap ${T}s; starts no new shape after $((T * 2 / 3))s)"
  timeout -k 10 "$T" $PY -m deco_ops.tune --out "$OUT_DIR/tuning/" --time-limit $((T * 2 / 3)) \
    ${DECO_OPS_TUNE_ARGS:-} >"$OUT_DIR/tune.log" 2>&1
  echo "tune exit $? (124 = timed out; the table holds the shapes finished before)" >>"$OUT_DIR/tune.log"
  tail -4 "$OUT_DIR/tune.log"
  cp "$OUT_DIR"/tuning/*.json deco_ops/tuning/ 2>/dev/null && echo "table installed in deco_ops/tuning/"
fi

if has_step bench; then
  T=$(cap "$BENCH_S")
  echo "== python -m benchmarks (cap ${T}s; starts no new shape after $((T > 90 ? T - 75 : 15))s)"
  timeout -k 10 "$T" $PY -m benchmarks --out "$OUT_DIR/results" --time-limit $((T > 90 ? T - 75 : 15)) \
    ${DECO_OPS_BENCH_ARGS:-} >"$OUT_DIR/benchmarks.log" 2>&1
  echo "benchmarks exit $?"
  # the end of the log is the bar check; the markdown tables are in results/results.md
  tail -40 "$OUT_DIR/benchmarks.log"
fi
echo "== done in ${SECONDS}s; files under $OUT_DIR"
