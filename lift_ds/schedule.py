"""The LIFT plan: which candidate block trains at each optimizer step.

Pure Python (no torch import), so it is tested in milliseconds and every rank computes the same
plan from the same arguments without any communication.

Terminology:
    slot: one entry of the schedule's order (``num_blocks`` slots per plan). With the ``random``
        schedule two slots may name the same block.
    phase: a maximal run of consecutive steps on the same block; the distributed engine is rebuilt
        only at phase boundaries.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

SCHEDULES = ("front2end", "end2front", "random")
POLICIES = ("grouped", "cyclic")


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


def plan_fingerprint(steps: list[int]) -> str:
    """A short digest of a plan, stored in checkpoints to refuse resuming a different plan."""
    return hashlib.sha256(",".join(map(str, steps)).encode()).hexdigest()[:16]


class PhaseCursor:
    """Walks a plan one optimizer step at a time; its state resumes a run at the same step.

    Args:
        steps: the plan, as returned by :func:`plan`.
    """

    def __init__(self, steps: list[int]) -> None:
        if not steps:
            raise ValueError("steps must be a non-empty plan (got an empty list)")
        self.steps = list(steps)
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
        return {"step": self.step, "total_steps": len(self.steps), "fingerprint": plan_fingerprint(self.steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position. Refuses a state saved for a different plan."""
        fp = plan_fingerprint(self.steps)
        if state.get("fingerprint") != fp or state.get("total_steps") != len(self.steps):
            raise ValueError(
                "checkpointed LIFT plan does not match this run's plan "
                f"(saved total_steps={state.get('total_steps')}, fingerprint={state.get('fingerprint')}; "
                f"this run total_steps={len(self.steps)}, fingerprint={fp}). Resume with the same "
                "lift.schedule, lift.policy, lift.seed, lift.total_steps, layer range and model."
            )
        step = state["step"]
        if not isinstance(step, int) or not 0 <= step <= len(self.steps):
            raise ValueError(f"cursor step must be an int in [0, {len(self.steps)}], got {step!r}")
        self.step = step
