#!/usr/bin/env bash
# One call on a GPU machine: (1) the GPU and versions, (2) the whole test suite on the GPU (not the
# Triton interpreter), (3) the quick benchmark, its summary table last.
#
#   bash bench/gpu_check.sh [--out DIR]      (from anywhere; default DIR: bench/results/<gpu-name>-<date>/)
#
# DIR receives gpu_check.log (everything printed), results.csv, env.json, summary.md, overview.png
# and plots.tar.gz (the per-pass PNGs, packed: the GPU runner returns few files).
# Exit status: 1 if any test failed (the benchmark still runs, to use the GPU time), else the
# benchmark's (1: an implementation was wrong or raised). Installs nothing: the GPU machines have
# torch and triton and no network. Time: under 8 minutes on an H100 (tests <= 260 s, bench <= 160 s
# by the timeouts below; the bench stops starting new cases after 110 s and records the rest as
# skipped).
#
# Testing this script without a GPU (the benchmark then runs its CPU smoke):
#   GPU_CHECK_ALLOW_CPU=1 GPU_CHECK_PYTEST_ARGS="tests/test_bench.py" bash bench/gpu_check.sh --out /tmp/x
# GPU_CHECK_FORCE_VIEW=1 uses the assembled package view (below) even where bn_triton is installed.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
TEST_TIMEOUT_S=${GPU_CHECK_TEST_TIMEOUT_S:-260}  # override only for a dry run on a slow CPU
BENCH_TIMEOUT_S=160
BENCH_BUDGET_S=110

OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="${2:?--out needs a folder}"; shift 2 ;;
    --out=*) OUT="${1#--out=}"; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (usage: bash bench/gpu_check.sh [--out DIR])" >&2; exit 2 ;;
  esac
done

# Kernels must compile for the GPU: never the interpreter.
unset TRITON_INTERPRET
cd "$REPO" || exit 2

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  if [ "${GPU_CHECK_ALLOW_CPU:-0}" != "1" ]; then
    echo "gpu_check.sh: no CUDA GPU visible to torch. This script is for GPU machines;" >&2
    echo "without a GPU run 'python -m bench' (the CPU smoke) and 'python3 -m pytest -q'." >&2
    exit 3
  fi
  echo "(GPU_CHECK_ALLOW_CPU=1: no GPU; the tests use the interpreter and the bench runs its smoke)"
fi

if [ -z "$OUT" ]; then
  OUT=$("$PY" -c "
import torch
from bench.__main__ import default_out_dir
print(default_out_dir(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'))")
fi
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)

# bn_triton.kernels lives in the repo's kernels/ folder and setuptools maps it at install time; on
# the GPU machines nothing is installed (and pip may not build offline). So, unless the package
# is importable as is, run from a temporary view of the repo: links to every top-level entry, and a
# real bn_triton/ folder whose files link to the repo's, with kernels/ linked inside it. Nothing is
# installed or copied, and the repo's own files are what runs.
make_view() {
  local view
  view="$(mktemp -d "${TMPDIR:-/tmp}/bn_triton_view.XXXXXX")/repo"
  mkdir -p "$view/bn_triton"
  for entry in "$REPO"/* "$REPO"/.[!.]*; do
    [ -e "$entry" ] || continue
    [ "$(basename "$entry")" = bn_triton ] && continue
    ln -s "$entry" "$view/$(basename "$entry")"
  done
  for entry in "$REPO"/bn_triton/*; do
    [ "$(basename "$entry")" = __pycache__ ] && continue
    ln -s "$entry" "$view/bn_triton/$(basename "$entry")"
  done
  ln -s "$REPO/kernels" "$view/bn_triton/kernels"
  echo "$view"
}

run_all() {
  local t0 test_rc bench_rc run_dir
  t0=$(date +%s)
  echo "== gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S UTC') repo $REPO, output $OUT"
  echo "== 1. GPU and versions"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
  else
    echo "(no nvidia-smi)"
  fi
  "$PY" - <<'EOF'
import platform, torch, triton, numpy
print(f"python {platform.python_version()}  torch {torch.__version__} (CUDA {torch.version.cuda})  "
      f"triton {triton.__version__}  numpy {numpy.__version__}")
print(f"cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}")
for mod in ("matplotlib", "pytest"):
    try:
        print(f"{mod} {__import__(mod).__version__}")
    except ImportError:
        print(f"{mod}: not installed")
EOF
  if [ "${GPU_CHECK_FORCE_VIEW:-0}" != "1" ] && "$PY" -c "import bn_triton.kernels" >/dev/null 2>&1; then
    run_dir="$REPO"
  else
    run_dir=$(make_view)
  fi
  (cd "$run_dir" && "$PY" -c "
import bn_triton, bn_triton.kernels
print('bn_triton from', bn_triton.__file__, '| kernels from', bn_triton.kernels.__file__)") || {
    echo "gpu_check.sh: cannot import bn_triton and bn_triton.kernels" >&2
    return 4
  }

  echo
  echo "== 2. test suite on the GPU (python3 -m pytest -q; limit ${TEST_TIMEOUT_S} s)"
  local ts
  ts=$(date +%s)
  # Most of the suite's time on a GPU is Triton compiling kernel variants, CPU-bound: with
  # pytest-xdist (preinstalled on the GPU machines) 8 workers share the 16 cores and the one GPU.
  # The suite is xdist-safe (checked on CPU: 369 passed with -n 2).
  local xdist=""
  "$PY" -c "import xdist" >/dev/null 2>&1 && xdist="-n ${GPU_CHECK_WORKERS:-8}"
  # shellcheck disable=SC2086  # GPU_CHECK_PYTEST_ARGS and xdist are lists of words on purpose
  (cd "$run_dir" && timeout -k 10 "$TEST_TIMEOUT_S" "$PY" -m pytest -q -rfE $xdist ${GPU_CHECK_PYTEST_ARGS:-})
  test_rc=$?
  [ "$test_rc" = 124 ] && echo "gpu_check.sh: the test suite ran past ${TEST_TIMEOUT_S} s and was stopped"
  echo "tests: exit status $test_rc in $(( $(date +%s) - ts )) s"

  echo
  echo "== 3. quick benchmark (limit ${BENCH_TIMEOUT_S} s)"
  ts=$(date +%s)
  (cd "$run_dir" && timeout -k 10 "$BENCH_TIMEOUT_S" "$PY" -m bench --quick --budget-s "$BENCH_BUDGET_S" --out "$OUT")
  bench_rc=$?
  echo "bench: exit status $bench_rc in $(( $(date +%s) - ts )) s"
  if [ -d "$OUT/plots" ]; then
    tar -czf "$OUT/plots.tar.gz" -C "$OUT" plots && rm -rf "$OUT/plots"
  fi

  echo
  echo "== 4. eager per-call overhead (bench/overhead.py: op path vs fast path vs direct launch; limit 90 s)"
  (cd "$run_dir" && timeout -k 10 90 "$PY" bench/overhead.py && timeout -k 10 60 "$PY" bench/overhead.py --stub) \
    || echo "gpu_check.sh: overhead measurement failed (not counted as a test failure)"

  echo
  echo "== gpu_check done in $(( $(date +%s) - t0 )) s: tests exit $test_rc, bench exit $bench_rc; files in $OUT:"
  ls -l "$OUT"
  if [ -f "$OUT/summary.md" ]; then
    echo
    cat "$OUT/summary.md"
  fi
  if [ "$run_dir" != "$REPO" ]; then
    rm -rf "$(dirname "$run_dir")"  # the view: links only (rm does not follow them) and caches
  fi
  if [ "$test_rc" != 0 ]; then
    return 1
  fi
  return "$bench_rc"
}

run_all 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
