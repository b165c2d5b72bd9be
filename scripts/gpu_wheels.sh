#!/usr/bin/env bash
# Prepare, on this (networked) machine, the wheels scripts/gpu_check.sh installs on the GPU machine,
# whose image (Python 3.12, torch 2.11, transformers, accelerate, peft, ninja, py-cpuinfo, msgpack, psutil)
# lacks DeepSpeed (and its pure-Python needs) and torchao (Q-LIFT's int8/NF4 rows) and has no network.
# DeepSpeed is built as a pure-Python wheel (no op compiled: DS_BUILD_OPS=0); torchao 0.18.0 needs
# torch >= 2.11 (its own import check) and runs NF4 / int8 weight-only in Python (its C++ kernels are not
# needed). Writes .whl/ (ignored by git, about 8 MB); pass it to the device tool with carry=[".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
rm -rf .whl && mkdir -p .whl
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
ls .whl/deepspeed-0.19.8-py3-none-any.whl >/dev/null || { echo "error: the DeepSpeed wheel is not pure Python (an op was built?)"; exit 1; }
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  pydantic==2.11.7 pydantic-core==2.33.2 annotated-types==0.7.0 typing-inspection==0.4.1 hjson==3.1.0 \
  torchao==0.18.0
ls -la .whl
du -sh .whl
