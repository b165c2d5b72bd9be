"""LiftEngine: the phase loop behind a DeepSpeed-compatible facade.

The engine walks the plan one optimizer step at a time; at each phase boundary exactly the new
block (plus ``always_trainable``) has ``requires_grad=True`` and the backend is rebuilt for it.
Its components: the backend (model wrapping, optimizer, collectives), the
:class:`~lift_ds.optim.CrossPhaseLRScheduler`, the :class:`~lift_ds.guards.StepGuard` (NaN/inf
skips, divergence) and the :class:`~lift_ds.checkpoint.Checkpointer`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .backends.base import Backend
from .blocks import set_trainable
from .checkpoint import Checkpointer, CheckpointError, ResumeError  # noqa: F401  (re-exported)
from .config import RunConfig
from .guards import DivergenceError, PhaseOutOfMemoryError, StepGuard, is_out_of_memory, oom_message  # noqa: F401
from .optim import CrossPhaseLRScheduler
from .plan import LiftPlan
from .schedule import PhaseCursor
from .utils import get_logger

logger = get_logger(__name__)


class LiftEngine:
    """Trains one block at a time, following the plan, through a backend.

    Use it like a DeepSpeed engine: ``loss = engine(**batch).loss``, ``engine.backward(loss)``,
    ``engine.step()``.

    Args:
        model: the model to fine-tune.
        config: the run configuration.
        plan: the resolved plan (:func:`lift_ds.plan.resolve_plan`).
        backend: a backend built for this model.
        lr_scheduler: the run-long learning-rate schedule.
    """

    def __init__(self, model: nn.Module, config: RunConfig, plan: LiftPlan, backend: Backend, lr_scheduler: CrossPhaseLRScheduler) -> None:
        self.module = model
        self.config = config
        self.lift = config.lift
        self.training = config.training
        self.backend = backend
        self.lr_scheduler = lr_scheduler
        self.plan = plan
        self.candidates = list(plan.candidates)
        self.cursor = PhaseCursor(list(plan.steps), list(plan.units))
        self.guard = StepGuard(self.lift.max_consecutive_skipped_steps, self.training.precision)
        self.checkpointer = Checkpointer(self)
        self.micro_steps = 0
        #: global samples read so far (the data position: a resumed run continues from here)
        self.samples_seen = 0
        self.last_grad_norm: float | None = None
        self.phase_switch_seconds = 0.0
        self.phase_switches = 0
        #: stashed optimizer states per unit (``optimizer_state: offload``, LIFT only: a unit is a block)
        self.stash: dict[int, Any] = {}
        self._active: int | None = None
        #: Q-LIFT: the quantized (and / or streamed) frozen layers and their block store
        #: (``lift.frozen_weights``, ``lift.stream_frozen``)
        self.quant = None
        if self.lift.frozen_weights != "full" or self.lift.stream_frozen:
            from .quant import build_quantized_blocks

            self.quant = build_quantized_blocks(model, plan, self.lift.frozen_weights, self.lift.block_store, self.lift.block_store_dir,
                                               self.training.precision, stream=self.lift.stream_frozen)
        problem = plan.never_trained_problem()
        if problem:
            logger.warning("%s", problem)
        logger.info(
            "%s: %d candidate blocks (%s .. %s), %d steps, schedule=%s policy=%s, %d phases, backend=%s (%s)",
            self.lift.method.upper(), len(self.candidates), self.candidates[0].name, self.candidates[-1].name, plan.total_steps,
            self.lift.schedule, self.lift.policy, len(plan.phases), backend.name, config.backend_reason or "lift.backend",
        )
        self.start_phase(self.cursor.block)

    # ----------------------------------------------------------------- where the run is

    @property
    def global_step(self) -> int:
        """Optimizer steps taken so far."""
        return self.cursor.step

    @property
    def done(self) -> bool:
        """True once the plan's ``total_steps`` steps are taken."""
        return self.cursor.done

    @property
    def active_block(self) -> str | None:
        """Name of the block training now, ``a+b`` for several (None once the plan is finished)."""
        return None if self._active is None else self.plan.unit_name(self._active)

    @property
    def active_block_index(self) -> int | None:
        """Index (into ``plan.units``; for LIFT the same as into :attr:`candidates`) of the unit training now."""
        return self._active

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The current phase's optimizer; it is a new object after every phase boundary."""
        return self.backend.optimizer

    @property
    def world_size(self) -> int:
        return self.backend.world_size

    @property
    def rank(self) -> int:
        return self.backend.rank

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for a non-finite loss or gradient norm (and fp16 overflows)."""
        return self.guard.skipped_steps

    @property
    def consecutive_skipped_steps(self) -> int:
        return self.guard.consecutive_skipped_steps

    @property
    def last_step_skipped(self) -> bool:
        return self.guard.last_step_skipped

    def trainable_param_names(self, block: int | None = None) -> list[str]:
        """Parameters trained while unit ``block`` (default: the active one) is active."""
        return self.plan.trainable_param_names(self._active if block is None else block)

    def saved_param_names(self) -> list[str]:
        """What a checkpoint saves: every block trained so far (all of the plan's once done)."""
        visited = self.cursor.visited_blocks() if not self.done else set(self.plan.steps)
        return self.plan.param_names_of(c for u in visited for c in self.plan.units[u])

    # DeepSpeed engine methods users call
    def gradient_accumulation_steps(self) -> int:
        return self.training.gradient_accumulation_steps

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.training.micro_batch_size

    def train_batch_size(self) -> int:
        return self.training.train_batch_size

    def is_gradient_accumulation_boundary(self) -> bool:
        """True when the next :meth:`step` is an optimizer step."""
        return (self.micro_steps + 1) % self.training.gradient_accumulation_steps == 0

    def get_lr(self) -> list[float]:
        return self.lr_scheduler.get_last_lr()

    def train(self, mode: bool = True) -> "LiftEngine":
        self.module.train(mode)
        return self

    def eval(self) -> "LiftEngine":
        return self.train(False)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.module.parameters()

    # ----------------------------------------------------------------- phases

    def start_phase(self, block: int, restore_stash: bool = True) -> None:
        """Make unit ``block`` the trainable one and rebuild the backend over it (ending any current phase)."""
        t0 = time.perf_counter()
        self.end_phase(stash=self.lift.optimizer_state == "offload")
        if self.quant is not None:
            for c in self.plan.units[block]:
                self.quant.activate(self.candidates[c].name)
        params = set_trainable(self.module, self.trainable_param_names(block))
        try:
            self.backend.build(params)
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            raise PhaseOutOfMemoryError(oom_message(self.plan.unit_name(block), params, self.backend, e)) from e
        self._active = block
        assert self.backend.optimizer is not None
        self.lr_scheduler.attach(self.backend.optimizer)
        if restore_stash and block in self.stash:
            self.backend.restore_optimizer_state(self.stash.pop(block))
        self.phase_switch_seconds += time.perf_counter() - t0
        self.phase_switches += 1
        ph = self.cursor.phase
        logger.info("phase %d/%d: training %s (%d parameter tensors) for steps %d..%d",
                    ph.index + 1, len(self.plan.phases), self.plan.unit_name(block), len(params), ph.start + 1, ph.stop)

    def end_phase(self, stash: bool = False) -> None:
        """Release the current phase (optimizer, gradients, any engine); with ``stash`` keep the
        block's optimizer state on CPU for its next phase. Everything is frozen afterwards."""
        if self._active is not None and stash:
            self.stash[self._active] = self.backend.stash_optimizer_state()
        self.backend.teardown()
        if self.quant is not None and self._active is not None:
            for c in self.plan.units[self._active]:
                self.quant.deactivate(self.candidates[c].name)
        self._active = None
        set_trainable(self.module, [])

    # ----------------------------------------------------------------- training

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model (through the backend's wrapper)."""
        return self.backend.forward(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss; gradients reach the active block only."""
        if self.done:
            raise RuntimeError(f"backward() after the plan finished ({self.plan.total_steps} steps); raise lift.total_steps")
        self.backend.backward(self.guard.poison(loss))

    def step(self) -> None:
        """End a micro-step. At an accumulation boundary: optimizer step (or a skip, see
        :class:`~lift_ds.guards.StepGuard`), schedule step, and a phase switch when the plan moves
        to another block."""
        if self.done:
            raise RuntimeError(f"step() after the plan finished ({self.plan.total_steps} steps); raise lift.total_steps")
        if not self.is_gradient_accumulation_boundary():
            self.backend.step(False)
            self.micro_steps += 1
            return
        bad_loss = self.guard.window_had_bad_loss(self.backend)
        if self.quant is not None:
            self.quant.around_optimizer_step(before=True)
        if bad_loss:
            self.backend.discard_gradients()
            norm, applied = None, False
        else:
            self.lr_scheduler.apply(self.backend.optimizer)
            norm = self.backend.step(True)
            applied = self.backend.step_applied
        self.micro_steps += 1
        self.samples_seen += self.training.train_batch_size
        self.last_grad_norm = norm
        self.guard.record(applied, bad_loss, norm, self.global_step + 1, self.active_block)
        self.lr_scheduler.step()
        if self.cursor.advance():
            self.start_phase(self.cursor.block)
        elif not self.cursor.done:
            self.lr_scheduler.apply(self.backend.optimizer)
        else:
            # the last engine stays (ZeRO-3 forward needs its hooks for evaluation and export) until close()
            self._active = None
            set_trainable(self.module, [])
        if self.quant is not None:
            self.quant.around_optimizer_step(before=False)

    def close(self) -> None:
        """Release the backend (the last engine, optimizer, gradients)."""
        self.backend.close()
        self._active = None
        if self.quant is not None:
            self.quant.close()

    # ----------------------------------------------------------------- checkpoints

    def save_checkpoint(self, save_dir: str | os.PathLike, tag: str | None = None, client_state: dict | None = None) -> Path:
        """Save everything a resumed run needs (see :mod:`lift_ds.checkpoint`); collective.

        Returns:
            The checkpoint directory.
        """
        return self.checkpointer.save(save_dir, tag, client_state)

    def load_checkpoint(self, load_dir: str | os.PathLike, tag: str | None = None, allow_batch_change: bool = False) -> tuple[Path | None, dict]:
        """Resume from ``load_dir/<tag>`` (default: the tag in ``load_dir/latest``), on any number
        of ranks and any backend; see :mod:`lift_ds.checkpoint`.

        Returns:
            ``(path, client_state)`` like DeepSpeed; ``(None, {})`` when there is no checkpoint.

        Raises:
            ResumeError: the checkpoint cannot be resumed by this run as configured.
        """
        return self.checkpointer.load(load_dir, tag, allow_batch_change)
