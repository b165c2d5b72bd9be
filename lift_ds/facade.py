"""The DeepSpeedEngine members real training loops read, on :class:`~lift_ds.engine.LiftEngine`.

Surveyed from the loops people run (DeepSpeed-Chat's step-1 ``main.py`` and its ``dschat`` utils,
Hugging Face ``Trainer`` and ``run_clm.py``, accelerate's DeepSpeed wrappers, TRL's ``sft.py``);
``docs/drop-in.md`` lists each member and what it means under LIFT. Three kinds:

- members with a run-long LIFT meaning, defined here for every backend (ranks, batch sizes, the
  accumulation boundary, learning rate and momentum, gradient norm, the throughput timer, the
  monitor, ZeRO stage and precision queries, 16-bit and consolidated state dicts, checkpointing
  switches, ``no_sync``, ``destroy``);
- :data:`NOT_UNDER_LIFT`: members that cannot mean the same when the engine is rebuilt at every
  phase; they raise :class:`NotUnderLiftError` saying why;
- every other DeepSpeedEngine member acts on the current phase's DeepSpeed engine (the active block;
  backend ``deepspeed``), and names neither knows come from the wrapped model, as DeepSpeedEngine
  forwards them.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .backends.engine_members import MISSING
from .blocks import enable_gradient_checkpointing
from .errors import NotUnderLiftError
from .utils import get_logger

logger = get_logger(__name__)


#: DeepSpeedEngine members that cannot mean the same under LIFT, and why
NOT_UNDER_LIFT = {
    "set_train_batch_size": (
        "LIFT plans its phases and its data position (a "
        "global sample index) from a fixed global batch; "
        "start the run with the batch you want (a checkpoint resumes with another one through allow_batch_change)"
    ),
    "set_train_micro_batch_size": (
        "the global batch is fixed for the run (see set_train_batch_size); "
        "set train_micro_batch_size_per_gpu in the config"
    ),
    "offload_states": (
        "the DeepSpeed engine and its optimizer are rebuilt at every phase; "
        "keep optimizer state off the device with "
        'zero_optimization.offload_optimizer, or between a block\'s phases with lift.optimizer_state "offload"'
    ),
    "reload_states": "see offload_states: there is no engine state to reload across LIFT's phase rebuilds",
    "compile": (
        "the model is re-wrapped by a new DeepSpeed engine at every phase, "
        "so a compiled engine would be thrown away at the first switch"
    ),
    "load_universal_checkpoint": (
        "LIFT's checkpoints are already independent of ranks and backend (load_checkpoint reads them on any layout)"
    ),
    "zero_load_from_fp32_weights": "LIFT's checkpoints always hold the full weights and the active block's fp32 master",
    "set_data_post_process_func": (
        "the training DataLoader is lift_ds's own "
        "(lift_ds.initialize(training_data=...)), not DeepSpeed's "
        "data-efficiency sampler, which each phase's engine would build anew"
    ),
    "set_custom_curriculum_learning_schedule": (
        "see set_data_post_process_func: DeepSpeed's curriculum sampler is not used"
    ),
}


class ThroughputTimer:
    """DeepSpeed's ``engine.tput_timer`` surface, run-long (DeepSpeed's own restarts with every engine):
    ``start()`` at a forward, ``stop(global_step)`` at each ``step()``, ``update_epoch_count()``,
    ``avg_samples_per_sec()``. The first ``start_step`` optimizer steps are not timed (warm-up), as in DeepSpeed."""

    def __init__(self, batch_size: int, start_step: int = 2) -> None:
        self.batch_size, self.start_step = batch_size, start_step
        self.epoch_count = self.micro_step_count = self.global_step_count = 0
        self.total_elapsed_time = self.step_elapsed_time = 0.0
        self.start_time, self.started = 0.0, False

    def update_epoch_count(self) -> None:
        self.epoch_count += 1
        self.micro_step_count = 0

    def start(self) -> None:
        if self.started:
            return
        self.started = True
        self.start_time = time.time() if self.global_step_count >= self.start_step else 0.0

    def stop(self, global_step: bool = False, report_speed: bool = True) -> None:
        if not self.started:
            return
        self.started = False
        self.micro_step_count += 1
        self.global_step_count += int(global_step)
        if self.start_time > 0:
            duration = time.time() - self.start_time
            self.total_elapsed_time += duration
            self.step_elapsed_time = 0.0 if global_step else self.step_elapsed_time + duration

    def avg_samples_per_sec(self) -> float:
        timed = self.global_step_count - self.start_step
        if timed <= 0 or self.total_elapsed_time <= 0:
            return float("-inf")
        return self.batch_size / (self.total_elapsed_time / timed)


class DisabledMonitor:
    """``engine.monitor`` where no DeepSpeed monitor (TensorBoard, W&B, CSV, Comet) is configured."""

    enabled = False

    def write_events(self, event_list: list) -> None:
        """Nothing is configured to receive them."""


class DeepSpeedEngineMembers:
    """DeepSpeedEngine members for :class:`~lift_ds.engine.LiftEngine` (see the module docstring)."""

    backend: Any
    module: torch.nn.Module

    # ----------------------------------------------------------------- where, who, how big

    @property
    def global_rank(self) -> int:
        return self.backend.rank

    @property
    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def dp_world_size(self) -> int:
        return self.backend.world_size

    @property
    def mp_world_size(self) -> int:
        return 1

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def global_steps(self) -> int:
        """Optimizer steps of the whole run (DeepSpeed's own engine restarts at 0 every phase)."""
        return self.global_step  # type: ignore[attr-defined]

    @property
    def global_samples(self) -> int:
        return self.samples_seen  # type: ignore[attr-defined]

    def gradient_accumulation_steps(self) -> int:
        return self.config.training.gradient_accumulation_steps  # type: ignore[attr-defined]

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.config.training.micro_batch_size  # type: ignore[attr-defined]

    def train_batch_size(self) -> int:
        return self.config.training.train_batch_size  # type: ignore[attr-defined]

    def get_batch_info(self) -> tuple[int, int, int]:
        return self.train_batch_size(), self.train_micro_batch_size_per_gpu(), self.gradient_accumulation_steps()

    def is_gradient_accumulation_boundary(self) -> bool:
        """True when the next :meth:`step` is an optimizer step."""
        return (self.micro_steps + 1) % self.gradient_accumulation_steps() == 0  # type: ignore[attr-defined]

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        """Accepted where it agrees with LIFT's own count (accelerate sets it at every backward);
        LIFT counts micro-steps itself because phase switches happen on optimizer-step boundaries."""
        if bool(is_boundary) != self.is_gradient_accumulation_boundary():
            raise NotUnderLiftError(
                f"set_gradient_accumulation_boundary({is_boundary}): "
                "LIFT counts micro-steps itself (gradient_accumulation_steps="
                f"{self.gradient_accumulation_steps()}, "
                f"micro step {self.micro_steps + 1}), because its phase switches happen at "  # type: ignore[attr-defined]
                "optimizer steps; set gradient_accumulation_steps in the config to the accumulation you run"
            )

    # ----------------------------------------------------------------- precision and ZeRO queries

    def zero_optimization_stage(self) -> int:
        """The ZeRO stage (backend ``fsdp`` shards like stage 3 and reports 3; ``torch`` 0)."""
        return self.backend.memory_layout()[0]

    def zero_optimization(self) -> bool:
        return self.zero_optimization_stage() > 0

    def zero_optimization_partition_gradients(self) -> bool:
        return self.zero_optimization_stage() >= 2

    def zero_optimization_partition_weights(self) -> bool:
        return self.zero_optimization_stage() >= 3

    def zero_offload_optimizer(self) -> bool:
        return self.backend.memory_layout()[1]

    zero_cpu_offload = zero_offload_optimizer

    def bfloat16_enabled(self) -> bool:
        return self.config.training.precision == "bf16"  # type: ignore[attr-defined]

    def fp16_enabled(self) -> bool:
        return self.config.training.precision == "fp16"  # type: ignore[attr-defined]

    def gradient_clipping(self) -> float:
        return self.config.training.gradient_clipping  # type: ignore[attr-defined]

    def steps_per_print(self) -> int | None:
        return self.config.raw.get("steps_per_print")  # type: ignore[attr-defined]

    # ----------------------------------------------------------------- learning rate, steps

    def get_lr(self) -> list[float]:
        """The scheduled learning rates (one per group of the optimizer you passed; the first group's otherwise)."""
        return self.lr_scheduler.get_last_lr()  # type: ignore[attr-defined]

    def get_mom(self) -> list[Any]:
        opt = self.backend.optimizer
        return [] if opt is None else [g.get("betas", g.get("momentum")) for g in opt.param_groups]

    def get_global_grad_norm(self) -> float | None:
        return self.last_grad_norm  # type: ignore[attr-defined]

    def was_step_applied(self) -> bool:
        return not self.last_step_skipped  # type: ignore[attr-defined]

    @property
    def tput_timer(self) -> ThroughputTimer:
        return self._tput_timer  # type: ignore[attr-defined]

    @property
    def monitor(self) -> Any:
        return self.backend.monitor() or DisabledMonitor()

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward without gradient reduction, as DeepSpeed's (``step()`` inside it is an error)."""
        self._in_no_sync = True
        try:
            with self.backend.no_sync():
                yield
        finally:
            self._in_no_sync = False

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """Hugging Face's switch (DeepSpeed forwards it to the model), made LIFT's: non-reentrant checkpointing that
        keeps truncated backward (transformers' default, reentrant, would back-propagate through every frozen block)."""
        given = {**(gradient_checkpointing_kwargs or {}), **kwargs}
        if given.pop("use_reentrant", False):
            logger.info(
                "gradient_checkpointing_enable(use_reentrant=True): "
                "LIFT runs non-reentrant checkpointing (it keeps truncated backward)"
            )
        enable_gradient_checkpointing(self.module, **given)

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """Refused (nn.Module and DeepSpeedEngine both have it): see :data:`NOT_UNDER_LIFT`."""
        raise NotUnderLiftError(f"LiftEngine.compile: not under LIFT: {NOT_UNDER_LIFT['compile']}")

    def destroy(self) -> None:
        """Release the engine (as :meth:`close`)."""
        self.close()  # type: ignore[attr-defined]

    # ----------------------------------------------------------------- weights out

    def _trained_names(self) -> set[str]:
        plan = self.plan  # type: ignore[attr-defined]
        return set(plan.param_names_of(range(len(plan.candidates))))

    def _full_state(self, exclude_frozen_parameters: bool) -> dict[str, torch.Tensor] | None:
        """The consolidated state dict on rank 0 (None elsewhere); collective. "Frozen" under LIFT means what the
        plan never trains (every block is frozen between its phases)."""
        state = self.backend.full_state_dict()
        if self.global_rank != 0:
            return None
        if self.quant is not None:  # type: ignore[attr-defined]
            state.update(self.quant.exact_weights())  # type: ignore[attr-defined]
        if exclude_frozen_parameters:
            keep = self._trained_names()
            state = {k: v for k, v in state.items() if k in keep}
        return state

    def _zero3_consolidated_16bit_state_dict(
        self, exclude_frozen_parameters: bool = False
    ) -> dict[str, torch.Tensor] | None:
        """The full state dict on rank 0 (None on the others), gathered one parameter at a time; collective."""
        return self._full_state(exclude_frozen_parameters)

    def zero_gather_16bit_weights_on_model_save(self) -> bool:
        """Whether :meth:`save_16bit_model` writes under this config (DeepSpeed ZeRO-3: only with
        ``stage3_gather_16bit_weights_on_model_save``; everything else: always)."""
        return self.backend.gathers_16bit_on_save()

    def module_state_dict(
        self,
        destination: Any = None,
        prefix: str = "",
        keep_vars: bool = False,
        exclude_frozen_parameters: bool = False,
    ) -> dict[str, torch.Tensor]:
        state = self.module.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        if exclude_frozen_parameters:
            keep = {prefix + n for n in self._trained_names()}
            state = type(state)((k, v) for k, v in state.items() if k in keep)
        return state

    def save_16bit_model(
        self,
        save_dir: str | os.PathLike,
        save_filename: str = "pytorch_model.bin",
        exclude_frozen_parameters: bool = False,
    ) -> bool:
        """The consolidated weights in the training dtype, written by rank 0 (collective), as DeepSpeed's: under
        ZeRO-3 only when ``stage3_gather_16bit_weights_on_model_save`` is true. A ``.safetensors`` name writes
        safetensors."""
        path = Path(save_dir) / save_filename
        if not self.zero_gather_16bit_weights_on_model_save():
            logger.info("Did not save the model %s because stage3_gather_16bit_weights_on_model_save is False", path)
            return False
        state = self._full_state(exclude_frozen_parameters)
        if state is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            if save_filename.endswith(".safetensors"):
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in state.items()}, str(path))
            else:
                torch.save(state, path)
        self.backend.barrier()
        return True

    save_fp16_model = save_16bit_model

    # ----------------------------------------------------------------- everything else

    def _member(self, name: str) -> Any:
        """``name`` as DeepSpeedEngine would resolve it: :data:`NOT_UNDER_LIFT`, the phase's DeepSpeed engine,
        the model."""
        if name in NOT_UNDER_LIFT:
            raise NotUnderLiftError(f"LiftEngine.{name}: not under LIFT: {NOT_UNDER_LIFT[name]}")
        backend = self.__dict__.get("backend")
        found = backend.library_member(name) if backend is not None else MISSING
        if found is not MISSING:
            return found
        model = self._modules.get("module")  # type: ignore[attr-defined]
        if model is not None:
            try:
                return getattr(model, name)
            except AttributeError:
                pass
        why = backend.library_member_problem(name) if backend is not None else None
        if why:
            raise NotUnderLiftError(f"LiftEngine.{name}: {why}")
        raise AttributeError(
            f"'{type(self).__name__}' object has no attribute {name!r} (nor has the "
            f"{type(model).__name__} it wraps, nor DeepSpeedEngine)"
        )
