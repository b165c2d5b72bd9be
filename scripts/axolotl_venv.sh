#!/usr/bin/env bash
# Build (or reuse) a venv with axolotl 0.19.0 and this checkout's lift_ds, for docs/axolotl.md and
# tests/distributed/test_axolotl.py. axolotl pins its own transformers / trl / peft / accelerate, so it
# gets a venv of its own (default .cache/axolotl-venv, or $AXOLOTL_VENV). torch==2.13.0 is installed
# first and pinned for every later install (an open torch range pulls a multi-GB CUDA build). axolotl
# itself goes in without its dependencies, then what `axolotl train` imports (scripts/axolotl_requirements.txt:
# no triton, bitsandbytes, xformers, vllm, cloud file systems or UIs, which LIFT on CPU never loads),
# then lift_ds without its dependencies (its own pins would fight axolotl's). Idempotent: a venv built
# from the same requirements is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${AXOLOTL_VENV:-.cache/axolotl-venv}
PY=${PYTHON:-python3}
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}
REQS=scripts/axolotl_requirements.txt
want=$(cat "$REQS" "$0" | sha256sum | cut -c1-16)
if [ -f "$VENV/.lift_ds_stamp" ] && [ "$(cat "$VENV/.lift_ds_stamp")" = "$want" ] && [ -x "$VENV/bin/axolotl" ]; then
  echo "axolotl venv: $VENV (reused)"
  exit 0
fi
start=$(date +%s)
rm -rf "$VENV"
"$PY" -m venv "$VENV"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "$TORCH_PIN" > "$constraints"
pip=("$VENV/bin/pip" install -q --disable-pip-version-check)
"${pip[@]}" "$TORCH_PIN"
"${pip[@]}" -c "$constraints" --no-deps axolotl==0.19.0
"${pip[@]}" -c "$constraints" -r "$REQS"
"${pip[@]}" --no-deps --no-build-isolation -e .
echo "$want" > "$VENV/.lift_ds_stamp"
"$VENV/bin/python" -c "import axolotl, transformers, trl, deepspeed, lift_ds; print('axolotl venv:', '$VENV', '| axolotl', axolotl.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__, '| deepspeed', deepspeed.__version__)" 2>/dev/null
echo "built in $(( $(date +%s) - start )) s"
