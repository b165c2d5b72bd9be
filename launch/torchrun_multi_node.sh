#!/usr/bin/env bash
# Several nodes: run this on every node with the same MASTER_ADDR/MASTER_PORT and NNODES, and its own NODE_RANK.
#   MASTER_ADDR=node0 NNODES=2 NODE_RANK=0 NPROC=8 bash launch/torchrun_multi_node.sh --model DIR --data FILE --max_steps 1000
#   MASTER_ADDR=node0 NNODES=2 NODE_RANK=1 NPROC=8 bash launch/torchrun_multi_node.sh --model DIR --data FILE --max_steps 1000
# Elastic restarts (the run resumes from its newest checkpoint): MAX_RESTARTS=3 and pass --resume.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host}" "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}"
exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "${NPROC:-8}" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id "${RDZV_ID:-lift_ds}" \
  --max_restarts "${MAX_RESTARTS:-0}" \
  launch/train.py --ds_config "${DS_CONFIG:-ds_configs/zero3.json}" "$@"
