#!/usr/bin/env bash
# One node, N processes:  NPROC=8 bash launch/torchrun_single_node.sh --model DIR --data FILE --max_steps 1000
set -euo pipefail
cd "$(dirname "$0")/.."
exec torchrun --standalone --nproc_per_node "${NPROC:-2}" launch/train.py --ds_config "${DS_CONFIG:-ds_configs/zero2.json}" "$@"
