#!/usr/bin/env bash
# The GPU machine's one command (one H200, one device call of at most 600 s), or --cpu-smoke (tiny shapes
# on CPU, every code path; CI runs it so the script cannot rot between GPU loans):
#   bash scripts/gpu_check.sh OUTDIR [--cpu-smoke]
# With the device tool, from a checkout here (the copy there has no .git, so pass the commit):
#   bash scripts/gpu_wheels.sh      # once, on a networked machine: .whl/ (DeepSpeed, torchao and their pure-Python needs)
#   run(command="LIFT_DS_COMMIT=<git rev-parse HEAD> bash scripts/gpu_check.sh $OUT", carry=[".whl"], timeout_s=600)
# Steps, all inside BUDGET_S from this script's start (a 600 s call keeps 60 s spare):
# 1. installs .whl/ into /tmp/lift_ds_site when DeepSpeed or torchao is missing (the GPU image has neither);
# 2. runs tests/gpu (at most TESTS_S) -> OUTDIR/gpu_tests.xml, gpu_tests.log (skips are listed, and counted by CI);
# 3. runs launch/gpu_bench.py with what is left -> OUTDIR/gpu_bench.json (rows appended as they finish), .md, .log;
# 4. checks that nothing was compiled: TORCH_EXTENSIONS_DIR is a fresh directory that must stay empty
#    (no JIT build of a DeepSpeed op; torch's fused AdamW runs unless an op is pre-built).
# Exit status: the tests' status, or 3 when an op was compiled (the benchmark records failures as rows).
set -uo pipefail
BUDGET_S=540   # the whole script, wheels, tests and benchmark together
TESTS_S=150    # tests/gpu at most
BENCH_RESERVE_S=15  # kept back from the benchmark for its last JSON write and this script's checks
cd "$(dirname "$0")/.."
start=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - start) )); }
out=${1:?usage: bash scripts/gpu_check.sh OUTDIR [--cpu-smoke]}
smoke=${2:-}
mkdir -p "$out"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
if [ -d .whl ] && ! "$PY" -c "import deepspeed, torchao" 2>/dev/null; then  # the GPU image has neither
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lift_ds_site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/lift_ds_site:${PYTHONPATH:-}
fi
ext_dir=$(mktemp -d -t lift_ds_no_jit.XXXXXX)
export TORCH_EXTENSIONS_DIR=$ext_dir
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
echo "budget ${BUDGET_S} s: tests at most ${TESTS_S} s, the benchmark what is left; TORCH_EXTENSIONS_DIR=$ext_dir"
t0=$(date +%s)
LIFT_DS_GPU_TESTS=1 timeout "$TESTS_S" "$PY" -m pytest -q -rs -p no:cacheprovider tests/gpu --junitxml "$out/gpu_tests.xml" 2>&1 | tee "$out/gpu_tests.log"
status=${PIPESTATUS[0]}
echo "gpu tests: exit $status in $(( $(date +%s) - t0 )) s"
bench_s=$(( $(left) - BENCH_RESERVE_S ))
bench=(--out "$out/gpu_bench.json" --md "$out/gpu_bench.md" --budget $(( bench_s - 10 )))
[ "$smoke" = "--cpu-smoke" ] && bench+=(--cpu-smoke)
timeout "$bench_s" "$PY" launch/gpu_bench.py "${bench[@]}" 2>&1 | tee "$out/gpu_bench.log"
bench_status=${PIPESTATUS[0]}
[ "$bench_status" -ne 0 ] && echo "gpu_bench: exit $bench_status" && [ "$status" -eq 0 ] && status=$bench_status
built=$(find "$ext_dir" -mindepth 1 -maxdepth 1 | head -5)
if [ -n "$built" ]; then
  echo "error: something was compiled into TORCH_EXTENSIONS_DIR (no JIT build is allowed here): $built"
  status=3
fi
rm -rf "$ext_dir"
echo "total $(( $(date +%s) - start )) s of the ${BUDGET_S} s budget"
exit "$status"
