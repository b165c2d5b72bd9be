"""The LIFT plan: which candidate block trains at each optimizer step.

Pure Python (no torch import), so it is tested in milliseconds and every rank computes the same
plan from the same arguments without any communication.

Terminology:
    slot: one entry of the schedule's order (``num_blocks`` slots per plan). With the ``random``
        schedule two slots may name the same block.
    unit: the candidate blocks trained together (one block for LIFT and BAdam; the sampled layers
        for LISA); see :func:`method_plan`.
    phase: a maximal run of consecutive steps on the same unit; the distributed engine is rebuilt
        only at phase boundaries.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

SCHEDULES = ("front2end", "end2front", "random")
POLICIES = ("grouped", "cyclic")
#: ``lift.method``: LIFT's plan, or a preset reproducing a peer's layer-wise method on the same engine
METHODS = ("lift", "badam", "lisa")
#: ``lift.switch_every`` when null: BAdam 1.4's ``switch_block_every`` and LMFlow's ``lisa_interval_steps``
DEFAULT_SWITCH_EVERY = {"badam": 50, "lisa": 20}
#: LMFlow's ``lisa_activated_layers``
DEFAULT_LISA_LAYERS = 2


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")


def slot_order(num_blocks: int, schedule: str = "front2end", seed: int = 0) -> list[int]:
    """The order of the ``num_blocks`` slots for a schedule.

    Args:
        num_blocks: number of candidate blocks N (>= 1).
        schedule: ``front2end`` (0..N-1), ``end2front`` (N-1..0) or ``random`` (N independent
            uniform draws with replacement, the paper's "permutation with replacement").
        seed: seed of the ``random.Random`` used by the ``random`` schedule.

    Returns:
        A list of N block indices, 0 being the block nearest the input.
    """
    _check_int("num_blocks", num_blocks, 1)
    _check_choice("schedule", schedule, SCHEDULES)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r} ({type(seed).__name__})")
    if schedule == "front2end":
        return list(range(num_blocks))
    if schedule == "end2front":
        return list(range(num_blocks - 1, -1, -1))
    rng = random.Random(seed)
    return [rng.randrange(num_blocks) for _ in range(num_blocks)]


def plan(
    num_blocks: int,
    total_steps: int,
    schedule: str = "front2end",
    policy: str = "grouped",
    seed: int = 0,
) -> list[int]:
    """One candidate-block index per optimizer step, exactly ``total_steps`` long.

    Every slot gets ``floor(t / N)`` steps and the first ``t mod N`` slots one more, so no step is
    lost. ``grouped`` keeps each slot's steps contiguous ("1 1 2 2 3 3 4 4"); ``cyclic`` goes
    round-robin over the slots ("1 2 3 4 1 2 3 4").

    Args:
        num_blocks: number of candidate blocks N (>= 1).
        total_steps: number of optimizer steps t (>= 1).
        schedule: ``front2end``, ``end2front`` or ``random``.
        policy: ``grouped`` or ``cyclic``.
        seed: seed for the ``random`` schedule (ignored by the others, but still checked).

    Raises:
        ValueError: naming the argument, the value given and what is allowed.
    """
    _check_int("num_blocks", num_blocks, 1)
    _check_int("total_steps", total_steps, 1)
    _check_choice("schedule", schedule, SCHEDULES)
    _check_choice("policy", policy, POLICIES)
    order = slot_order(num_blocks, schedule, seed)
    if policy == "cyclic":
        return [order[k % num_blocks] for k in range(total_steps)]
    base, extra = divmod(total_steps, num_blocks)
    steps: list[int] = []
    for i, block in enumerate(order):
        steps.extend([block] * (base + (1 if i < extra else 0)))
    return steps


def badam_phases(
    num_blocks: int, total_steps: int, switch_every: int, schedule: str = "front2end", seed: int = 0
) -> list[tuple[int, int]]:
    """BAdam 1.4's ``BlockOptimizer`` as ``(block, steps)`` per switch, ``total_steps`` steps in all.

    BAdam switches after its ``g``-th step when ``(g + 1) % K == 0``, so the first block gets
    ``K - 1`` steps (1 when ``K == 1``) and every later block ``K``. Orders: ``front2end`` is BAdam's
    ``ascending`` (0, 1, .., N-1, 0, ..), ``end2front`` its ``descending`` (N-1, .., 0, N-1, ..),
    ``random`` a fresh permutation of the blocks per pass (BAdam draws it with the global torch RNG;
    here with ``random.Random(seed)``, so every rank and a resumed run agree).
    """
    _check_int("num_blocks", num_blocks, 1)
    _check_int("total_steps", total_steps, 1)
    _check_int("switch_every", switch_every, 1)
    _check_choice("schedule", schedule, SCHEDULES)
    rng = random.Random(seed)
    order: list[int] = []
    out: list[tuple[int, int]] = []
    left = total_steps
    while left > 0:
        if not order:
            order = list(range(num_blocks)) if schedule != "end2front" else list(range(num_blocks - 1, -1, -1))
            if schedule == "random":
                rng.shuffle(order)
        length = min(left, max(switch_every - 1, 1) if not out else switch_every)
        out.append((order.pop(0), length))
        left -= length
    return out


def lisa_sets(
    num_layers: int, total_steps: int, switch_every: int, layers: int, seed: int = 0
) -> list[tuple[int, ...]]:
    """LISA (LMFlow): the layers active in each period of ``switch_every`` steps, ``layers`` of the
    ``num_layers`` drawn without replacement at the start of every period (sorted)."""
    _check_int("num_layers", num_layers, 1)
    _check_int("total_steps", total_steps, 1)
    _check_int("switch_every", switch_every, 1)
    _check_int("lisa_layers", layers, 1)
    if layers > num_layers:
        raise ValueError(f"lisa_layers must be at most the {num_layers} candidate layers, got {layers}")
    rng = random.Random(seed)
    periods = -(-total_steps // switch_every)
    return [tuple(sorted(rng.sample(range(num_layers), layers))) for _ in range(periods)]


def method_plan(
    method: str,
    num_blocks: int,
    total_steps: int,
    schedule: str = "front2end",
    policy: str = "grouped",
    seed: int = 0,
    switch_every: int | None = None,
    lisa_layers: int = DEFAULT_LISA_LAYERS,
) -> tuple[list[tuple[int, ...]], list[int]]:
    """The plan of any method as ``(units, steps)``: ``units[u]`` is the tuple of candidate blocks
    trained together, ``steps[k]`` the unit of optimizer step ``k``. A phase is a maximal run of
    one unit.

    LIFT: one unit per block, steps from :func:`plan` (consecutive steps on the same block are one
    phase). BAdam and LISA: one unit per switch, so every switch starts a new phase (a fresh
    optimizer) even when the same block or layers come back at once, as in those methods.
    """
    _check_choice("method", method, METHODS)
    if method == "lift":
        return [(b,) for b in range(num_blocks)], plan(num_blocks, total_steps, schedule, policy, seed)
    every = switch_every if switch_every is not None else DEFAULT_SWITCH_EVERY[method]
    if method == "badam":
        units: list[tuple[int, ...]] = []
        steps: list[int] = []
        for block, length in badam_phases(num_blocks, total_steps, every, schedule, seed):
            units.append((block,))
            steps.extend([len(units) - 1] * length)
        return units, steps
    sets = lisa_sets(num_blocks, total_steps, every, lisa_layers, seed)
    return sets, [k // every for k in range(total_steps)]


@dataclass(frozen=True)
class Phase:
    """A maximal run of consecutive steps on one block: steps ``[start, stop)``."""

    index: int
    block: int
    start: int
    stop: int

    @property
    def num_steps(self) -> int:
        return self.stop - self.start


def phases(steps: list[int]) -> list[Phase]:
    """Split a plan into phases (maximal runs of the same block)."""
    out: list[Phase] = []
    start = 0
    for k in range(1, len(steps) + 1):
        if k == len(steps) or steps[k] != steps[start]:
            out.append(Phase(index=len(out), block=steps[start], start=start, stop=k))
            start = k
    return out


def plan_fingerprint(steps: list[int], units: list[tuple[int, ...]] | None = None) -> str:
    """A short digest of a plan, stored in checkpoints to refuse resuming a different plan.

    ``units`` (see :func:`method_plan`) count only when they are not LIFT's one unit per block, so a
    LIFT plan keeps the digest it had before units existed."""
    text = ",".join(map(str, steps))
    if units is not None and any(u != (i,) for i, u in enumerate(units)):
        text += "|" + ";".join(",".join(map(str, u)) for u in units)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class PhaseCursor:
    """Walks a plan one optimizer step at a time; its state resumes a run at the same step.

    Args:
        steps: the plan, as returned by :func:`plan`.
    """

    def __init__(self, steps: list[int], units: list[tuple[int, ...]] | None = None) -> None:
        if not steps:
            raise ValueError("steps must be a non-empty plan (got an empty list)")
        self.steps = list(steps)
        self.fingerprint = plan_fingerprint(self.steps, units)
        self.phases = phases(self.steps)
        self._phase_of_step: list[int] = []
        for ph in self.phases:
            self._phase_of_step.extend([ph.index] * ph.num_steps)
        self.step = 0

    @property
    def total_steps(self) -> int:
        return len(self.steps)

    @property
    def done(self) -> bool:
        """True once every step of the plan has been taken."""
        return self.step >= len(self.steps)

    @property
    def block(self) -> int:
        """The block trained by the current (next to be taken) step."""
        self._check_not_done()
        return self.steps[self.step]

    @property
    def phase(self) -> Phase:
        """The phase the current step belongs to."""
        self._check_not_done()
        return self.phases[self._phase_of_step[self.step]]

    def visited_blocks(self) -> set[int]:
        """Blocks trained by at least one of the steps already taken, plus the current one."""
        upto = min(self.step + 1, len(self.steps))
        return set(self.steps[:upto])

    def advance(self) -> bool:
        """Count one optimizer step. Returns True when the next step starts a new phase."""
        self._check_not_done()
        self.step += 1
        return not self.done and self._phase_of_step[self.step] != self._phase_of_step[self.step - 1]

    def _check_not_done(self) -> None:
        if self.done:
            raise RuntimeError(
                f"the LIFT plan is finished: all {len(self.steps)} steps were taken "
                "(raise lift.total_steps to train longer)"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "total_steps": len(self.steps), "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position. Refuses a state saved for a different plan."""
        fp = self.fingerprint
        if state.get("fingerprint") != fp or state.get("total_steps") != len(self.steps):
            raise ValueError(
                "checkpointed LIFT plan does not match this run's plan "
                f"(saved total_steps={state.get('total_steps')}, fingerprint={state.get('fingerprint')}; "
                f"this run total_steps={len(self.steps)}, fingerprint={fp}). Resume with the same "
                "lift.method, lift.schedule, lift.policy, lift.seed, lift.total_steps, layer range and model."
            )
        step = state["step"]
        if not isinstance(step, int) or not 0 <= step <= len(self.steps):
            raise ValueError(f"cursor step must be an int in [0, {len(self.steps)}], got {step!r}")
        self.step = step
