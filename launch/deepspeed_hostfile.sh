#!/usr/bin/env bash
# The deepspeed launcher over a hostfile (one line per node: "hostname slots=8"), passwordless ssh between nodes:
#   HOSTFILE=hostfile bash launch/deepspeed_hostfile.sh --model DIR --data FILE --max_steps 1000
set -euo pipefail
cd "$(dirname "$0")/.."
exec deepspeed --hostfile "${HOSTFILE:-hostfile}" --master_port "${MASTER_PORT:-29500}" \
  launch/train.py --ds_config "${DS_CONFIG:-ds_configs/zero3.json}" "$@"
