#!/usr/bin/env bash
# Everything the GPU has to do, in one device call of at most 10 minutes. Each
# stage has its own time budget (seconds), so a slow stage cannot eat the ones after it:
#   1. nvidia-smi and versions                                   -> env.txt
#   2. pytest tests/ on CUDA tensors, DECO_OPS_AUTOTUNE=0        -> pytest.log   (TESTS_S=300; the last 45 s
#      (one fixed config per kernel, nothing timed; test_aot is     go to the benchmark suite's agreement checks
#      compile-only and covered by the CPU suite)                   at the real shapes; 16 workers ran the
#                                                                   whole suite in 227 s on the H200)
#   3. compute-sanitizer, one tiny case per kernel               -> sanitizer.log (SANITIZER_S=60)
#   4. acceptance_bench.py, when copied into the repository root -> acceptance_bench.json + acceptance.log
#      (the team's independent speed check, ../shared/gpu/)           (ACCEPT_S=100)
#   5. python -m benchmarks, every named shape                   -> results/{results.json,results.md,speedup.png}
#                                                                   + benchmarks.log (BENCH_S=100)
#   6. python -m benchmarks.profile_ops: host vs GPU per call    -> profile.txt (PROFILE_S=30)
#      (after each stage: the strategy decisions of stages 4-6   -> strategy.json)
#   7. python -m deco_ops.tune, if time remains: the GPU's table -> tuning/<GPU>.json + tune.log (TUNE_S=120),
#      copied into deco_ops/tuning/ for anything run after this script (commit it with the results)
# Stages 2 and 3 check correctness only, so they run side by side (pytest on TEST_WORKERS xdist
# workers where pytest-xdist is installed: compiling hundreds of kernel variants is CPU-bound), and
# beside them a warm-up (step "warm", -> warm.log) runs stages 4 and 5 once untimed-for-the-record:
# their torch.compile baselines and Triton kernels compile then, into the on-disk caches, so the
# timed stages, which run alone, spend their budget timing. The warm-up's strategy choices
# (measured while the tests load the GPU) go to a throwaway DECO_OPS_CACHE_DIR. DECO_OPS_GPU_PACK=FILE.tgz packs OUT_DIR into one archive after every
# stage, written beside and then moved into place (a call killed mid-pack keeps the previous one):
# the device tool brings back at most 8 files, and the run writes about 16. FILE must lie outside
# OUT_DIR (the script refuses otherwise: the archive would hold itself and travel beside 16 files).
# Installs nothing beyond making this checkout importable (pip install -e . --no-deps, offline).
#
# Usage, from the repository root (on the device, where the tool sets $OUT: with no OUT_DIR the
# run writes to a temporary folder and packs it into $OUT/gpu_run.tgz):
#   DECO_OPS_COMMIT=$(git rev-parse HEAD) bash benchmarks/run_gpu.sh [OUT_DIR]
# Knobs: DECO_OPS_GPU_BUDGET (seconds for the whole script, default 560: a 600 s device call keeps
#        40 s for the last stage's kill margin and the final pack; no stage starts with under 20 s left),
#        DECO_OPS_GPU_STEPS (any of "warm tests sanitizer accept bench profile tune", default all seven),
#        TESTS_S / SANITIZER_S / ACCEPT_S / BENCH_S / PROFILE_S / TUNE_S (stage budgets), TEST_WORKERS (default 16),
#        DECO_OPS_TUNE_ARGS (extra arguments to python -m deco_ops.tune, e.g. "--dtypes bf16 fp16"),
#        DECO_OPS_BENCH_ARGS (extra arguments to python -m benchmarks, e.g. "--shapes llava15_7b").
# Then copy OUT_DIR/results to benchmarks/results/<device>-<date>/ and OUT_DIR/tuning/*.json to
# deco_ops/tuning/, and commit them; python -m benchmarks.readme_table <that folder> --write README.md
# refreshes the README table.
set -u
cd "$(dirname "$0")/.."
PACK=${DECO_OPS_GPU_PACK:-}
if [ -n "${1:-}" ]; then
  OUT_DIR=$1
elif [ -n "${OUT:-}" ]; then  # the device tool's folder: only its 8 largest files come back, so one archive
  OUT_DIR=$(mktemp -d)
  PACK=${PACK:-$OUT/gpu_run.tgz}
else
  OUT_DIR=benchmarks/results/gpu-run
fi
mkdir -p "$OUT_DIR/results" "$OUT_DIR/tuning"
if [ -n "$PACK" ]; then
  case "$(realpath -m "$PACK")/" in "$(realpath -m "$OUT_DIR")"/*)
    echo "DECO_OPS_GPU_PACK=$PACK lies inside OUT_DIR=$OUT_DIR: pack to a file outside it (e.g. \$OUT/gpu_run.tgz with OUT_DIR under /tmp)"
    exit 2;;
  esac
fi
BUDGET=${DECO_OPS_GPU_BUDGET:-560}
STEPS=${DECO_OPS_GPU_STEPS:-"warm tests sanitizer accept bench profile tune"}
TESTS_S=${TESTS_S:-300} SANITIZER_S=${SANITIZER_S:-60} ACCEPT_S=${ACCEPT_S:-100} BENCH_S=${BENCH_S:-100}
PROFILE_S=${PROFILE_S:-30} TUNE_S=${TUNE_S:-120} TEST_WORKERS=${TEST_WORKERS:-16}
export PYTHONUNBUFFERED=1
unset DECO_OPS_BACKEND TRITON_INTERPRET
PY=${PYTHON:-python3}
# seconds a stage may run: its budget, never past the script's (at least 1)
cap() { local l=$((BUDGET - SECONDS)); local want=$(( $1 < l ? $1 : l )); echo $(( want < 1 ? 1 : want )); }
# whether a stage is selected and at least 20 s of the budget remain to start it
has_step() { case " $STEPS " in *" $1 "*) [ $((BUDGET - SECONDS)) -ge 20 ] && return 0 || echo "== $1: skipped, $((BUDGET - SECONDS))s left";; esac; return 1; }
# Strategy decisions made while the tests, the sanitizer and the warm-up load the GPU go to a
# throwaway cache; the timed stages (4-7) decide afresh into their own, kept beside the results as
# strategy.json (key -> winning candidate: which of fused, composed_*, ATen's pooling ... auto
# picked where, host time included).
TIMED_CACHE=$(mktemp -d)
export DECO_OPS_CACHE_DIR=$(mktemp -d)
pack() {
  cp "$TIMED_CACHE/strategy.json" "$OUT_DIR/strategy.json" 2>/dev/null
  [ -z "$PACK" ] || { tar -C "$OUT_DIR" -czf "$PACK.tmp" . && mv -f "$PACK.tmp" "$PACK"; }
}

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

if has_step sanitizer; then
  if command -v compute-sanitizer >/dev/null; then
    S=$(cap "$SANITIZER_S")
    echo "== compute-sanitizer memcheck (cap ${S}s), beside the tests"
    # strategy fused: the kernels themselves are what memcheck is for, and nothing is timed under it
    (PYTORCH_NO_CUDA_MEMORY_CACHING=1 DECO_OPS_AUTOTUNE=0 DECO_OPS_STRATEGY=fused timeout -k 10 "$S" \
      compute-sanitizer --tool memcheck --error-exitcode 99 $PY -m benchmarks.sanitize_cases \
      >"$OUT_DIR/sanitizer.log" 2>&1
     echo "sanitizer exit $? (99 = memcheck errors; 124 = timed out)" >>"$OUT_DIR/sanitizer.log") &
  else
    echo "compute-sanitizer not on PATH" | tee "$OUT_DIR/sanitizer.log"
  fi
fi

if has_step warm; then
  W=$(cap "$TESTS_S")
  echo "== warm-up of the timed stages' compiles (cap ${W}s), beside the tests"
  (export DECO_OPS_CACHE_DIR=$(mktemp -d)
   END=$((SECONDS + W))
   [ -f acceptance_bench.py ] && timeout -k 10 $((W / 2)) $PY acceptance_bench.py
   LEFT=$((END - SECONDS))
   [ $LEFT -gt 20 ] && timeout -k 10 $LEFT $PY -m benchmarks --out "$(mktemp -d)" --time-limit $((LEFT / 2)) \
     ${DECO_OPS_BENCH_ARGS:-}) >"$OUT_DIR/warm.log" 2>&1 &
fi

if has_step tests; then
  T=$(cap "$TESTS_S")
  XDIST=""
  $PY -c "import xdist" 2>/dev/null && XDIST="-n $TEST_WORKERS"
  echo "== pytest tests/ on CUDA, DECO_OPS_AUTOTUNE=0, ${XDIST:-one process} (cap ${T}s, then the benchmarks' agreement checks)"
  # SIGINT first: pytest then still prints its summary of what ran. -v writes each test's outcome as
  # it ends: an interrupted xdist session can lose its summary (seen on the H200, 2026-12-04)
  DECO_OPS_AUTOTUNE=0 timeout -s INT -k 15 $((T > 90 ? T - 45 : T * 4 / 5)) $PY -m pytest tests -v -rfE -p no:cacheprovider $XDIST \
    --maxfail=200 --ignore=tests/test_aot.py --ignore=tests/test_aot_doc.py --ignore=tests/test_packaging.py \
    --ignore=tests/test_mutants.py --durations=15 2>&1 | tee "$OUT_DIR/pytest.log" \
    | grep -E "passed|failed|FAILED|ERROR" | tail -30
  echo "pytest exit ${PIPESTATUS[0]} (124 = timed out)" | tee -a "$OUT_DIR/pytest.log"
  DECO_OPS_AUTOTUNE=0 timeout -s INT -k 10 $((T > 90 ? 45 : T / 5)) $PY -m pytest benchmarks -q -p no:cacheprovider $XDIST \
    --benchmark-disable -k "agrees or counts" 2>&1 | tee -a "$OUT_DIR/pytest.log" | tail -5
  DECO_OPS_AUTOTUNE=0 timeout -k 5 "$(cap 30)" $PY -m benchmarks.profile_ops --launches 2>&1 | tee "$OUT_DIR/launch_us.txt" | tail -4  # host us per launch, DECO_OPS_DIRECT_LAUNCH off/on
fi
wait  # the sanitizer and the warm-up
if has_step sanitizer; then
  grep -E "ran|skipped|FAILED|ERROR SUMMARY|Invalid|exit" "$OUT_DIR/sanitizer.log" | head -20
fi
pack
export DECO_OPS_CACHE_DIR=$TIMED_CACHE

if has_step accept; then
  if [ -f acceptance_bench.py ]; then
    T=$(cap "$ACCEPT_S")
    echo "== acceptance_bench.py (cap ${T}s)"
    timeout -k 10 "$T" $PY acceptance_bench.py --out "$OUT_DIR" >"$OUT_DIR/acceptance.log" 2>&1
    echo "acceptance exit $? (124 = timed out)" | tee -a "$OUT_DIR/acceptance.log"
    tail -30 "$OUT_DIR/acceptance.log"
  else
    echo "acceptance_bench.py not in the repository root: copy ../shared/gpu/acceptance_bench.py there"
  fi
  pack
fi

if has_step bench; then
  T=$(cap "$BENCH_S")
  echo "== python -m benchmarks (cap ${T}s; starts no new shape after $((T > 60 ? T - 40 : 15))s)"
  timeout -k 10 "$T" $PY -m benchmarks --out "$OUT_DIR/results" --time-limit $((T > 60 ? T - 40 : 15)) \
    ${DECO_OPS_BENCH_ARGS:-} >"$OUT_DIR/benchmarks.log" 2>&1
  echo "benchmarks exit $?"
  # the end of the log is the bar check; the markdown tables are in results/results.md
  tail -40 "$OUT_DIR/benchmarks.log"
  pack
fi
if has_step profile; then
  T=$(cap "$PROFILE_S")
  echo "== python -m benchmarks.profile_ops (cap ${T}s)"
  timeout -k 5 "$T" $PY -m benchmarks.profile_ops --out "$OUT_DIR/profile.txt" >"$OUT_DIR/profile.log" 2>&1
  echo "profile exit $? (124 = timed out)"
  grep -E "^(pool_mlp|cross_attention|merge_mlp)-" "$OUT_DIR/profile.txt" | head -40
  pack
fi

if has_step tune; then
  T=$(cap "$TUNE_S")
  echo "== python -m deco_ops.tune (cap ${T}s; starts no new shape after $((T * 2 / 3))s)"
  timeout -k 10 "$T" $PY -m deco_ops.tune --out "$OUT_DIR/tuning/" --time-limit $((T * 2 / 3)) \
    ${DECO_OPS_TUNE_ARGS:-} >"$OUT_DIR/tune.log" 2>&1
  echo "tune exit $? (124 = timed out; the table holds the shapes finished before)" >>"$OUT_DIR/tune.log"
  tail -4 "$OUT_DIR/tune.log"
  cp "$OUT_DIR"/tuning/*.json deco_ops/tuning/ 2>/dev/null && echo "table installed in deco_ops/tuning/ (for later runs)"
  pack
fi

echo "== done in ${SECONDS}s; files under $OUT_DIR"
