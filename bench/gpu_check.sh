#!/usr/bin/env bash
# One call on a GPU machine, within 8 minutes on an H100: (1) the GPU and versions, (2) the whole
# test suite on the GPU, GPU-only tests included (not the Triton interpreter), (3) the ResNet-50
# training step, then EfficientNet-B0's (BN -> SiLU, fused or not; python -m bench.e2e), (4) suite
# v1 (python -m bench: wall, host and device time), (5) the host cost per call, its cProfile, the
# same with kernels stubbed (bench/overhead.py), the single-pass kernels against the split path where
# they serve (--impls bn_triton,bn_triton_split), (6) the comparison against torch.compile
# (python -m bench --quick --impls bn_triton,compile), then a summary, printed last.
#
#   bash bench/gpu_check.sh [--out DIR]      (from anywhere; default DIR: bench/results/<gpu-name>-<date>/)
#
# DIR receives at most 8 files, no folders:
#   gpu_check.log  everything printed          summary.md   stages, test failures, e2e and bench tables
#   results.csv    suite v1 (host_ms, device_ms) compile.csv  the torch.compile comparison
#   e2e.csv        model,config,variant,batch,step_ms,launches, both models
#                                              env.json     versions (suite v1's run)
#   overview.png   suite v1 on one page        plots.tar.gz the rest: the comparison's overview.png,
#                  summary.md and env.json, pytest.xml (JUnit), e2e.md, e2e_silu.md, precompile.log
# Time: every stage runs under `timeout`, and the limits add up to GPU_CHECK_TOTAL_S (465 s) even if
# one hangs. Planned limits (seconds): tests 150, e2e 90 (of it the last E2E_SILU_S, 30, for
# EfficientNet-B0: bf16 channels_last, torch then bn_triton_fused then bn_triton), suite v1 90,
# compile comparison 100 (of it ~20 s for the host-cost profile, ~10 s for it with kernels stubbed and
# ~30 s for the single-pass comparison); the time a stage leaves unused goes to the next one. The
# benches get --budget-s below their limit (start no new case after it), so they end on their own
# with partial results recorded. While the tests run (CPU-bound: Triton compiles), a background run
# of e2e steps, untimed, fills the Triton and inductor caches (EfficientNet-B0's bn_triton kernels
# first, then ResNet-50's compiled steps) so that the timed e2e stage does not spend its time compiling.
# Exit status: 1 if a test failed or the tests did not finish (or run), or a bench found bn_triton wrong
# (its exit 1); else 0. Installs nothing: the GPU machines have torch, triton, torchvision and
# pytest-xdist, and no network.
#
# Testing this script without a GPU (the tests use the interpreter, the benches run their smokes):
#   GPU_CHECK_ALLOW_CPU=1 GPU_CHECK_PYTEST_ARGS="tests/test_e2e.py" bash bench/gpu_check.sh --out /tmp/x
# GPU_CHECK_FORCE_VIEW=1 uses the assembled package view (below) even where bn_triton is installed;
# GPU_CHECK_STAGES (default "tests,e2e,bench,compare") picks stages; GPU_CHECK_PRECOMPILE=0/1
# (default: 1 on a GPU) the background warm-up; GPU_CHECK_TOTAL_S the total time;
# GPU_CHECK_WORKERS the pytest-xdist workers (default 12; 0: no xdist).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
TOTAL_S=${GPU_CHECK_TOTAL_S:-465}
STAGES=${GPU_CHECK_STAGES:-tests,e2e,bench,compare}
# Planned limits in seconds, in the order the stages run.
PLAN_TESTS=150
PLAN_E2E=90
PLAN_BENCH=90
PLAN_COMPARE=100
# Of the e2e stage, the seconds kept for the SiLU network after ResNet-50 (it gets more if ResNet-50
# ends early).
E2E_SILU_S=30
SILU_MODEL=efficientnet_b0

OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="${2:?--out needs a folder}"; shift 2 ;;
    --out=*) OUT="${1#--out=}"; shift ;;
    -h|--help) sed -n '2,37p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (usage: bash bench/gpu_check.sh [--out DIR])" >&2; exit 2 ;;
  esac
done

T0=$(date +%s)
# Kernels must compile for the GPU: never the interpreter.
unset TRITON_INTERPRET
cd "$REPO" || exit 2

GPU=1
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  if [ "${GPU_CHECK_ALLOW_CPU:-0}" != "1" ]; then
    echo "gpu_check.sh: no CUDA GPU visible to torch. This script is for GPU machines;" >&2
    echo "without a GPU run 'python -m bench' (the CPU smoke) and 'python3 -m pytest -q'." >&2
    exit 3
  fi
  GPU=0
  echo "(GPU_CHECK_ALLOW_CPU=1: no GPU; the tests use the interpreter and the benches run their smokes)"
fi
PRECOMPILE=${GPU_CHECK_PRECOMPILE:-$GPU}

if [ -z "$OUT" ]; then
  OUT=$("$PY" -c "
import torch
from bench.__main__ import default_out_dir
print(default_out_dir(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'))")
fi
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/bn_triton_gpu_check.XXXXXX") || exit 2
mkdir -p "$WORK/bench" "$WORK/compare" "$WORK/e2e" "$WORK/e2e_silu" "$WORK/extras"

# bn_triton.kernels lives in the repo's kernels/ folder and setuptools maps it at install time; on
# the GPU machines nothing is installed (and pip may not build offline). So, unless the package
# is importable as is, run from a temporary view of the repo: links to every top-level entry, and a
# real bn_triton/ folder whose files link to the repo's, with kernels/ linked inside it. Nothing is
# installed or copied, and the repo's own files are what runs.
make_view() {
  local view
  view="$WORK/view/repo"
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

want() { case ",$STAGES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# The limit of a stage: the time left, less the plans of the wanted stages after it and 10 s to pack
# and summarize; so a stage gets its plan plus whatever the earlier ones left unused.
limit_for() {
  local later=0
  case "$1" in
    tests) want e2e && later=$(( later + PLAN_E2E )); want bench && later=$(( later + PLAN_BENCH ))
           want compare && later=$(( later + PLAN_COMPARE )) ;;
    e2e) want bench && later=$(( later + PLAN_BENCH )); want compare && later=$(( later + PLAN_COMPARE )) ;;
    bench) want compare && later=$(( later + PLAN_COMPARE )) ;;
  esac
  echo $(( TOTAL_S - ($(date +%s) - T0) - later - 10 ))
}

# Whether a stage still has time (at least MIN_STAGE_S); if not, it is recorded as skipped.
MIN_STAGE_S=40
has_time() {
  if [ "$2" -lt "$MIN_STAGE_S" ]; then
    echo
    echo "gpu_check.sh: $1 skipped: only $2 s left of ${TOTAL_S} s"
    record "$1" - 0 "$2" "skipped: no time left"
    return 1
  fi
}

# "N rows (status: count, ...)" for a results CSV of python -m bench.
csv_note() {
  [ -f "$1" ] || { echo "no $(basename "$1")"; return; }
  "$PY" -c "
import collections, csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
counts = collections.Counter(r.get('status', '?') for r in rows)
print(f'{len(rows)} rows in {sys.argv[2]} (' + ', '.join(f'{k} {v}' for k, v in sorted(counts.items())) + ')')
" "$1" "$(basename "$1")" 2>/dev/null || echo "unreadable $(basename "$1")"
}

STAGE_LINES=()
record() {  # name, exit status, seconds, limit, note
  STAGE_LINES+=("| $1 | $2 | $3 | $4 | $5 |")
}

run_all() {
  local run_dir ts rc lim note
  local test_rc=-1 e2e_rc=-1 bench_rc=-1 compare_rc=-1 pre_pid=""
  echo "== gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S UTC') repo $REPO, output $OUT"
  echo "stages $STAGES in ${TOTAL_S} s; planned limits: tests ${PLAN_TESTS} s (+ what setup leaves), e2e ${PLAN_E2E},"
  echo "suite v1 ${PLAN_BENCH}, vs torch.compile ${PLAN_COMPARE}; time a stage leaves unused goes to the next"
  echo "== 1. GPU and versions"
  if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
  else
    echo "(no nvidia-smi)"
  fi
  timeout 60 "$PY" - <<'EOF'
import platform, torch, triton, numpy
print(f"python {platform.python_version()}  torch {torch.__version__} (CUDA {torch.version.cuda})  "
      f"triton {triton.__version__}  numpy {numpy.__version__}")
print(f"cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}")
for mod in ("torchvision", "matplotlib", "pytest", "xdist"):
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
  (cd "$run_dir" && timeout 60 "$PY" -c "
import bn_triton, bn_triton.kernels
print('bn_triton from', bn_triton.__file__, '| kernels from', bn_triton.kernels.__file__)") || {
    echo "gpu_check.sh: cannot import bn_triton and bn_triton.kernels" >&2
    return 4
  }

  lim=$(limit_for tests)
  if want tests && has_time tests "$lim"; then
    if want e2e && [ "$PRECOMPILE" = 1 ]; then
      # Untimed e2e steps in the background: Triton and inductor compile into their on-disk caches
      # while the tests run; stopped when the tests end (timeout passes the TERM on to its whole
      # process group). First EfficientNet-B0's eager bn_triton variants (its kernels at its shapes,
      # the SiLU epilogue included; no second variant after 30 s), then ResNet-50's compiled ones
      # (bn_triton's kernels at its shapes, as the eager variants launch them too).
      echo "(background: untimed e2e steps fill the compile caches; log in plots.tar.gz: precompile.log)"
      # shellcheck disable=SC2016  # $0 and $1 are the inner bash's arguments
      (cd "$run_dir" && TORCHINDUCTOR_COMPILE_THREADS=${GPU_CHECK_PRECOMPILE_THREADS:-6} \
        exec timeout -k 5 "$lim" bash -c '
          "$0" -m bench.e2e --model "$1" --configs bf16_cl --variants bn_triton_fused,bn_triton \
            --steps 0 --warmup 1 --budget-s 30
          exec "$0" -m bench.e2e --variants bn_triton_compile,torch_compile --steps 0 --warmup 1 --compile-warmup 1
        ' "$PY" "$SILU_MODEL" >"$WORK/extras/precompile.log" 2>&1) &
      pre_pid=$!
    fi
    echo
    echo "== 2. test suite on the GPU (python3 -m pytest; limit ${lim} s)"
    ts=$(date +%s)
    # Most of the suite's time on a GPU is Triton compiling kernel variants, CPU-bound: with
    # pytest-xdist (preinstalled on the GPU machines) 12 workers share the 16 cores and the one GPU
    # (an H200 run with 8 workers did not finish the suite in 114 s; 12 ran 500 of its tests in 69 s).
    # The suite is xdist-safe; tests/test_gpu_large.py runs its big inputs one at a time (a lock).
    local xdist=""
    local workers=${GPU_CHECK_WORKERS:-12}
    [ "$workers" != 0 ] && "$PY" -c "import xdist" >/dev/null 2>&1 && xdist="-n $workers"
    # shellcheck disable=SC2086  # GPU_CHECK_PYTEST_ARGS and xdist are lists of words on purpose
    (cd "$run_dir" && timeout -k 5 "$((lim - 5))" "$PY" -m pytest -q -rfEs $xdist \
      --junitxml="$WORK/extras/pytest.xml" ${GPU_CHECK_PYTEST_ARGS:-}) | tee "$WORK/pytest.out"
    test_rc=${PIPESTATUS[0]}
    note=$(grep -E '[0-9]+ (passed|failed|error|skipped)' "$WORK/pytest.out" | tail -1 | tr -d '=' | sed 's/^ *//')
    [ "$test_rc" = 124 ] && note="stopped at the limit; $note"
    echo "tests: exit status $test_rc in $(( $(date +%s) - ts )) s"
    record tests "$test_rc" "$(( $(date +%s) - ts ))" "$lim" "${note:-no summary line}"
    if [ -n "$pre_pid" ]; then
      kill -TERM "$pre_pid" 2>/dev/null
      wait "$pre_pid" 2>/dev/null
      echo "(background warm-up: $(grep -cE '^ +[0-9.]+s ' "$WORK/extras/precompile.log") runs done)"
    fi
  fi

  lim=$(limit_for e2e)
  if want e2e && has_time e2e "$lim"; then
    # ResNet-50 first, E2E_SILU_S kept for the SiLU network; no new ResNet-50 variant in the last
    # 30 s of its share (an eager variant takes up to ~25 s, cuDNN's benchmark included).
    local res_lim=$((lim - E2E_SILU_S)) silu_rc
    echo
    echo "== 3. ResNet-50 training step (python -m bench.e2e; limit ${res_lim} s of the stage's ${lim} s," \
      "no new variant after $((res_lim - 30)) s)"
    ts=$(date +%s)
    (cd "$run_dir" && timeout -k 5 "$((res_lim - 5))" "$PY" -m bench.e2e --budget-s "$((res_lim - 30))" \
      --out "$WORK/e2e" --md "$WORK/extras/e2e.md")
    e2e_rc=$?
    # The SiLU network: what the stage has left (at least E2E_SILU_S); one config, three variants, the
    # bn_triton ones after torch's, and no new variant in the last 15 s.
    local silu_lim=$((lim - ($(date +%s) - ts)))
    echo
    echo "== 3b. $SILU_MODEL training step (BN -> SiLU; python -m bench.e2e; limit ${silu_lim} s," \
      "no new variant after $((silu_lim - 15)) s)"
    (cd "$run_dir" && timeout -k 5 "$((silu_lim - 5))" "$PY" -m bench.e2e --model "$SILU_MODEL" \
      --configs bf16_cl --variants torch,bn_triton_fused,bn_triton --steps 10 --warmup 3 \
      --budget-s "$((silu_lim - 15))" --out "$WORK/e2e_silu" --md "$WORK/extras/e2e_silu.md")
    silu_rc=$?
    echo "$SILU_MODEL: exit status $silu_rc"
    # One e2e.csv (its model column tells the networks apart); a bn_triton failure in either is the
    # stage's (exit status 1).
    [ -f "$WORK/e2e/e2e.csv" ] && cp "$WORK/e2e/e2e.csv" "$OUT/e2e.csv"
    if [ -f "$WORK/e2e_silu/e2e.csv" ]; then
      if [ -f "$OUT/e2e.csv" ]; then tail -n +2 "$WORK/e2e_silu/e2e.csv" >> "$OUT/e2e.csv"
      else cp "$WORK/e2e_silu/e2e.csv" "$OUT/e2e.csv"; fi
    fi
    [ "$silu_rc" = 1 ] && e2e_rc=1
    note="$(( $(wc -l < "$OUT/e2e.csv" 2>/dev/null || echo 1) - 1 )) rows in e2e.csv"
    note="$note ($(( $(wc -l < "$WORK/e2e_silu/e2e.csv" 2>/dev/null || echo 1) - 1 )) of $SILU_MODEL)"
    [ "$e2e_rc" = 124 ] && note="ResNet-50 stopped at its limit; $note"
    [ "$silu_rc" = 124 ] && note="$SILU_MODEL stopped at its limit; $note"
    echo "e2e: exit status $e2e_rc in $(( $(date +%s) - ts )) s"
    record e2e "$e2e_rc" "$(( $(date +%s) - ts ))" "$lim" "$note"
  fi

  lim=$(limit_for bench)
  if want bench && has_time "suite v1" "$lim"; then
    echo
    echo "== 4. suite v1 (python -m bench --impls bn_triton,cudnn,native; limit ${lim} s, no new case after $((lim - 30)) s)"
    ts=$(date +%s)
    (cd "$run_dir" && timeout -k 5 "$((lim - 5))" "$PY" -m bench --impls bn_triton,cudnn,native \
      --warmup-ms 10 --rep-ms 30 --budget-s "$((lim - 30))" --out "$WORK/bench")
    bench_rc=$?
    for f in results.csv env.json overview.png; do
      [ -f "$WORK/bench/$f" ] && mv "$WORK/bench/$f" "$OUT/$f"
    done
    note=$(csv_note "$OUT/results.csv")
    [ "$bench_rc" = 124 ] && note="stopped at the limit; $note"
    echo "bench: exit status $bench_rc in $(( $(date +%s) - ts )) s"
    record "suite v1" "$bench_rc" "$(( $(date +%s) - ts ))" "$lim" "$note"
  fi

  lim=$(limit_for compare)
  if want compare && has_time "vs torch.compile" "$lim"; then
    if [ "$GPU" = 1 ]; then
      # Where the host time per call goes (the bench's host_ms says how much): ~20 s of the stage. The
      # decomposition: an empty autograd.Function, 8 allocations, a no-op kernel through fn[grid] and
      # through bn_triton's launch, bn_triton stubbed and not, torch; then cProfile and torch.profiler.
      echo
      echo "== 5. host time per call, decomposed (bench/overhead.py --decompose; limit 30 s), then with kernels stubbed (limit 15 s)"
      (cd "$run_dir" && timeout -k 5 30 "$PY" bench/overhead.py --decompose --shape 32,64,14,14 --calls 100 \
        --repeats 3) || echo "host decomposition: exit status $?"
      # The same calls with no-op kernel launches on CUDA tensors: the host time of Python, autograd
      # and the allocations alone; the difference to the above is what the launches cost the host.
      (cd "$run_dir" && timeout -k 5 15 "$PY" bench/overhead.py --stub --shape 32,64,14,14 --calls 100 \
        --repeats 3) || echo "host cost, kernels stubbed: exit status $?"
      echo
      echo "== 5b. single-pass kernels against the split path (BN_TRITON_SINGLE_PASS off: bn_triton_split; limit 35 s)"
      (cd "$run_dir" && timeout -k 5 35 "$PY" -m bench --shapes 2048@7,512@7 --dtypes fp32-nchw,bf16-nchw \
        --impls bn_triton,bn_triton_split,native --no-fused --warmup-ms 10 --rep-ms 30 --budget-s 20 \
        --out "$WORK/single_pass") || echo "single-pass comparison: exit status $?"
      [ -f "$WORK/single_pass/results.csv" ] && mv "$WORK/single_pass/results.csv" "$WORK/extras/single_pass.csv"
      lim=$(limit_for compare)
    fi
    echo
    echo "== 6. against torch.compile (python -m bench --quick --impls bn_triton,compile --no-fused; limit ${lim} s)"
    ts=$(date +%s)
    (cd "$run_dir" && timeout -k 5 "$((lim - 5))" "$PY" -m bench --quick --impls bn_triton,compile --no-fused \
      --warmup-ms 10 --rep-ms 30 --budget-s "$((lim - 25))" --out "$WORK/compare")
    compare_rc=$?
    [ -f "$WORK/compare/results.csv" ] && mv "$WORK/compare/results.csv" "$OUT/compile.csv"
    note=$(csv_note "$OUT/compile.csv")
    [ "$compare_rc" = 124 ] && note="stopped at the limit; $note"
    echo "compare: exit status $compare_rc in $(( $(date +%s) - ts )) s"
    record "vs torch.compile" "$compare_rc" "$(( $(date +%s) - ts ))" "$lim" "$note"
  fi

  # env.json: suite v1's (versions, GPU, commit); written here if that stage did not.
  if [ ! -f "$OUT/env.json" ]; then
    (cd "$run_dir" && timeout 60 "$PY" -c "
import sys, torch
from bench import report
dev = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
report.write_env(report.collect_env(dev, argv=['bash', 'bench/gpu_check.sh']), sys.argv[1])" "$OUT/env.json") \
      || echo "gpu_check.sh: could not write env.json"
  fi
  pack_and_summarize
  if [ "$run_dir" != "$REPO" ]; then
    rm -rf "$WORK/view"  # the view: links only (rm does not follow them)
  fi

  local code=0
  want tests && [ "$test_rc" != 0 ] && code=1  # failed, stopped, or never ran (-1)
  for rc in "$e2e_rc" "$bench_rc" "$compare_rc"; do
    [ "$rc" = 1 ] && code=1
  done
  echo
  echo "== gpu_check done in $(( $(date +%s) - T0 )) s (exit $code): tests $test_rc, e2e $e2e_rc, suite v1 $bench_rc, vs compile $compare_rc"
  return "$code"
}

pack_and_summarize() {
  # Everything that is not one of the 8 files goes into plots.tar.gz.
  for f in summary.md env.json overview.png; do
    [ -f "$WORK/compare/$f" ] && mv "$WORK/compare/$f" "$WORK/extras/compile_$f"
  done
  [ -f "$WORK/bench/summary.md" ] && cp "$WORK/bench/summary.md" "$WORK/extras/suite_summary.md"
  [ -f "$WORK/single_pass/summary.md" ] && cp "$WORK/single_pass/summary.md" "$WORK/extras/single_pass_summary.md"
  tar -czf "$OUT/plots.tar.gz" -C "$WORK/extras" . || echo "gpu_check.sh: packing plots.tar.gz failed"

  {
    echo "# gpu_check $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "| stage | exit | s | limit s | result |"
    echo "|---|---|---|---|---|"
    [ "${#STAGE_LINES[@]}" -gt 0 ] && printf '%s\n' "${STAGE_LINES[@]}"
    if [ -f "$WORK/pytest.out" ] && grep -qE '^(FAILED|ERROR) ' "$WORK/pytest.out"; then
      echo
      echo "## Test failures"
      echo
      grep -E '^(FAILED|ERROR) ' "$WORK/pytest.out" | sed 's/^/- /'
    fi
    for f in "$WORK/extras/e2e.md" "$WORK/extras/e2e_silu.md" "$WORK/bench/summary.md" "$WORK/extras/single_pass_summary.md" \
      "$WORK/extras/compile_summary.md"; do
      if [ -f "$f" ]; then
        echo
        cat "$f"
      fi
    done
  } > "$OUT/summary.md"
  echo
  echo "== files in $OUT:"
  ls -l "$OUT"
  echo
  echo "== summary (summary.md)"
  cat "$OUT/summary.md"
}

run_all 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$rc"
