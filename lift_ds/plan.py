"""The LIFT plan of a run, resolved once from (model, lift config).

:func:`resolve_plan` finds the model's blocks, selects the candidates (layer range, embedding,
head), matches ``always_trainable`` and lays out the steps (LIFT's schedule x policy, or the
BAdam / LISA presets). The launcher's
model check (on a meta-device model, before any weight is loaded), :func:`lift_ds.initialize`, the
engine and ``lift_ds.memory`` all use it; nothing else interprets ``layer_range``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .blocks import Block, find_blocks, match_modules, select_candidates
from .config import LiftConfig
from .errors import ConfigError
from .schedule import DEFAULT_LISA_LAYERS, Phase, method_plan, phases, plan

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


@dataclass(frozen=True)
class LiftPlan:
    """Which parameters train at each optimizer step.

    Attributes:
        blocks: every block of the model, in order (embedding, layers, head).
        candidates: the blocks the plan iterates over.
        always_trainable: parameter names trained in every phase.
        units: the candidates trained together (:func:`lift_ds.schedule.method_plan`): one block
            each for LIFT and BAdam, the sampled layers of a period for LISA.
        steps: one unit index per optimizer step (``len(steps) == total_steps``).
        phases: maximal runs of consecutive steps on one unit.
    """

    blocks: tuple[Block, ...]
    candidates: tuple[Block, ...]
    always_trainable: tuple[str, ...]
    units: tuple[tuple[int, ...], ...]
    steps: tuple[int, ...]
    phases: tuple[Phase, ...] = field(repr=False, default=())

    @property
    def total_steps(self) -> int:
        return len(self.steps)

    def unit_name(self, unit: int) -> str:
        """``layers.3`` for one block, ``layers.3+layers.7`` for several."""
        return "+".join(self.candidates[c].name for c in self.units[unit])

    def trainable_param_names(self, unit: int) -> list[str]:
        """Parameters trained while ``unit`` is active (its blocks' plus ``always_trainable``)."""
        return self.param_names_of(self.units[unit])

    def never_trained_problem(self, name: str = "lift.total_steps") -> str | None:
        """A message when some candidate blocks get no step (``total_steps`` below their number), else None."""
        n, t = len(self.candidates), self.total_steps
        if t >= n or len(self.units) != n:  # BAdam / LISA: their switch interval decides, as in those methods
            return None
        layers = [b.layer_number for b in self.candidates if b.layer_number is not None]
        last = max(layers) if layers else n
        return (
            f"{name}: {t} is below the {n} candidate blocks, so {n - t} blocks would never train (each block gets "
            f"floor({t}/{n}) = 0 steps, the first {t} one extra). "
            f"Use {name} >= {n}, or fewer blocks (e.g. --layer_range "
            f"{max(1, last - t + 1)},{last})"
        )

    def param_names_of(self, candidates: Iterable[int]) -> list[str]:
        """Parameters of the given candidates plus ``always_trainable``, in model order."""
        names: list[str] = []
        for c in sorted(set(candidates)):
            names.extend(self.candidates[c].param_names)
        return list(dict.fromkeys(names + list(self.always_trainable)))


def resolve_plan(
    model: nn.Module, lift: LiftConfig, fixed_trainable: list[str] | None = None, total_steps: int | None = None
) -> LiftPlan:
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
        raise ConfigError(
            [
                "lift.total_steps: required (an integer >= 1); set it in the config's "
                '"lift" section (a --deepspeed_config file holding only that section '
                "goes beside a config built in code), "
                "pass total_steps= (--max_steps), or pass lift_ds.initialize a built "
                "lr_scheduler laid out for the run (get_scheduler(..., num_training_steps=N), OneCycleLR)"
            ]
        )
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
        if lift.method == "lisa":  # LISA trains the embedding and the head in every period
            always = tuple(
                dict.fromkeys(
                    [n for b in blocks if b.kind in ("embedding", "head") for n in b.param_names] + list(always)
                )
            )
            gamma = lift.lisa_layers or DEFAULT_LISA_LAYERS
            if gamma > len(candidates):
                raise ConfigError(
                    [
                        f"lift.lisa_layers: {gamma} is more than the {len(candidates)} candidate layers "
                        f"(layer_range {list(lift.layer_range) if lift.layer_range else 'all'}); "
                        f"allowed: 1..{len(candidates)}"
                    ]
                )
    if fixed_trainable is not None or lift.method == "lift":
        units, steps = (
            [(c,) for c in range(len(candidates))],
            plan(len(candidates), steps_total, lift.schedule, lift.policy, lift.seed),
        )
    else:
        units, steps = method_plan(
            lift.method,
            len(candidates),
            steps_total,
            lift.schedule,
            lift.policy,
            lift.seed,
            lift.switch_every,
            lift.lisa_layers or DEFAULT_LISA_LAYERS,
        )
    return LiftPlan(blocks, candidates, always, tuple(units), tuple(steps), tuple(phases(list(steps))))
