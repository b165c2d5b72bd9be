"""LiftEngine: the phase loop behind a DeepSpeed-compatible facade.

The engine walks the plan one optimizer step at a time; at each phase boundary exactly the new
block (plus ``always_trainable``) has ``requires_grad=True`` and the backend is rebuilt for it.
Its components: the backend (model wrapping, optimizer, collectives), the
:class:`~lift_ds.optim.CrossPhaseLRScheduler`, the :class:`~lift_ds.guards.StepGuard` (NaN/inf
skips, divergence) and the :class:`~lift_ds.checkpoint.Checkpointer`.
"""

from __future__ import annotations

import atexit
import os
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import faults
from .backends.base import Backend
from .blocks import set_trainable
from .checkpoint import Checkpointer
from .errors import NotUnderLiftError, PhaseOutOfMemoryError
from .facade import DeepSpeedEngineMembers, ThroughputTimer
from .guards import StepGuard, is_out_of_memory, oom_message
from .optim import CrossPhaseLRScheduler
from .plan import LiftPlan
from .run_config import RunConfig
from .schedule import PhaseCursor
from .utils import get_logger

logger = get_logger(__name__)


class LiftEngine(DeepSpeedEngineMembers, nn.Module):
    """Trains one block at a time, following the plan, through a backend.

    Use it like a DeepSpeed engine: ``loss = engine(**batch).loss``, ``engine.backward(loss)``,
    ``engine.step()``. Like DeepSpeedEngine it is an ``nn.Module`` wrapping the model as
    ``engine.module`` (``named_parameters()`` names start with ``module.``, ``train()``/``eval()``
    reach the model), carries the DeepSpeedEngine members training loops read
    (:mod:`lift_ds.facade`), and forwards other attribute names to the model.

    Args:
        model: the model to fine-tune.
        config: the run configuration.
        plan: the resolved plan (:func:`lift_ds.plan.resolve_plan`).
        backend: a backend built for this model.
        lr_scheduler: the run-long learning-rate schedule.
    """

    def __init__(
        self, model: nn.Module, config: RunConfig, plan: LiftPlan, backend: Backend, lr_scheduler: CrossPhaseLRScheduler
    ) -> None:
        nn.Module.__init__(self)
        self.module = model
        self.config = config
        self.lift = config.lift
        #: the checked training keys (``self.training`` is nn.Module's train/eval flag)
        self.training_config = config.training
        self.training = model.training
        self.backend = backend
        self.lr_scheduler = lr_scheduler
        self.plan = plan
        self.candidates = list(plan.candidates)
        self.cursor = PhaseCursor(list(plan.steps), list(plan.units))
        self.guard = StepGuard(self.lift.max_consecutive_skipped_steps, self.training_config.precision)
        #: settings outside the config that decide the result, recorded in checkpoints and compared on
        #: resume (lift_ds.initialize adds the optimizer and schedule; the launcher the data, seed, model)
        self.run_fingerprint: dict[str, Any] = {}
        self.checkpointer = Checkpointer(self)
        self.micro_steps = 0
        #: global samples read so far (the data position: a resumed run continues from here)
        self.samples_seen = 0
        self.last_grad_norm: float | None = None
        self.phase_switch_seconds = 0.0
        self.phase_switches = 0
        #: the DataLoader lift_ds.initialize made for ``training_data`` (None otherwise), as DeepSpeed's
        self.training_dataloader: Any = None
        self._tput_timer = ThroughputTimer(config.training.train_batch_size)
        self._in_no_sync = False
        self._closed = False
        _track(self)
        #: stashed optimizer states per unit (``optimizer_state: offload``, LIFT only: a unit is a block)
        self.stash: dict[int, Any] = {}
        self._active: int | None = None
        #: Q-LIFT: the quantized (and / or streamed) frozen layers and their block store
        #: (``lift.frozen_weights``, ``lift.stream_frozen``)
        self.quant = None
        if self.lift.frozen_weights != "full" or self.lift.stream_frozen:
            from .quant import build_quantized_blocks

            self.quant = build_quantized_blocks(
                model,
                plan,
                self.lift.frozen_weights,
                self.lift.block_store,
                self.lift.block_store_dir,
                self.training_config.precision,
                stream=self.lift.stream_frozen,
                cache_mb=self.lift.frozen_cache_mb,
            )
        problem = plan.never_trained_problem()
        if problem:
            logger.warning("%s", problem)
        logger.info(
            "%s: %d candidate blocks (%s .. %s), %d steps, schedule=%s policy=%s, %d phases, backend=%s (%s)",
            self.lift.method.upper(),
            len(self.candidates),
            self.candidates[0].name,
            self.candidates[-1].name,
            plan.total_steps,
            self.lift.schedule,
            self.lift.policy,
            len(plan.phases),
            backend.name,
            config.backend_reason or "lift.backend",
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
        if os.environ.get("LIFT_DS_TRACE"):
            faults.trace(
                {"step": self.global_step, "block": self.plan.unit_name(block), "groups": self._group_settings(params)},
                self.rank,
            )
        ph = self.cursor.phase
        logger.info(
            "phase %d/%d: training %s (%d parameter tensors) for steps %d..%d",
            ph.index + 1,
            len(self.plan.phases),
            self.plan.unit_name(block),
            len(params),
            ph.start + 1,
            ph.stop,
        )

    def _group_settings(self, params: list[nn.Parameter]) -> list[dict[str, Any]]:
        """The phase optimizer's parameter groups: their parameters (by name) and settings (as the optimizer
        holds them)."""
        names = {id(p): n for n, p in self.module.named_parameters()}
        members = self.backend.param_groups(params) if self.backend.param_groups is not None else [{"params": params}]
        return [
            {
                "params": [names.get(id(p), "?") for p in m["params"]],
                "weight_decay": g.get("weight_decay"),
                "lr": g.get("lr"),
            }
            for m, g in zip(members, self.backend.optimizer.param_groups)
        ]

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

    # ----------------------------------------------------------------- progress (checkpoints)

    def progress_state_dict(self) -> dict[str, Any]:
        """The run's progress, as a checkpoint keeps it: the plan cursor, the samples read so far (the
        data position), the step guard's counters, the backend's precision state (the fp16 loss scale),
        and under ``stash`` this rank's share of the stashed optimizer states (the rest is every rank's).

        Raises:
            RuntimeError: in the middle of gradient accumulation (save after an optimizer step).
        """
        if self.micro_steps % self.training_config.gradient_accumulation_steps:
            raise RuntimeError("save_checkpoint() in the middle of gradient accumulation; save after an optimizer step")
        return {
            "cursor": self.cursor.state_dict(),
            "samples_seen": self.samples_seen,
            **self.guard.state_dict(),
            "precision_state": self.backend.precision_state(),
            "stash": self.stash,
        }

    def load_progress_state_dict(self, state: dict[str, Any]) -> None:
        """Take back a :meth:`progress_state_dict` (other keys are ignored) and end the phase running now; the
        weights are loaded next, then :meth:`resume_phase` enters the phase the cursor names.

        Raises:
            ValueError: the state is of another plan (nothing changed).
        """
        self.cursor.load_state_dict(state["cursor"])
        self.samples_seen = int(state["samples_seen"])
        self.micro_steps = self.cursor.step * self.training_config.gradient_accumulation_steps
        self.guard.load_state_dict(state)
        self.end_phase()  # also after the plan finished, when the last engine is kept for evaluation
        # the fp16 loss scale, before the phase is built
        self.backend.load_precision_state(state.get("precision_state") or {})
        self.stash = state["stash"]

    def resume_phase(self, optimizer_state: dict[str, Any] | None) -> None:
        """After :meth:`load_progress_state_dict` and the weights: build the phase the cursor is in (nothing once the
        plan is finished) with ``optimizer_state`` (the checkpoint's, of the block active at its step)."""
        if not self.done:
            self.start_phase(self.cursor.block, restore_stash=False)
            self.backend.load_optimizer(optimizer_state)

    # ----------------------------------------------------------------- training

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model (through the backend's wrapper)."""
        if self.training:
            self._tput_timer.start()
        return self.backend.forward(*args, **kwargs)

    def backward(self, loss: torch.Tensor, retain_graph: bool = False, scale_wrt_gas: bool = True) -> None:
        """Backward of one micro-batch's loss (scaled by 1 / gradient_accumulation_steps, as DeepSpeed's);
        gradients reach the active block only."""
        if self.done:
            raise RuntimeError(
                f"backward() after the plan finished ({self.plan.total_steps} steps); raise lift.total_steps"
            )
        if not scale_wrt_gas:
            raise NotUnderLiftError(
                "backward(scale_wrt_gas=False): every LIFT backend scales the loss by 1 / gradient_accumulation_steps"
            )
        monitor = self.monitor
        if monitor.enabled and self.rank == 0 and self.is_gradient_accumulation_boundary():
            monitor.write_events([("Train/Samples/train_loss", float(loss.detach().mean()), self.samples_seen)])
        self.backend.backward(self.guard.poison(loss), retain_graph=retain_graph)

    def step(self, lr_kwargs: dict[str, Any] | None = None) -> None:
        """End a micro-step. At an accumulation boundary: optimizer step (or a skip, see
        :class:`~lift_ds.guards.StepGuard`), schedule step (``lr_kwargs`` go to the scheduler's
        ``step``, e.g. ``{"metrics": val_loss}`` for ``ReduceLROnPlateau``, which is stepped only
        then), and a phase switch when the plan moves to another block."""
        if self.done:
            raise RuntimeError(
                f"step() after the plan finished ({self.plan.total_steps} steps); raise lift.total_steps"
            )
        if self._in_no_sync:
            raise RuntimeError("step() inside no_sync(): leave the no_sync block first (as in DeepSpeed)")
        boundary = self.is_gradient_accumulation_boundary()
        self._tput_timer.stop(global_step=boundary)
        if not boundary:
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
        self.samples_seen += self.training_config.train_batch_size
        self.last_grad_norm = norm
        self.guard.record(applied, bad_loss, norm, self.global_step + 1, self.active_block)
        if lr_kwargs or not self.lr_scheduler.plateau:
            self.lr_scheduler.step(**(lr_kwargs or {}))
        monitor = self.monitor
        if monitor.enabled and self.rank == 0:
            monitor.write_events([("Train/Samples/lr", self.get_lr()[0], self.samples_seen)])
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
        # LIFT_DS_FAULTS=kill@N: a crash right after step N, in any client loop
        faults.maybe_kill("kill", self.global_step, self.rank)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # nn.Module's: parameters, buffers, submodules (``module``)
        except AttributeError:
            pass
        return self._member(name)

    def close(self) -> None:
        """Release the backend (the last engine, optimizer, gradients); idempotent. Not closed by then, an
        engine is closed at interpreter exit (:func:`_release_at_exit`)."""
        if self.__dict__.get("_closed", True):
            return
        self._closed = True
        _LIVE.discard(self)
        self.backend.close()
        self._active = None
        if self.quant is not None:
            self.quant.close()

    # ----------------------------------------------------------------- checkpoints

    def save_checkpoint(
        self,
        save_dir: str | os.PathLike,
        tag: str | None = None,
        client_state: dict | None = None,
        save_latest: bool = True,
        exclude_frozen_parameters: bool = False,
        extra_files: Callable[[Path], None] | None = None,
    ) -> Path:
        """Save everything a resumed run needs (see :mod:`lift_ds.checkpoint`); collective.

        DeepSpeed's arguments: ``save_latest`` must stay True (``latest`` is what a resume finds);
        blocks the plan has not trained yet are never saved, with or without
        ``exclude_frozen_parameters`` (a resumed run rebuilds them from the model it starts from).
        ``extra_files(dir)`` writes more files into the checkpoint before it is published (collective).

        Returns:
            The checkpoint directory.
        """
        if not save_latest:
            raise NotUnderLiftError(
                "save_checkpoint(save_latest=False): LIFT publishes each "
                "checkpoint as `latest` atomically, the point a resume starts from"
            )
        return self.checkpointer.save(save_dir, tag, client_state, extra_files=extra_files)

    def load_checkpoint(
        self,
        load_dir: str | os.PathLike,
        tag: str | None = None,
        load_module_strict: bool = True,
        load_optimizer_states: bool = True,
        load_lr_scheduler_states: bool = True,
        load_module_only: bool = False,
        allow_batch_change: bool = False,
        **kwargs: Any,
    ) -> tuple[Path | None, dict]:
        """Resume from ``load_dir/<tag>`` (default: the tag in ``load_dir/latest``), on any number
        of ranks and any backend; see :mod:`lift_ds.checkpoint`. DeepSpeed's switches keep their
        defaults: a LIFT resume restores the plan position, weights, optimizer and schedule together.

        Returns:
            ``(path, client_state)`` like DeepSpeed; ``(None, {})`` when there is no checkpoint.

        Raises:
            ResumeError: the checkpoint cannot be resumed by this run as configured.
        """
        partial = {
            k: v
            for k, v in (
                ("load_module_strict", not load_module_strict),
                ("load_optimizer_states", not load_optimizer_states),
                ("load_lr_scheduler_states", not load_lr_scheduler_states),
                ("load_module_only", load_module_only),
            )
            if v
        }
        partial.update({k: v for k, v in kwargs.items() if v not in (None, False)})
        if partial:
            raise NotUnderLiftError(
                f"load_checkpoint({', '.join(partial)}): a LIFT checkpoint resumes exactly (plan position, weights, "
                "optimizer state, schedule, data position) or not at all; to start a new run from its weights, "
                "load weights.safetensors into the model before lift_ds.initialize"
            )
        return self.checkpointer.load(load_dir, tag, allow_batch_change)


#: engines not closed yet; closed, and the process group ended, at interpreter exit
_LIVE: weakref.WeakSet[LiftEngine] = weakref.WeakSet()
#: the models engines were built on (weakly: a model the script dropped is gone already)
_MODELS: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_EXIT_HOOK: list[Callable[..., None]] = []


def _track(engine: LiftEngine) -> None:
    _LIVE.add(engine)
    _MODELS.add(engine.module)
    if not _EXIT_HOOK:
        # the backend's class: nothing of the run is kept alive
        _EXIT_HOOK.append(type(engine.backend).end_process_group)
        atexit.register(_release_at_exit)


def _release_at_exit() -> None:
    """Close every engine still open and end the process group before the interpreter tears down.

    A script that never calls ``destroy()`` / ``trainer.end()`` (DeepSpeed-Chat's ``main.py``,
    ``run_clm.py``) would otherwise leave its DeepSpeed engine and the gloo/NCCL process groups (and
    their worker threads) to the interpreter's teardown, where they are destroyed in no set order; a
    process group destroyed during C++ static destruction can abort the process (``terminate called
    without an active exception``, exit -6) after a run that finished.
    """
    for engine in list(_LIVE):
        try:
            engine.close()
        except Exception as e:  # exiting anyway: say what failed, end the rest
            logger.warning("closing a LIFT engine at exit failed: %s", e)
    if _EXIT_HOOK:
        _EXIT_HOOK[0](list(_MODELS))
