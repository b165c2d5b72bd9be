#!/usr/bin/env python
"""TRL's own SFT script, ``trl/scripts/sft.py`` as shipped in the trl wheel, run unchanged with LIFT's one
swap: ``trl.SFTTrainer`` is ``LiftSFTTrainer`` while it runs (its DeepSpeed JSON, ``--deepspeed``, has a
``"lift"`` section). Every argument is sft.py's own (``ScriptArguments``, ``SFTConfig``, ``ModelConfig``).

    torchrun --nproc_per_node 2 tests/distributed/clients/trl_sft_swapped.py --model_name_or_path DIR \\
        --dataset_name DATA_DIR --deepspeed zero2_lift.json --output_dir OUT --max_steps 8 ...
"""

from __future__ import annotations

import sys

import torch._dynamo  # noqa: F401  (before any deepspeed.zero.Init)
import trl
from trl.scripts import sft

from lift_ds.integrations.transformers import LiftSFTTrainer


def main(argv=None) -> int:
    trl.SFTTrainer = LiftSFTTrainer  # the swap: sft.main imports SFTTrainer from trl when it runs
    parser = sft.make_parser()
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(
        args=argv, fail_with_unknown_args=False
    )
    sft.main(script_args, training_args, model_args, dataset_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
