"""The backend protocol: what the engine asks of a distributed (or plain) training backend.

The engine owns the plan, freezing, the learning-rate schedule, micro-step counting and the
checkpoint layout; a backend owns the wrapped model, the per-phase optimizer, backward, the
optimizer step (with clipping) and how weights and optimizer state are stored.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, TrainingConfig
from ..optim import OptimizerFactory, optimizer_factory_from_section


class Backend(ABC):
    """Base class of the LIFT backends.

    Args:
        model: the model; it stays the same object for the whole run.
        training: the top-level DeepSpeed keys LIFT reads.
        raw_config: the whole config dict (DeepSpeed's own keys pass through to DeepSpeed).
        optimizer_factory: builds the phase optimizer from the active parameters (None: the backend
            may build it from the config, as DeepSpeed does).
    """

    name = "base"

    def __init__(
        self,
        model: nn.Module,
        training: TrainingConfig,
        raw_config: dict[str, Any],
        optimizer_factory: OptimizerFactory | None,
    ) -> None:
        self.model = model
        self.training = training
        self.raw_config = raw_config
        self.optimizer_factory = optimizer_factory
        self.rank = 0
        self.world_size = 1
        #: False after a boundary :meth:`step` that did not change the weights (a non-finite
        #: gradient norm, or DeepSpeed's fp16 loss scaler skipping an overflow).
        self.step_applied = True

    @property
    def comm_device(self) -> torch.device:
        """Where small collective tensors live (the accelerator under NCCL, else the CPU)."""
        return torch.device("cpu")

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (collective when distributed)."""
        import torch.distributed as dist

        if self.world_size == 1 or not dist.is_initialized():
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def memory_layout(self) -> tuple[int, bool]:
        """``(zero_stage, optimizer_offloaded)`` for :func:`lift_ds.memory.state_bytes` (FSDP: stage 3)."""
        return 0, False

    @abstractmethod
    def discard_gradients(self) -> None:
        """End the accumulation window without changing any weight or optimizer state (a skipped
        step); the gradients are NaN/inf (the engine poisons a non-finite loss)."""

    @property
    @abstractmethod
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The current phase's optimizer (its ``param_groups`` get the scheduled learning rate)."""

    @abstractmethod
    def build(self, params: list[nn.Parameter]) -> None:
        """Start a phase: wrap the model so that only ``params`` train, and build their optimizer."""

    @abstractmethod
    def teardown(self) -> None:
        """End a phase: release the optimizer, gradients and any engine, completely."""

    @abstractmethod
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss (scaled by 1 / gradient_accumulation_steps)."""

    @abstractmethod
    def step(self, boundary: bool) -> float | None:
        """End a micro-step; at an accumulation boundary clip, step and zero the gradients.

        Returns:
            The global gradient norm before clipping at a boundary where it is known, else None.
        """

    @abstractmethod
    def save_weights(self, path: Path, param_names: list[str]) -> None:
        """Save the named parameters' full values (collective under ZeRO-3; rank 0 writes)."""

    @abstractmethod
    def load_weights(self, path: Path) -> list[str]:
        """Load saved parameter values into the model; return their names."""

    @abstractmethod
    def save_optimizer(self, path: Path) -> None:
        """Save the current phase's optimizer state (each rank its own partition)."""

    @abstractmethod
    def load_optimizer(self, path: Path) -> None:
        """Load the current phase's optimizer state (after :meth:`build` for the same block)."""

    @abstractmethod
    def stash_optimizer_state(self) -> Any:
        """The active block's optimizer state, moved to CPU, for ``optimizer_state: offload``."""

    @abstractmethod
    def restore_optimizer_state(self, state: Any) -> None:
        """Put back a state from :meth:`stash_optimizer_state` (after :meth:`build` for that block)."""

    def barrier(self) -> None:
        """Wait for every rank (no-op for one process)."""

    def gathered_state_dict(self) -> dict[str, torch.Tensor]:
        """Full parameter values (gathered from partitions), valid on rank 0."""
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def close(self) -> None:
        """End the run: tear down the last phase."""
        self.teardown()


class TorchOptimizerBackend(Backend):
    """A backend whose phase optimizer is a plain ``torch.optim`` over the active parameters
    (the torch reference and FSDP2): the optimizer's life, backward, clipping and the step."""

    def __init__(
        self,
        model: nn.Module,
        training: TrainingConfig,
        raw_config: dict[str, Any],
        optimizer_factory: OptimizerFactory | None,
    ) -> None:
        super().__init__(model, training, raw_config, optimizer_factory)
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
        for p in self.model.parameters():
            p.grad = None
        self._optimizer = None
        self._params = []

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.training.gradient_accumulation_steps).backward()

    def step(self, boundary: bool) -> float | None:
        if not boundary:
            return None
        assert self._optimizer is not None, "step() before build()"
        grads = [p.grad for p in self._params if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads)
        # a DTensor under FSDP2: full_tensor() all-reduces it, so every rank sees the same norm
        norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
        self.step_applied = math.isfinite(norm)
        if self.step_applied:
            if self.training.gradient_clipping > 0:
                torch.nn.utils.clip_grads_with_norm_(self._params, self.training.gradient_clipping, total)
            self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        return norm

    def discard_gradients(self) -> None:
        if self._optimizer is not None:
            self._optimizer.zero_grad(set_to_none=True)
