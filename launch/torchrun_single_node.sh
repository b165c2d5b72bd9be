#!/usr/bin/env bash
# One node, N processes:  NPROC=8 bash launch/torchrun_single_node.sh --model DIR --data FILE --max_steps 1000
# Elastic restarts (the run resumes from its newest checkpoint): MAX_RESTARTS=3 and pass --resume --save_every N.
set -euo pipefail
cd "$(dirname "$0")/.."
exec torchrun --standalone --nproc_per_node "${NPROC:-2}" --max_restarts "${MAX_RESTARTS:-0}" launch/train.py --ds_config "${DS_CONFIG:-ds_configs/zero2.json}" "$@"
