#!/usr/bin/env bash
# Create .venv and install lift_ds with its test extras. torch is installed FIRST with an exact pin:
# an open torch range makes pip pull a multi-GB CUDA build. Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "$TORCH_PIN" > "$constraints"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check "$TORCH_PIN"
fi
.venv/bin/pip install -q --disable-pip-version-check -c "$constraints" -e ".[dev]"
.venv/bin/python -c "import torch, deepspeed, transformers; print('lift_ds env: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)" 2>/dev/null
