#!/usr/bin/env bash
# One command for the GPU machine (one H200: at most 8 minutes), or --cpu-smoke (tiny shapes on CPU;
# CI runs it so the script cannot rot between GPU loans):
#   bash scripts/gpu_check.sh OUTDIR [--cpu-smoke]
# 1. installs .whl/ (scripts/gpu_wheels.sh, run beforehand on a networked machine) if it is there;
# 2. runs tests/gpu (1-rank ZeRO-2 = torch backend, bf16 reduces the loss, the chosen AdamW, gradient
#    checkpointing) -> OUTDIR/gpu_tests.xml and .log;
# 3. runs launch/gpu_bench.py (Llama-3-8B shapes at sequence 2048 and SmolLM2-135M shapes at micro batch 16:
#    LIFT torch / LIFT ZeRO-2 / LoRA r=16 / full, each in its own process) -> OUTDIR/gpu_bench.json, .md.
# Exit status: the tests' (the benchmark records failures as rows).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash scripts/gpu_check.sh OUTDIR [--cpu-smoke]}
smoke=${2:-}
mkdir -p "$out"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
if [ -d .whl ] && ! "$PY" -c "import deepspeed" 2>/dev/null; then  # the GPU image has no DeepSpeed
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lift_ds_site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/lift_ds_site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
"$PY" - <<'PYEOF' | tee "$out/environment.txt"
import platform, torch, transformers
print("python", platform.python_version(), "| torch", torch.__version__, "| transformers", transformers.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
try:
    import deepspeed; print("deepspeed", deepspeed.__version__)
except Exception as e:
    print("deepspeed missing:", e)
PYEOF
t0=$(date +%s)
LIFT_DS_GPU_TESTS=1 timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/gpu --junitxml "$out/gpu_tests.xml" 2>&1 | tee "$out/gpu_tests.log"
status=${PIPESTATUS[0]}
echo "gpu tests: exit $status in $(( $(date +%s) - t0 )) s"
bench=(--out "$out/gpu_bench.json" --md "$out/gpu_bench.md")
[ "$smoke" = "--cpu-smoke" ] && bench+=(--cpu-smoke --timeout 120)
timeout 420 "$PY" launch/gpu_bench.py "${bench[@]}" 2>&1 | tee "$out/gpu_bench.log"
echo "total $(( $(date +%s) - t0 )) s"
exit "$status"
