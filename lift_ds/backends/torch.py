"""The plain single-process backend: the reference every distributed backend is tested against."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, TrainingConfig
from ..optim import OptimizerFactory
from .base import TorchOptimizerBackend


class TorchBackend(TorchOptimizerBackend):
    """Single process, plain PyTorch, fp32 weights (bf16 via autocast when ``bf16.enabled``)."""

    name = "torch"

    def __init__(
        self,
        model: nn.Module,
        training: TrainingConfig,
        raw_config: dict[str, Any],
        optimizer_factory: OptimizerFactory | None,
    ) -> None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError([
                f"lift.backend: \"torch\" is single-process but WORLD_SIZE={os.environ['WORLD_SIZE']}; "
                "use backend \"deepspeed\" (or \"fsdp\") under a multi-rank launcher"
            ])
        super().__init__(model, training, raw_config, optimizer_factory)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        ctx = (
            torch.autocast(device_type="cpu", dtype=torch.bfloat16)
            if self.training.precision == "bf16"
            else contextlib.nullcontext()
        )
        with ctx:
            return self.model(*args, **kwargs)
    def save_weights(self, path: Path, param_names: list[str]) -> None:
        named = dict(self.model.named_parameters())
        torch.save({n: named[n].detach().cpu().clone() for n in param_names}, path / "weights.pt")

    def load_weights(self, path: Path) -> list[str]:
        state = torch.load(path / "weights.pt", map_location="cpu", weights_only=True)
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, t in state.items():
                named[n].copy_(t)
        return list(state)

    def save_optimizer(self, path: Path) -> None:
        assert self._optimizer is not None
        torch.save(self._optimizer.state_dict(), path / "optimizer.pt")

    def load_optimizer(self, path: Path) -> None:
        assert self._optimizer is not None
        self._optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))

    def stash_optimizer_state(self) -> Any:
        assert self._optimizer is not None
        sd = self._optimizer.state_dict()
        return {"state": {k: {n: v.detach().cpu().clone() if torch.is_tensor(v) else v for n, v in s.items()} for k, s in sd["state"].items()}}

    def restore_optimizer_state(self, state: Any) -> None:
        assert self._optimizer is not None
        sd = self._optimizer.state_dict()
        sd["state"] = state["state"]
        self._optimizer.load_state_dict(sd)
