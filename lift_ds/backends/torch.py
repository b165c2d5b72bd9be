"""The plain single-process backend: the reference every distributed backend is tested against."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, TrainingConfig
from ..optim import OptimizerFactory, optimizer_factory_from_section
from .base import Backend


class TorchBackend(Backend):
    """Single process, plain PyTorch, fp32 weights (bf16 via autocast when ``bf16.enabled``)."""

    name = "torch"

    def __init__(
        self,
        model: nn.Module,
        training: TrainingConfig,
        raw_config: dict[str, Any],
        optimizer_factory: OptimizerFactory | None,
    ) -> None:
        super().__init__(model, training, raw_config, optimizer_factory)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError([
                f"lift.backend: \"torch\" is single-process but WORLD_SIZE={os.environ['WORLD_SIZE']}; "
                "use backend \"deepspeed\" (or \"fsdp\") under a multi-rank launcher"
            ])
        if optimizer_factory is None:
            if training.optimizer is None:
                raise ConfigError(["optimizer: none given; pass optimizer= a callable or add an \"optimizer\" section"])
            self.optimizer_factory = optimizer_factory_from_section(training.optimizer)
        self._optimizer: torch.optim.Optimizer | None = None
        self._params: list[nn.Parameter] = []

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self._optimizer

    def build(self, params: list[nn.Parameter]) -> None:
        self._params = params
        for p in params:
            p.grad = None
        self._optimizer = self.optimizer_factory(params)

    def teardown(self) -> None:
        for p in self._params:
            p.grad = None
        self._optimizer = None
        self._params = []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        ctx = (
            torch.autocast(device_type="cpu", dtype=torch.bfloat16)
            if self.training.precision == "bf16"
            else contextlib.nullcontext()
        )
        with ctx:
            return self.model(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.training.gradient_accumulation_steps).backward()

    def step(self, boundary: bool) -> float | None:
        if not boundary:
            return None
        assert self._optimizer is not None, "step() before build()"
        norm = None
        if self.training.gradient_clipping > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(self._params, self.training.gradient_clipping))
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        return norm

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
