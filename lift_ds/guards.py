"""Guards around the training step: NaN/inf skipping with a divergence stop, and out-of-memory
diagnostics at a phase rebuild."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .errors import DivergenceError
from .utils import get_logger

if TYPE_CHECKING:  # pragma: no cover
    from .backends.base import Backend

logger = get_logger(__name__)


_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_out_of_memory(e: BaseException) -> bool:
    """A CUDA/accelerator OOM, a CPU allocator failure, or a MemoryError."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and any(m in str(e).lower() for m in _OOM_MARKERS)
    )


def oom_message(block: str, params: list[torch.nn.Parameter], backend: Backend, e: BaseException) -> str:
    """What ran out, the ``lift_ds.memory`` estimate for that phase, and what to change."""
    from .memory import GIB, state_bytes

    trained = sum(backend.numel(p) for p in params)
    total = sum(backend.numel(p) for p in backend.model.parameters())
    zero, offload = backend.memory_layout()
    precision = backend.training.precision
    w, g, o = state_bytes(total, trained, backend.world_size, zero, precision)
    on_device = w + g + (0 if offload else o)
    return (
        f"out of memory building the phase for block {block} "
        f"({trained:,} trainable parameters, backend {backend.name}, "
        f"ZeRO stage {zero}, {backend.world_size} ranks, {precision}): "
        f"lift_ds.memory estimates {on_device / GIB:.2f} GiB of model "
        f"states per rank for this phase (parameters {w / GIB:.2f}, gradients {g / GIB:.2f}, optimizer {o / GIB:.2f}"
        f"{' on CPU' if offload else ''}) before activations. Use more ranks, ZeRO-3 or optimizer offload "
        "(ds_configs/zero3_offload.json), a smaller micro batch, "
        "or a layer_range without this block; `python -m lift_ds.memory` "
        f"prints the whole table. (the allocator said: {str(e).splitlines()[0][:300]})"
    )


class StepGuard:
    """Skips optimizer steps with a non-finite loss (on any rank) or gradient norm, and stops a run
    that keeps producing them.

    A skipped step changes no weight and no optimizer state, still takes its place in the plan, and
    is counted (:attr:`skipped_steps`); ``limit`` of them in a row raise :class:`DivergenceError`
    (0: never). fp16 loss-scale overflows, which DeepSpeed's loss scaler handles by itself, are
    counted but do not add to the streak.

    Args:
        limit: ``lift.max_consecutive_skipped_steps``.
        precision: the run's precision (``fp16`` marks a gradient-norm skip as a loss-scale overflow).
    """

    def __init__(self, limit: int, precision: str) -> None:
        self.limit = limit
        self.precision = precision
        self.skipped_steps = 0
        self.consecutive_skipped_steps = 0
        self.last_step_skipped = False
        self._window_finite: list[torch.Tensor] = []

    def poison(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to back-propagate: NaN when it is non-finite, so every rank's reduced gradients
        become NaN for certain (no host sync here), which DeepSpeed's own overflow check also sees."""
        finite = torch.isfinite(loss.detach()).all()
        self._window_finite.append(finite)
        return loss * torch.where(finite, 1.0, float("nan")).to(loss.dtype)

    def window_had_bad_loss(self, backend: Backend) -> bool:
        """Whether any micro-batch of this accumulation window had a non-finite loss on any rank (collective)."""
        finite = bool(torch.stack(self._window_finite).all()) if self._window_finite else True
        self._window_finite = []
        return backend.any_rank(not finite)

    def record(self, applied: bool, bad_loss: bool, norm: float | None, step: int, block: str | None) -> None:
        """Count the outcome of optimizer step ``step`` (1-based); raise DivergenceError past the limit."""
        self.last_step_skipped = not applied
        if applied:
            self.consecutive_skipped_steps = 0
            return
        self.skipped_steps += 1
        why = "a NaN/inf loss" if bad_loss else f"a non-finite gradient norm ({norm})"
        if not (not bad_loss and self.precision == "fp16"):  # DeepSpeed's loss scaler lowers the scale and carries on
            self.consecutive_skipped_steps += 1
        logger.warning(
            "step %d (block %s) skipped: %s; %d skipped so far, %d in a row",
            step,
            block,
            why,
            self.skipped_steps,
            self.consecutive_skipped_steps,
        )
        if self.limit and self.consecutive_skipped_steps >= self.limit:
            first = step - self.consecutive_skipped_steps + 1
            raise DivergenceError(
                f"training diverged: {self.consecutive_skipped_steps} optimizer steps in a row (steps {first}..{step}, "
                f"block {block}) had a NaN/inf loss or gradient norm. They were skipped, so the weights are "
                f"those from before step {first}. Lower the learning rate, set gradient_clipping, or look at the "
                "training data of those steps; lift.max_consecutive_skipped_steps "
                f"(now {self.limit}) sets this limit, 0 never stops."
            )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "consecutive_skipped_steps": self.consecutive_skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_skipped_steps = int(state.get("consecutive_skipped_steps", 0))
