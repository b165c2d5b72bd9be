"""The backend protocol: what the engine asks of a distributed (or plain) training backend.

The engine owns the plan, freezing, the lr schedule and micro-step counting; the checkpointer the checkpoint layout; a
backend the wrapped model, the per-phase optimizer, backward, the optimizer step (with clipping), how weights and
optimizer state are stored, parameter sizes, collectives, and its own config checks (:meth:`Backend.check_config`)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import LiftConfig, TrainingConfig
from ..errors import ConfigError
from ..optim import OptimizerFactory, optimizer_backend_problems, optimizer_factory_from_section
from ..optim_checks import probe_optimizer
from . import ds_config_keys, hardware
from .engine_members import EngineMembers
from .lr_schedules import config_lr, scheduler_problems
from .state import (
    OPTIMIZER_FILE,
    OPTIMIZER_FORMAT,
    WEIGHTS_FILE,
    load_torch_optimizer_full_state,
    placed_like,
    torch_optimizer_full_state,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..run_config import RunConfig


@dataclass
class BackendContext:
    """What every backend is built from.

    Attributes:
        model: the model; it stays the same object for the whole run.
        config: the checked run configuration.
        optimizer_factory: builds the phase optimizer from the active parameters (None: the backend
            builds the config's ``"optimizer"`` section its own way).
        passthrough: arguments of :func:`lift_ds.initialize` meant for the backend's library
            (DeepSpeed's ``mpu`` and ``dist_init_required``); None values are absent.
        param_groups: splits the active parameters into parameter groups with their own settings
            (:class:`~lift_ds.optim.NamedGroups`); the optimizer is built over the groups. None: one group.
    """

    model: nn.Module
    config: RunConfig
    optimizer_factory: OptimizerFactory | None = None
    passthrough: Mapping[str, Any] = field(default_factory=dict)
    param_groups: Callable[[list[nn.Parameter]], list[dict[str, Any]]] | None = None

    @property
    def training(self) -> TrainingConfig:
        return self.config.training


class Backend(EngineMembers, ABC):
    """Base class of the LIFT backends (see the module docstring)."""

    name = "base"
    #: runs optimizers that update 16-bit weights themselves (``AdamW8bit``, see lift_ds.optim)
    runs_16bit_optimizers = False

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx
        self.model = ctx.model
        self.training = ctx.config.training
        self.optimizer_factory = ctx.optimizer_factory
        self.param_groups = ctx.param_groups
        self.rank = 0
        self.world_size = 1
        #: False after a boundary :meth:`step` that did not change the weights (a non-finite
        #: gradient norm, or DeepSpeed's fp16 loss scaler skipping an overflow).
        self.step_applied = True

    # ----------------------------------------------------------------- configuration

    @classmethod
    def check_config(
        cls, lift: LiftConfig, training: TrainingConfig, raw: Mapping[str, Any], world_size: int, baseline: str = "lift"
    ) -> tuple[Any, list[str]]:
        """``(typed backend options, problems)`` for a config this backend would run; no process group.

        The base checks what every backend gives one meaning: the precision on this hardware, ``optimizer`` (as
        torch.optim), ``scheduler``; subclasses add their own keys (``raw``: the whole config; ``baseline``:
        lift/full/lora).
        """
        problems = hardware.precision_problems(cls.name, training.precision)
        problems += ds_config_keys.section_problems(raw, ("bf16", "fp16"))  # e.g. a misspelled "enable": silently fp32
        problems += optimizer_backend_problems(training.optimizer, cls.name, cls.runs_16bit_optimizers)
        problems += cls.optimizer_section_problems(training.optimizer)
        if training.scheduler is not None:
            problems += scheduler_problems(training.scheduler, lift.total_steps, config_lr(training.optimizer))
        return None, problems

    @classmethod
    def optimizer_section_problems(cls, section: Mapping[str, Any] | None) -> list[str]:
        """Problems of the ``optimizer`` section when this backend builds it as a ``torch.optim``."""
        if section is None or not isinstance(section.get("params", {}), Mapping):
            return []
        try:  # built once on a dummy parameter: torch's own argument checks, here, named by JSON path
            factory = optimizer_factory_from_section(section)
        except ConfigError as e:
            return e.problems
        return probe_optimizer(factory, "optimizer.params", dict(section.get("params", {})))

    @classmethod
    def client_optimizer_problems(cls, raw: Mapping[str, Any], optimizer_class: str) -> list[str]:
        """Problems of running the client's optimizer (class name ``optimizer_class``) with this config."""
        return []

    @staticmethod
    def foreign_section_problems(raw: Mapping[str, Any], name: str, sections: Mapping[str, str]) -> list[str]:
        """A backend-specific section the backend ``name`` cannot honour, e.g. ``fsdp`` under DeepSpeed."""
        return [
            f'{key}: this section only applies to lift.backend "{owner}" (the backend is "{name}"); remove it or set '
            f'lift.backend to "{owner}"'
            for key, owner in sections.items()
            if raw.get(key) is not None
        ]

    def memory_layout(self) -> tuple[int, bool]:
        """``(zero_stage, optimizer_offloaded)`` for :func:`lift_ds.memory.state_bytes` (FSDP: stage 3)."""
        return 0, False

    @classmethod
    def planned_memory_layout(cls, options: Any) -> tuple[int, bool]:
        """:meth:`memory_layout` from the checked options, before any backend is built (memory preflight)."""
        return 0, False

    # ----------------------------------------------------------------- sizes and collectives

    def numel(self, p: torch.Tensor) -> int:
        """Elements of a parameter's full value (a partitioned parameter counts whole)."""
        return p.numel()

    @property
    def comm_device(self) -> torch.device:
        """Where small collective tensors live (the accelerator under NCCL, else the CPU)."""
        return torch.device("cpu")

    def _distributed(self) -> bool:
        return self.world_size > 1 and dist.is_initialized()

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (collective when distributed)."""
        if not self._distributed():
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over ranks (float64; collective when distributed)."""
        if not self._distributed():
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return t.cpu().tolist()

    def barrier(self) -> None:
        """Wait for every rank (no-op for one process)."""
        if self._distributed():
            dist.barrier()

    # ----------------------------------------------------------------- phases and steps

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
    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        """Backward of one micro-batch's loss (scaled by 1 / gradient_accumulation_steps)."""

    @abstractmethod
    def step(self, boundary: bool) -> float | None:
        """End a micro-step; at an accumulation boundary clip, step and zero the gradients.

        Returns:
            The global gradient norm before clipping at a boundary where it is known, else None.
        """

    @abstractmethod
    def optimizer_state_numel(self) -> int:
        """Elements of optimizer state this rank holds (its partition of the active block's moments)."""

    # ----------------------------------------------------------------- weights and state

    @abstractmethod
    def save_weights(self, path: Path, param_names: list[str]) -> None:
        """Save the named parameters' full values (collective under ZeRO-3; rank 0 writes)."""

    @abstractmethod
    def load_weights(self, path: Path, skip: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
        """Load saved parameter values into the model (all but ``skip``); return their names."""

    # ----------------------------------------------------------------- optimizer state, portable

    @abstractmethod
    def full_optimizer_state(self) -> dict[str, Any]:
        """The active block's optimizer state as full per-parameter tensors on CPU, on every rank
        (collective): ``{"step": float | None, "keys": [...], "state": {name: {key: tensor}},
        "master": {name: fp32 tensor}}``. ``master`` is the fp32 value the optimizer updates (the
        parameter itself, or DeepSpeed's fp32 master copy). Independent of ranks and backend."""

    @abstractmethod
    def load_full_optimizer_state(self, state: dict[str, Any]) -> None:
        """Set the active block's optimizer state (and fp32 master) from :meth:`full_optimizer_state`'s
        form; after :meth:`build` for the same block; every rank passes the same full state."""

    def save_optimizer(self, path: Path) -> None:
        """Write the active block's optimizer state in the portable form (collective; rank 0 writes)."""
        state = self.full_optimizer_state()
        if self.rank == 0:
            torch.save({"format": OPTIMIZER_FORMAT, **state}, path / OPTIMIZER_FILE)

    def load_optimizer(self, state: dict[str, Any]) -> None:
        """Load a state written by :meth:`save_optimizer` (read and checked by the checkpointer), on any
        number of ranks and any backend."""
        self.load_full_optimizer_state(state)

    def stash_optimizer_state(self) -> dict[str, Any]:
        """The active block's optimizer state for ``optimizer_state: offload``, kept on CPU and split
        across ranks by parameter (rank ``r`` keeps parameters ``i`` with ``i % world == r``), so the
        stash is as portable as a checkpoint and each rank holds about 1/world of it."""
        full = self.full_optimizer_state()
        names = list(full["master"])
        owned = {
            n: {"master": full["master"][n], **full["state"].get(n, {})}
            for i, n in enumerate(names)
            if i % self.world_size == self.rank
        }
        shapes = {n: tuple(full["master"][n].shape) for n in names}
        return {"step": full["step"], "keys": full["keys"], "names": names, "shapes": shapes, "owned": owned}

    def restore_optimizer_state(self, stash: dict[str, Any]) -> None:
        """Put back a :meth:`stash_optimizer_state` (after :meth:`build` for that block; collective:
        each parameter's state comes from the rank that kept it)."""
        full: dict[str, Any] = {"step": stash["step"], "keys": stash["keys"], "state": {}, "master": {}}
        for i, n in enumerate(stash["names"]):
            owner = i % self.world_size
            tensors = []
            for key in ["master", *stash["keys"]]:
                t = (
                    stash["owned"][n][key]
                    if owner == self.rank
                    else torch.empty(stash["shapes"][n], dtype=torch.float32)
                )
                tensors.append(self.broadcast(t, owner))
            full["master"][n] = tensors[0]
            full["state"][n] = dict(zip(stash["keys"], tensors[1:]))
        self.load_full_optimizer_state(full)

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """``tensor`` from rank ``src`` on every rank (a CPU tensor back; collective when distributed)."""
        if not self._distributed():
            return tensor
        t = tensor.to(self.comm_device)
        dist.broadcast(t, src)
        return t.cpu()

    def active_param_names(self) -> list[str]:
        """Names of the parameters the current phase trains, in model order."""
        names = self._param_names()
        return [names[id(p)] for p in self.active_params()]

    def _param_names(self) -> dict[int, str]:
        # not cached: Q-LIFT gives a layer new parameter objects each time it becomes active
        return {id(p): n for n, p in self.model.named_parameters()}

    @abstractmethod
    def active_params(self) -> list[nn.Parameter]:
        """The parameters the current phase trains (empty between phases)."""

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full parameter values (gathered from partitions) on the host, valid on rank 0; collective.
        A tensor already on the host is the parameter itself, not a copy (an export of a 70B layer
        costs no second copy): read it, do not modify it."""
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def precision_state(self) -> dict[str, Any]:
        """Mixed-precision state that must outlive a phase and go into checkpoints (DeepSpeed: the
        fp16 dynamic loss scale); empty where there is none."""
        return {}

    def load_precision_state(self, state: dict[str, Any]) -> None:
        """Take :meth:`precision_state` back (on resume, before the phase is built)."""

    def close(self) -> None:
        """End the run: tear down the last phase."""
        self.teardown()


class TorchOptimizerBackend(Backend):
    """A backend whose phase optimizer is a plain ``torch.optim`` over the active parameters
    (the torch reference and FSDP2): the optimizer's life, backward, clipping and the step.

    When the model's weights are 16-bit (the torch backend with ``bf16``), the active block trains
    through fp32 master copies, as DeepSpeed's ZeRO optimizers do: gradients are copied up, clipped and
    stepped in fp32, and the result is written back into the 16-bit weights; frozen blocks stay 16-bit.
    """

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        if self.optimizer_factory is None:
            if self.training.optimizer is None:
                raise ConfigError(['optimizer: none given; pass optimizer= a callable or add an "optimizer" section'])
            self.optimizer_factory = optimizer_factory_from_section(self.training.optimizer)
        self._optimizer: torch.optim.Optimizer | None = None
        self._params: list[nn.Parameter] = []
        #: what the optimizer updates: the parameters, or fp32 masters of 16-bit ones
        self._masters: list[nn.Parameter] = []

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self._optimizer

    def _half(self) -> bool:
        return any(p.dtype in (torch.bfloat16, torch.float16) for p in self._params)

    def build(self, params: list[nn.Parameter]) -> None:
        self._params = params
        for p in params:
            p.grad = None
        # an optimizer that updates 16-bit weights itself (AdamW8bit with stochastic rounding) gets them directly
        own = getattr(self.optimizer_factory, "updates_16bit_weights", False)
        self._masters = (
            [nn.Parameter(p.detach().float().clone()) for p in params] if self._half() and not own else params
        )
        master_of = {id(p): m for p, m in zip(params, self._masters)}
        groups = (
            [{**g, "params": [master_of[id(p)] for p in g["params"]]} for g in self.param_groups(params)]
            if self.param_groups
            else None
        )
        self._optimizer = self.optimizer_factory(groups if groups is not None else self._masters)

    def teardown(self) -> None:
        for p in self.model.parameters():
            p.grad = None
        self._optimizer = None
        self._params, self._masters = [], []

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        (loss / self.training.gradient_accumulation_steps).backward(retain_graph=retain_graph)

    def step(self, boundary: bool) -> float | None:
        if not boundary:
            return None
        assert self._optimizer is not None, "step() before build()"
        if self._masters is not self._params:  # 16-bit weights: the step runs on fp32 masters
            for m, p in zip(self._masters, self._params):
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None
        grads = [m.grad for m in self._masters if m.grad is not None]
        total = torch.nn.utils.get_total_norm(grads)
        # a DTensor under FSDP2: full_tensor() all-reduces it, so every rank sees the same norm
        norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
        self.step_applied = math.isfinite(norm)
        if self.step_applied:
            if self.training.gradient_clipping > 0:
                torch.nn.utils.clip_grads_with_norm_(self._masters, self.training.gradient_clipping, total)
            self._optimizer.step()
            if self._masters is not self._params:
                with torch.no_grad():
                    for m, p in zip(self._masters, self._params):
                        p.copy_(m)
        self._optimizer.zero_grad(set_to_none=True)
        return norm

    def discard_gradients(self) -> None:
        if self._optimizer is not None:
            self._optimizer.zero_grad(set_to_none=True)
        for p in self._params:
            p.grad = None

    def active_params(self) -> list[nn.Parameter]:
        return list(self._params)

    def save_weights(self, path: Path, param_names: list[str]) -> None:
        from safetensors.torch import save_file

        named = dict(self.model.named_parameters())
        values = {
            n: (named[n].full_tensor() if hasattr(named[n], "full_tensor") else named[n])
            .detach()
            .to("cpu", copy=True)
            .contiguous()
            for n in param_names
        }
        if self.rank == 0:
            save_file(values, str(path / WEIGHTS_FILE))

    def load_weights(self, path: Path, skip: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
        from safetensors import safe_open

        named = dict(self.model.named_parameters())
        with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f, torch.no_grad():
            names = [n for n in f.keys() if n not in skip]
            for n in names:
                p, value = named[n], placed_like(f.get_tensor(n), named[n])
                (p.to_local() if hasattr(p, "to_local") else p).copy_(
                    value.to_local() if hasattr(value, "to_local") else value
                )
        return names

    def full_optimizer_state(self) -> dict[str, Any]:
        assert self._optimizer is not None, "full_optimizer_state() before build()"
        return torch_optimizer_full_state(self._optimizer, self.active_param_names(), self._masters)

    def load_full_optimizer_state(self, state: dict[str, Any]) -> None:
        assert self._optimizer is not None, "load_full_optimizer_state() before build()"
        load_torch_optimizer_full_state(self._optimizer, self.active_param_names(), self._masters, state)
        if self._masters is not self._params:
            with torch.no_grad():
                for m, p in zip(self._masters, self._params):
                    p.copy_(m)

    def optimizer_state_numel(self) -> int:
        if self._optimizer is None:
            return 0
        total = 0
        for st in self._optimizer.state.values():
            for v in st.values():
                if torch.is_tensor(v) and v.dim() > 0:
                    total += v.to_local().numel() if hasattr(v, "to_local") else v.numel()
        return total
