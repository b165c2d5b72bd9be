#!/usr/bin/env bash
# Prepare, on this (networked) machine, the wheels scripts/gpu_check.sh installs on the GPU machine,
# whose image (Python 3.12, torch, transformers, accelerate, peft, ninja, py-cpuinfo, msgpack, psutil)
# lacks DeepSpeed and its pure-Python needs and has no network. Writes .whl/ (ignored by git, about 5 MB);
# pass it to the device tool with carry=[".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
rm -rf .whl && mkdir -p .whl
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  pydantic==2.11.7 pydantic-core==2.33.2 annotated-types==0.7.0 typing-inspection==0.4.1 hjson==3.1.0
ls -la .whl
du -sh .whl
