"""LiftEngine: the phase loop, the one place where the plan and a backend meet."""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .backends.base import Backend
from .blocks import Block, find_blocks, match_modules, select_candidates, set_trainable
from .config import ConfigError, LiftConfig, TrainingConfig
from .faults import maybe_kill
from .optim import LRController
from .schedule import PhaseCursor, plan
from .utils import get_logger, rng_state, set_rng_state

logger = get_logger(__name__)

LATEST = "latest"
STATE_FILE = "lift_state.json"


class DivergenceError(RuntimeError):
    """``lift.max_consecutive_skipped_steps`` optimizer steps in a row had a non-finite loss or
    gradient norm. They were skipped: the weights are those from before the first of them."""


class PhaseOutOfMemoryError(RuntimeError):
    """Building a phase (engine, optimizer) for a block ran out of memory."""


_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_out_of_memory(e: BaseException) -> bool:
    """A CUDA/accelerator OOM, a CPU allocator failure, or a MemoryError."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and any(m in str(e).lower() for m in _OOM_MARKERS)
    )


class CheckpointError(OSError):
    """A checkpoint could not be written (disk full, read-only or missing directory, ...); the
    previous checkpoint is untouched and still the newest."""


class LiftEngine:
    """Trains one block at a time, following the plan, through a backend.

    Use it like a DeepSpeed engine: ``loss = engine(**batch).loss``, ``engine.backward(loss)``,
    ``engine.step()``. At each phase boundary exactly the new block (plus ``always_trainable``)
    has ``requires_grad=True`` and the backend is rebuilt for it.

    Args:
        model: the model to fine-tune.
        lift: the ``"lift"`` section; ``total_steps`` must be set.
        training: the top-level keys LIFT reads.
        backend: a backend constructed for this model.
        lr_controller: the run-long learning-rate schedule.
        fixed_trainable: train exactly these parameters for the whole run, as one block (the full
            fine-tuning and LoRA baselines share the loop, backends and checkpoints this way).
    """

    def __init__(
        self,
        model: nn.Module,
        lift: LiftConfig,
        training: TrainingConfig,
        backend: Backend,
        lr_controller: LRController,
        fixed_trainable: list[str] | None = None,
    ) -> None:
        if lift.total_steps is None:
            raise ConfigError(["lift.total_steps: required (an integer >= 1); set it in the config or pass total_steps="])
        self.module = model
        self.lift = lift
        self.training = training
        self.backend = backend
        self.lr_scheduler = lr_controller
        if fixed_trainable is not None:
            self.blocks = [Block("all", "fixed", None, tuple(fixed_trainable))]
            self.candidates = list(self.blocks)
            self.always_trainable: list[str] = []
        else:
            self.blocks = find_blocks(model)
            self.candidates = select_candidates(self.blocks, lift)
            self.always_trainable = match_modules(model, lift.always_trainable)
        self.plan: list[int] = plan(len(self.candidates), lift.total_steps, lift.schedule, lift.policy, lift.seed)
        self.cursor = PhaseCursor(self.plan)
        self.micro_steps = 0
        self.last_grad_norm: float | None = None
        self.phase_switch_seconds = 0.0
        self.phase_switches = 0
        #: optimizer steps skipped for a non-finite loss or gradient norm (and fp16 overflows)
        self.skipped_steps = 0
        self.consecutive_skipped_steps = 0
        self.last_step_skipped = False
        self._window_finite: list[torch.Tensor] = []
        self._stash: dict[int, Any] = {}
        self._active: int | None = None
        if lift.total_steps < len(self.candidates):
            logger.warning(
                "lift.total_steps=%d is below the %d candidate blocks: only the first %d slots of the plan get a step",
                lift.total_steps, len(self.candidates), lift.total_steps,
            )
        logger.info(
            "LIFT: %d candidate blocks (%s .. %s), %d steps, schedule=%s policy=%s, %d phases, backend=%s",
            len(self.candidates), self.candidates[0].name, self.candidates[-1].name, lift.total_steps,
            lift.schedule, lift.policy, len(self.cursor.phases), backend.name,
        )
        self._enter(self.cursor.block)

    # ----------------------------------------------------------------- properties

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
        """Name of the block training now (None once the plan is finished)."""
        return None if self._active is None else self.candidates[self._active].name

    @property
    def active_block_index(self) -> int | None:
        """Index (into :attr:`candidates`) of the block training now."""
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

    def trainable_param_names(self, block: int | None = None) -> list[str]:
        """Parameters trained while ``block`` (default: the active one) is active."""
        b = self.candidates[self._active if block is None else block]
        return list(dict.fromkeys(list(b.param_names) + self.always_trainable))

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

    def _enter(self, block: int, restore_stash: bool = True) -> None:
        t0 = time.perf_counter()
        if self._active is not None:
            if self.lift.optimizer_state == "offload":
                self._stash[self._active] = self.backend.stash_optimizer_state()
            self.backend.teardown()
        params = set_trainable(self.module, self.trainable_param_names(block))
        try:
            self.backend.build(params)
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            raise PhaseOutOfMemoryError(self._oom_message(block, params, e)) from e
        self._active = block
        assert self.backend.optimizer is not None
        self.lr_scheduler.attach(self.backend.optimizer)
        if restore_stash and block in self._stash:
            self.backend.restore_optimizer_state(self._stash.pop(block))
        self.phase_switch_seconds += time.perf_counter() - t0
        self.phase_switches += 1
        ph = self.cursor.phase
        logger.info(
            "phase %d/%d: training %s (%d parameter tensors) for steps %d..%d",
            ph.index + 1, len(self.cursor.phases), self.candidates[block].name, len(params), ph.start + 1, ph.stop,
        )

    def _oom_message(self, block: int, params: list[nn.Parameter], e: BaseException) -> str:
        from .memory import GIB, state_bytes

        trained = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)
        total = sum(int(getattr(p, "ds_numel", p.numel())) for p in self.module.parameters())
        zero, offload = self.backend.memory_layout()
        w, g, o = state_bytes(total, trained, self.world_size, zero, self.training.precision)
        on_device = w + g + (0 if offload else o)
        return (
            f"out of memory building the phase for block {self.candidates[block].name} ({trained:,} trainable parameters, "
            f"backend {self.backend.name}, ZeRO stage {zero}, {self.world_size} ranks, {self.training.precision}): "
            f"lift_ds.memory estimates {on_device / GIB:.2f} GiB of model states per rank for this phase "
            f"(parameters {w / GIB:.2f}, gradients {g / GIB:.2f}, optimizer {o / GIB:.2f}{' on CPU' if offload else ''}) "
            f"before activations. Use more ranks, ZeRO-3 or optimizer offload (ds_configs/zero3_offload.json), a smaller "
            f"micro batch, or a layer_range without this block; `python -m lift_ds.memory` prints the whole table. "
            f"(the allocator said: {str(e).splitlines()[0][:300]})"
        )

    # ----------------------------------------------------------------- training

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model (through the backend's wrapper)."""
        return self.backend.forward(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss; gradients reach the active block only."""
        if self.done:
            raise RuntimeError(f"backward() after the plan finished ({self.lift.total_steps} steps); raise lift.total_steps")
        finite = torch.isfinite(loss.detach()).all()
        self._window_finite.append(finite)
        # a non-finite loss gives NaN gradients for certain (no host sync): every rank's reduced
        # gradients become NaN, which DeepSpeed's own overflow check also sees
        self.backend.backward(loss * torch.where(finite, 1.0, float("nan")).to(loss.dtype))

    def step(self) -> None:
        """End a micro-step. At an accumulation boundary: optimizer step, schedule step, and a
        phase switch when the plan moves to another block.

        A step whose loss was NaN/inf on any rank (in any micro-batch of the window), or whose
        global gradient norm is, changes no weight: it is skipped and counted
        (:attr:`skipped_steps`), still consumes its place in the plan, and
        ``lift.max_consecutive_skipped_steps`` of them in a row raise :class:`DivergenceError`.
        """
        if self.done:
            raise RuntimeError(f"step() after the plan finished ({self.lift.total_steps} steps); raise lift.total_steps")
        boundary = self.is_gradient_accumulation_boundary()
        if not boundary:
            self.backend.step(False)
            self.micro_steps += 1
            return
        finite = bool(torch.stack(self._window_finite).all()) if self._window_finite else True
        self._window_finite = []
        bad_loss = self.backend.any_rank(not finite)
        if bad_loss:
            self.backend.discard_gradients()
            norm, applied = None, False
        else:
            self.lr_scheduler.apply(self.backend.optimizer)
            norm = self.backend.step(True)
            applied = self.backend.step_applied
        self.micro_steps += 1
        self.last_grad_norm = norm
        self.last_step_skipped = not applied
        if applied:
            self.consecutive_skipped_steps = 0
        else:
            self._count_skip("a NaN/inf loss" if bad_loss else f"a non-finite gradient norm ({norm})", loss_scale=not bad_loss)
        self.lr_scheduler.step()
        if self.cursor.advance():
            self._enter(self.cursor.block)
        elif not self.cursor.done:
            self.lr_scheduler.apply(self.backend.optimizer)
        else:
            # the last engine stays (ZeRO-3 forward needs its hooks for evaluation and export) until close()
            self._active = None
            set_trainable(self.module, [])

    def _count_skip(self, why: str, loss_scale: bool) -> None:
        self.skipped_steps += 1
        fp16_overflow = loss_scale and self.training.precision == "fp16"
        if not fp16_overflow:  # DeepSpeed's loss scaler lowers the scale and carries on by itself
            self.consecutive_skipped_steps += 1
        step = self.global_step + 1
        logger.warning(
            "step %d (block %s) skipped: %s; %d skipped so far, %d in a row",
            step, self.active_block, why, self.skipped_steps, self.consecutive_skipped_steps,
        )
        limit = self.lift.max_consecutive_skipped_steps
        if limit and self.consecutive_skipped_steps >= limit:
            first = step - self.consecutive_skipped_steps + 1
            raise DivergenceError(
                f"training diverged: {self.consecutive_skipped_steps} optimizer steps in a row (steps {first}..{step}, "
                f"block {self.active_block}) had a NaN/inf loss or gradient norm. They were skipped, so the weights are "
                f"those from before step {first}. Lower the learning rate, set gradient_clipping, or look at the "
                f"training data of those steps; lift.max_consecutive_skipped_steps (now {limit}) sets this limit, 0 never stops."
            )

    def close(self) -> None:
        """Release the backend (the last engine, optimizer, gradients)."""
        self.backend.close()
        self._active = None

    # ----------------------------------------------------------------- checkpoints

    def _saved_param_names(self) -> list[str]:
        visited = sorted(self.cursor.visited_blocks()) if not self.done else sorted(set(self.plan))
        names: list[str] = []
        for b in visited:
            names.extend(self.candidates[b].param_names)
        return list(dict.fromkeys(names + self.always_trainable))

    def save_checkpoint(self, save_dir: str | os.PathLike, tag: str | None = None, client_state: dict | None = None) -> Path:
        """Save everything a resumed run needs; collective: every rank must call it.

        Written to ``save_dir/<tag>`` through a temporary directory renamed at the end, then
        ``save_dir/latest`` is replaced atomically: a crash mid-save leaves the previous checkpoint
        the newest. Saved: the weights of every block trained so far (untouched blocks equal the
        model the run was built from, which a resumed run must build again), the active block's
        optimizer state, stashed optimizer states (``optimizer_state: offload``), the plan
        cursor, the learning-rate schedule and every rank's RNG state.

        Returns:
            The checkpoint directory.
        """
        if self.micro_steps % self.training.gradient_accumulation_steps:
            raise RuntimeError("save_checkpoint() in the middle of gradient accumulation; save after an optimizer step")
        save_dir = Path(save_dir)
        tag = tag or f"global_step{self.global_step}"
        final = save_dir / tag
        tmp = save_dir / f".{tag}.partial"
        names = self._saved_param_names()

        def prepare() -> None:
            if self.rank == 0:
                save_dir.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
                need = self._checkpoint_bytes(names)
                free = shutil.disk_usage(save_dir).free
                if free < need:
                    raise OSError(errno.ENOSPC, f"{free / 2**20:.0f} MiB free, the checkpoint needs about {need / 2**20:.0f} MiB", str(save_dir))

        def write_state() -> None:
            torch.save(
                {"rng": rng_state(), "stash": self._stash, "lr_scheduler": self.lr_scheduler.state_dict()},
                tmp / f"rank{self.rank}_state.pt",
            )
            if self.rank == 0:
                meta = {
                    "format": 1,
                    "cursor": self.cursor.state_dict(),
                    "micro_steps": self.micro_steps,
                    "lr": self.lr_scheduler.lr,
                    "world_size": self.world_size,
                    "backend": self.backend.name,
                    "lift": self.lift.to_dict(),
                    "saved_params": names,
                    "skipped_steps": self.skipped_steps,
                    "consecutive_skipped_steps": self.consecutive_skipped_steps,
                    "client_state": client_state or {},
                }
                (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1, default=_json_default))

        def publish() -> None:
            if self.rank == 0:
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                latest_tmp = save_dir / f".{LATEST}.partial"
                latest_tmp.write_text(tag)
                os.replace(latest_tmp, save_dir / LATEST)

        self._agreed(prepare, save_dir, tmp, final)
        self._agreed(lambda: self.backend.save_weights(tmp, names), save_dir, tmp, final)
        if self._active is not None:
            self._agreed(lambda: self.backend.save_optimizer(tmp), save_dir, tmp, final)
        maybe_kill("save_midway", self.global_step, self.rank)
        self._agreed(write_state, save_dir, tmp, final)
        self._agreed(publish, save_dir, tmp, final)
        logger.info("saved checkpoint %s (step %d, %d parameter tensors)", final, self.global_step, len(names))
        return final

    def _checkpoint_bytes(self, names: list[str]) -> int:
        """Rough size of a checkpoint: saved weights plus the active block's optimizer state (all ranks)."""
        named = dict(self.module.named_parameters())
        weights = sum(int(getattr(named[n], "ds_numel", named[n].numel())) * named[n].element_size() for n in names if n in named)
        active = sum(int(getattr(named[n], "ds_numel", named[n].numel())) for n in (self.trainable_param_names() if self._active is not None else []) if n in named)
        return weights + 12 * active

    def _agreed(self, fn: Any, save_dir: Path, tmp: Path, final: Path) -> None:
        """Run one stage of a save on every rank; if it failed on any rank, remove the partial
        checkpoint and raise :class:`CheckpointError` on every rank (no rank is left waiting)."""
        err: OSError | None = None
        try:
            fn()
        except OSError as e:
            err = e
        if not self.backend.any_rank(err is not None):
            return
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        latest = save_dir / LATEST
        prev = latest.read_text().strip() if latest.is_file() else None
        if err is None:
            cause = "another rank could not write its part (see its message)"
        else:
            what = err.strerror or str(err)
            cause = f"{what} ({err.filename})" if err.filename else what
        raise CheckpointError(
            errno.EIO if err is None else (err.errno or errno.EIO),
            f"could not write checkpoint {final}: {cause}. "
            + (f"The previous checkpoint {save_dir / prev} is untouched and still the newest ({latest}). " if prev else "No earlier checkpoint exists. ")
            + f"Free disk space or make {save_dir} writable (or choose another --output_dir and copy the checkpoints there), then resume with --resume.",
        )

    def load_checkpoint(self, load_dir: str | os.PathLike, tag: str | None = None) -> tuple[Path | None, dict]:
        """Resume from ``load_dir/<tag>`` (default: the tag in ``load_dir/latest``).

        Returns:
            ``(path, client_state)`` like DeepSpeed; ``(None, {})`` when there is no checkpoint.
        """
        load_dir = Path(load_dir)
        if self.rank == 0 and load_dir.is_dir():
            for stale in load_dir.glob(".*.partial"):  # a save that was killed mid-write; never published
                logger.warning("removing %s, an unfinished checkpoint write", stale)
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        self.backend.barrier()
        if tag is None:
            latest = load_dir / LATEST
            if not latest.is_file():
                logger.warning("no checkpoint in %s (no %s file)", load_dir, LATEST)
                return None, {}
            tag = latest.read_text().strip()
        path = load_dir / tag
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"checkpoint {path} is incomplete or missing ({STATE_FILE} not found)")
        meta = json.loads((path / STATE_FILE).read_text())
        if meta["world_size"] != self.world_size:
            raise ValueError(
                f"checkpoint {path} was written by {meta['world_size']} ranks, this run has {self.world_size}; "
                "resume with the same number of ranks"
            )
        self.cursor.load_state_dict(meta["cursor"])
        self.micro_steps = meta["micro_steps"]
        self.skipped_steps = meta.get("skipped_steps", 0)
        self.consecutive_skipped_steps = meta.get("consecutive_skipped_steps", 0)
        self.backend.teardown()  # also after the plan finished, when the last engine is kept for evaluation
        self._active = None
        set_trainable(self.module, [])
        self.backend.load_weights(path)
        own = torch.load(path / f"rank{self.rank}_state.pt", map_location="cpu", weights_only=False)
        self._stash = own["stash"]
        if not self.done:
            block = self.cursor.block
            self._enter(block, restore_stash=False)
            self.backend.load_optimizer(path)
        self.lr_scheduler.load_state_dict(own["lr_scheduler"])
        if self.optimizer is not None:
            self.lr_scheduler.apply(self.optimizer)
        set_rng_state(own["rng"])
        logger.info("resumed from %s at step %d", path, self.global_step)
        return path, meta.get("client_state", {})


def _json_default(o: Any) -> Any:
    if torch.is_tensor(o):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
