"""The plain single-process backend: the reference every distributed backend is tested against."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..config import LiftConfig, TrainingConfig
from .base import BackendContext, TorchOptimizerBackend


class TorchBackend(TorchOptimizerBackend):
    """Single process, plain PyTorch, on the GPU when there is one; fp32, or bf16 weights with fp32
    masters for the active block (``bf16.enabled``)."""

    name = "torch"
    runs_16bit_optimizers = True

    @classmethod
    def check_config(
        cls, lift: LiftConfig, training: TrainingConfig, raw: Mapping[str, Any], world_size: int, baseline: str = "lift"
    ) -> tuple[Any, list[str]]:
        _, problems = super().check_config(lift, training, raw, world_size, baseline)
        if world_size > 1:
            problems.append(
                f'lift.backend: "torch" is single-process but WORLD_SIZE={world_size}; '
                'use backend "deepspeed" (or "fsdp") under a multi-rank launcher'
            )
        if training.precision == "fp16":
            problems.append(
                'fp16.enabled: the torch reference backend has no loss scaler; use bf16 or backend "deepspeed"'
            )
        zero = raw.get("zero_optimization")
        if zero is not None:
            z = zero if isinstance(zero, Mapping) else {}
            if (
                not isinstance(zero, Mapping)
                or z.get("stage", 0) not in (0, None)
                or z.get("offload_optimizer")
                or z.get("offload_param")
            ):
                problems.append(
                    f"zero_optimization: {zero!r} is DeepSpeed ZeRO, "
                    "which the single-process torch backend cannot honour; "
                    'set lift.backend to "deepspeed" (or "auto"), or remove the section'
                )
        problems += cls.foreign_section_problems(raw, cls.name, {"fsdp": "fsdp"})
        return None, problems

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        import os

        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        # bf16: 16-bit weights everywhere (frozen blocks included), the active block through fp32 masters
        self.model.to(device=self.device, dtype=torch.bfloat16 if self.training.precision == "bf16" else None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args = tuple(a.to(self.device) if torch.is_tensor(a) else a for a in args)
        kwargs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
        return self.model(*args, **kwargs)
