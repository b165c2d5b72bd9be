"""The LIFT plan of a run, resolved once from (model, lift config).

:func:`resolve_plan` finds the model's blocks, selects the candidates (layer range, embedding,
head), matches ``always_trainable`` and lays out the steps (schedule x policy). The launcher's
model check (on a meta-device model, before any weight is loaded), :func:`lift_ds.initialize`, the
engine and ``lift_ds.memory`` all use it; nothing else interprets ``layer_range``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from .blocks import Block, find_blocks, match_modules, select_candidates
from .config import ConfigError, LiftConfig
from .schedule import Phase, phases, plan

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


@dataclass(frozen=True)
class LiftPlan:
    """Which parameters train at each optimizer step.

    Attributes:
        blocks: every block of the model, in order (embedding, layers, head).
        candidates: the blocks the plan iterates over.
        always_trainable: parameter names trained in every phase.
        steps: one candidate index per optimizer step (``len(steps) == total_steps``).
        phases: maximal runs of consecutive steps on one block.
    """

    blocks: tuple[Block, ...]
    candidates: tuple[Block, ...]
    always_trainable: tuple[str, ...]
    steps: tuple[int, ...]
    phases: tuple[Phase, ...] = field(repr=False, default=())

    @property
    def total_steps(self) -> int:
        return len(self.steps)

    def trainable_param_names(self, candidate: int) -> list[str]:
        """Parameters trained while ``candidate`` is active (its own plus ``always_trainable``)."""
        return list(dict.fromkeys(list(self.candidates[candidate].param_names) + list(self.always_trainable)))

    def never_trained_problem(self, name: str = "lift.total_steps") -> str | None:
        """A message when some candidate blocks get no step (``total_steps`` below their number), else None."""
        n, t = len(self.candidates), self.total_steps
        if t >= n:
            return None
        layers = [b.layer_number for b in self.candidates if b.layer_number is not None]
        last = max(layers) if layers else n
        return (f"{name}: {t} is below the {n} candidate blocks, so {n - t} blocks would never train (each block gets "
                f"floor({t}/{n}) = 0 steps, the first {t} one extra). Use {name} >= {n}, or fewer blocks (e.g. --layer_range "
                f"{max(1, last - t + 1)},{last})")

    def param_names_of(self, candidates: Iterable[int]) -> list[str]:
        """Parameters of the given candidates plus ``always_trainable`` (what a checkpoint saves)."""
        names: list[str] = []
        for c in sorted(set(candidates)):
            names.extend(self.candidates[c].param_names)
        return list(dict.fromkeys(names + list(self.always_trainable)))


def resolve_plan(model: "nn.Module", lift: LiftConfig, fixed_trainable: list[str] | None = None, total_steps: int | None = None) -> LiftPlan:
    """The plan of a run: candidate blocks and the block of every step.

    Args:
        model: the model (a meta-device model works: only names and structure are read).
        lift: the ``"lift"`` section.
        fixed_trainable: train exactly these parameter names for the whole run, as one block (the
            full fine-tuning and LoRA baselines share the loop, backends and checkpoints this way).
        total_steps: overrides ``lift.total_steps``.

    Raises:
        ConfigError: no layer stack, a layer range past the model, a pattern that matches nothing,
            or ``total_steps`` missing. Fewer steps than candidate blocks is allowed here (see
            :meth:`LiftPlan.never_trained_problem`).
    """
    steps_total = total_steps if total_steps is not None else lift.total_steps
    if steps_total is None:
        raise ConfigError(["lift.total_steps: required (an integer >= 1); set it in the config or pass total_steps= (--max_steps)"])
    if fixed_trainable is not None:
        names = {n for n, _ in model.named_parameters()}
        unknown = [n for n in fixed_trainable if n not in names]
        if unknown:
            raise ConfigError([f"trainable: {unknown[:3]} are not parameters of the model"])
        blocks: tuple[Block, ...] = (Block("all", "fixed", None, tuple(fixed_trainable)),)
        candidates, always = blocks, ()
    else:
        blocks = tuple(find_blocks(model))
        candidates = tuple(select_candidates(list(blocks), lift))
        always = tuple(match_modules(model, lift.always_trainable))
    step_blocks = tuple(plan(len(candidates), steps_total, lift.schedule, lift.policy, lift.seed))
    return LiftPlan(blocks, candidates, always, step_blocks, tuple(phases(list(step_blocks))))
