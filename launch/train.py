#!/usr/bin/env python3
"""LIFT fine-tuning entry point for the deepspeed launcher and torchrun.

    deepspeed --num_gpus 2 launch/train.py --ds_config ds_configs/zero2.json --model DIR --data FILE --max_steps 200
    torchrun --nproc_per_node 2 launch/train.py --ds_config ds_configs/zero3.json ...

With no --model / --data it runs the built-in quickstart (SmolLM2-135M-Instruct, movie-review sentiment).
Run with --help for every flag.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch._dynamo  # noqa: E402,F401  (before any deepspeed.zero.Init: see CPU-DISTRIBUTED notes)

from lift_ds.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
