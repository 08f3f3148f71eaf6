#!/usr/bin/env bash
# One call that verifies and measures everything on a lent GPU machine, within 8 minutes:
#
#   bash tools/gpu_check.sh               # on the GPU machine, from a copy of the working tree; files go to $OUT
#   bash tools/gpu_check.sh --cpu-smoke   # without a GPU: every stage's CPU half (CI runs this, so it cannot rot)
#
# Before a GPU run, `make gpu-wheels` puts the pure-Python test dependencies the GPU machine lacks (it has torch,
# triton, pytest, no network) into .gpu-wheels/, which the run must carry (it is git-ignored).
#
# Stages, each under its own time limit (a hang costs only its stage) and all under one deadline:
#   env        versions, nvidia-smi, `python -m mixprec info`
#   build      the extension against the machine's own torch (sm_90 only, all cores); CPU smoke: the same
#              editable install with the repo's default architectures (a no-op when the tree is built)
#   selftest   `python -m mixprec selftest --device cuda` (CPU smoke: --device cpu)
#   pytest     `pytest -m cuda` (CPU smoke: the same tests collected, not run)
#   bench      `python -m mixprec bench --device cuda --quick` (CPU smoke: --device cpu --reduced)
#   graph      tests/test_cuda_graph.py: a whole scaler + optimizer step captured in a CUDA graph and replayed
#   memcheck   compute-sanitizer memcheck over the CUDA backend's selftest cases (every CUDA kernel)
#   racecheck  compute-sanitizer racecheck over the kernels that use shared memory: the GEMM, and unscale's
#              block reduction of norm_sq (csrc/cuda/multi_tensor.cuh)
# Then tools/gpu_check_summary.py prints the table: per stage pass/fail/time, and per benchmark row the measured
# time beside the roofline prediction of `python -m mixprec inspect` for this GPU.
#
# Files in $OUT (at most 8, what the device tool brings back): gpu_check.log (everything), stages.tsv,
# summary.txt, bench.json, selftest.txt, pytest.txt, sanitizer.txt. Exit code: 0 when every stage passed.
set -uo pipefail

MODE=gpu
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) MODE=cpu ;;
    *) echo "usage: bash tools/gpu_check.sh [--cpu-smoke]" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/gpu-check-out}
mkdir -p "$OUT"
: > "$OUT/stages.tsv"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

# The machine's python on the GPU machine; the repo's venv where `make` made one (CI).
PY=${PYTHON:-python3}
[ -x "$ROOT/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && PY="$ROOT/.venv/bin/python"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_BUDGET_S:-470} ))  # 8 minutes, less the summary's few seconds

# stage NAME LIMIT_S COMMAND...: runs COMMAND under min(LIMIT_S, time left), records pass/fail/time.
stage() {
  local name=$1 limit=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) ))
  if [ "$left" -lt 10 ]; then
    printf '%s\tskipped\t0\tout of time\n' "$name" >> "$OUT/stages.tsv"
    echo "== $name: skipped (the 8-minute budget is spent)"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s): $*"
  local start=$(date +%s) rc
  # through bash so that a stage may be one of the functions below (exported before the stages run)
  timeout --kill-after=10 "$limit" bash -o pipefail -c '"$@"' stage "$@"
  rc=$?
  local took=$(( $(date +%s) - start ))
  local status=pass note=""
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=fail; note="timed out after ${limit} s"
  elif [ "$rc" -ne 0 ]; then status=fail; note="exit code $rc"; fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$took" "$note" >> "$OUT/stages.tsv"
  echo "== $name: $status (${took} s${note:+, $note})"
}

env_stage() {
  uname -a
  nvidia-smi 2>&1 | head -20 || true
  "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available())"
  "$PY" -c "import triton; print('triton', triton.__version__)" || true
  command -v compute-sanitizer nvcc || true
}

build_stage() {
  if [ "$MODE" = gpu ]; then export TORCH_CUDA_ARCH_LIST="9.0"; fi  # the H200's: one architecture, half the time
  # the GPU machine has no network: test dependencies it lacks travel with the tree (`make gpu-wheels`)
  if [ "$MODE" = gpu ] && compgen -G ".gpu-wheels/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps .gpu-wheels/*.whl || return 1
  fi
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  # the CPU smoke runs after `make test` in CI, which has built this tree with the same pip command: that
  # extension is reused when nothing it is built from is newer, so that CI builds once (a second editable
  # install rebuilds from scratch: ~2 minutes). The GPU machine always builds (its own torch, one architecture).
  if [ "$MODE" = cpu ]; then
    local so
    so=$(compgen -G "mixprec/_C*.so" | head -1 || true)
    if [ -n "$so" ] && [ -z "$(find csrc setup.py pyproject.toml -newer "$so" -print -quit)" ] &&
        "$PY" -c "import sys, mixprec._ext as e; sys.exit(0 if e.available() else 1)"; then
      echo "CPU smoke: reusing the extension already built in this tree ($so, newer than csrc/, setup.py, pyproject.toml)"
      "$PY" -m mixprec info
      return
    fi
  fi
  if ! "$PY" -m pip install -q --no-build-isolation --no-deps -e .; then
    # no usable pip (or no write access to site-packages): build in place, and give the package the folders
    # setup.py maps into it; every later stage runs from this folder, so `import mixprec` finds them
    echo "editable install failed: building in place instead"
    "$PY" setup.py -q build_ext --inplace || return 1
    for d in kernels benchmarks examples; do ln -sfn "../$d" "mixprec/$d"; done
  fi
  "$PY" -m mixprec info
}

sanitize() {  # sanitize TOOL SELFTEST-FILTERS...: compute-sanitizer over selftest cases, report appended
  local tool=$1; shift
  if [ "$MODE" = cpu ]; then
    echo "CPU smoke: compute-sanitizer --tool $tool skipped (no GPU); its selftest cases run on the CPU instead"
    "$PY" -m mixprec selftest --device cpu --no-bench "$@"
    return
  fi
  echo "### $tool $*" >> "$OUT/sanitizer.txt"
  compute-sanitizer --tool "$tool" --error-exitcode 1 --log-file "$OUT/sanitizer.$tool.tmp" \
    "$PY" -m mixprec selftest --device cuda --no-bench --backend cuda "$@"
  local rc=$?
  cat "$OUT/sanitizer.$tool.tmp" >> "$OUT/sanitizer.txt" 2>/dev/null
  rm -f "$OUT/sanitizer.$tool.tmp"
  return $rc
}

bench_stage() {  # the table goes to the log; of the bench's files only results.json is kept (as bench.json)
  # a limit per script inside the stage's: a slow script (Triton autotuning, say) costs its own rows only, and the
  # others' still reach results.json
  "$PY" -m mixprec bench --device "$DEVICE" $BENCH_SIZE --timeout 55 --output "$OUT/bench"
  local rc=$?
  [ -f "$OUT/bench/results.json" ] && cp "$OUT/bench/results.json" "$OUT/bench.json"
  rm -rf "$OUT/bench"
  return $rc
}

echo "mixprec gpu_check ($MODE mode) in $ROOT, files to $OUT, started $(date -u +%FT%TZ)"
if [ "$MODE" = gpu ]; then DEVICE=cuda; BENCH_SIZE=--quick; else DEVICE=cpu; BENCH_SIZE=--reduced; fi
: > "$OUT/sanitizer.txt"

export MODE PY OUT DEVICE BENCH_SIZE
export -f env_stage build_stage bench_stage sanitize

stage env 30 env_stage
stage build 240 build_stage
stage selftest 90 bash -o pipefail -c "'$PY' -m mixprec selftest --device $DEVICE --no-bench | tee '$OUT/selftest.txt'"
if [ "$MODE" = gpu ]; then
  stage pytest 120 bash -o pipefail -c "'$PY' -m pytest -q -m cuda -p no:cacheprovider --ignore=tests/test_cuda_graph.py | tee '$OUT/pytest.txt'"
else
  stage pytest 60 bash -o pipefail -c "'$PY' -m pytest -q -m cuda --collect-only -p no:cacheprovider | tee '$OUT/pytest.txt'"
fi
stage bench 180 bench_stage
if [ "$MODE" = gpu ]; then
  stage graph 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py
else
  stage graph 30 "$PY" -m pytest -q --collect-only -p no:cacheprovider tests/test_cuda_graph.py
fi
stage memcheck 120 sanitize memcheck
stage racecheck 60 sanitize racecheck --op matmul --op matmul_accumulate_ --op unscale_and_check_

"$PY" tools/gpu_check_summary.py "$OUT" --mode "$MODE" | tee "$OUT/summary.txt"
exit "${PIPESTATUS[0]}"
