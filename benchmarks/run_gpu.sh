#!/usr/bin/env bash
# Everything the H100 has to do, in one device call of at most 10 minutes:
#   1. nvidia-smi and versions            -> env.txt
#   2. pytest tests/ on CUDA              -> pytest.log   (plus the benchmark suite's agreement checks
#                                                          at the real shapes)
#   3. compute-sanitizer, one tiny case per kernel        -> sanitizer.log
#   4. python -m benchmarks, every named shape            -> results/{results.json,results.md,speedup.png}
#                                                            + benchmarks.log
# Installs nothing beyond making this checkout importable (pip install -e . --no-deps, offline).
#
# Usage, from the repository root (on the device: the tool's $OUT is the default folder):
#   DECO_OPS_COMMIT=$(git rev-parse HEAD) bash benchmarks/run_gpu.sh [OUT_DIR]
# Knobs: DECO_OPS_GPU_BUDGET (seconds for the whole script, default 570),
#        DECO_OPS_GPU_STEPS (any of "tests sanitizer bench", default all three),
#        DECO_OPS_BENCH_ARGS (extra arguments to python -m benchmarks, e.g. "--shapes llava15_7b").
# Then copy OUT_DIR/results to benchmarks/results/<device>-<date>/ and commit it;
# python -m benchmarks.readme_table <that folder> --write README.md refreshes the README table.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-benchmarks/results/gpu-run}}
BUDGET=${DECO_OPS_GPU_BUDGET:-570}
STEPS=${DECO_OPS_GPU_STEPS:-"tests sanitizer bench"}
mkdir -p "$OUT_DIR/results"
export PYTHONUNBUFFERED=1
unset DECO_OPS_BACKEND TRITON_INTERPRET
PY=${PYTHON:-python3}
left() { echo $((BUDGET - SECONDS)); }
cap() { local want=$1 l; l=$(( $(left) - ${2:-0} )); [ "$l" -lt "$want" ] && want=$l; [ "$want" -lt 1 ] && want=1; echo "$want"; }
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
  echo "== pytest tests/ (cap $(cap 240 330)s)"
  timeout -k 10 "$(cap 240 330)" $PY -m pytest tests -x -q -p no:cacheprovider 2>&1 | tee "$OUT_DIR/pytest.log" | tail -25
  echo "pytest exit ${PIPESTATUS[0]}" | tee -a "$OUT_DIR/pytest.log"
  timeout -k 10 "$(cap 60 300)" $PY -m pytest benchmarks -q -p no:cacheprovider --benchmark-disable -k "agrees or counts" \
    2>&1 | tee -a "$OUT_DIR/pytest.log" | tail -5
fi

if has_step sanitizer; then
  if command -v compute-sanitizer >/dev/null; then
    echo "== compute-sanitizer memcheck (cap $(cap 90 240)s)"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 "$(cap 90 240)" \
      compute-sanitizer --tool memcheck --error-exitcode 99 $PY -m benchmarks.sanitize_cases \
      >"$OUT_DIR/sanitizer.log" 2>&1
    echo "sanitizer exit $? (99 = memcheck errors; 124 = timed out)" | tee -a "$OUT_DIR/sanitizer.log"
    grep -E "ran|skipped|FAILED|ERROR SUMMARY|Invalid" "$OUT_DIR/sanitizer.log" | head -20
  else
    echo "compute-sanitizer not on PATH" | tee "$OUT_DIR/sanitizer.log"
  fi
fi

if has_step bench; then
  T=$(cap 100000 15)
  echo "== python -m benchmarks (cap ${T}s; starts no new shape after $((T - 75))s)"
  timeout -k 10 "$T" $PY -m benchmarks --out "$OUT_DIR/results" --time-limit $((T > 90 ? T - 75 : 15)) \
    ${DECO_OPS_BENCH_ARGS:-} >"$OUT_DIR/benchmarks.log" 2>&1
  echo "benchmarks exit $?"
  # the end of the log is the bar check; the markdown tables are in results/results.md
  tail -40 "$OUT_DIR/benchmarks.log"
fi
echo "== done in ${SECONDS}s; files under $OUT_DIR"
