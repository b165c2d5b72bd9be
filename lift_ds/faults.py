"""Fault injection for the reliability tests (and for rehearsing a recovery on a real cluster).

``LIFT_DS_FAULTS`` holds comma-separated ``point@step[.n][:rank][#attempt]`` entries:

    kill@7          SIGKILL this process right after optimizer step 7 (before any save at step 7), in
                    LiftEngine.step: any training loop (launch/train.py, LiftTrainer, a client script)
    save_midway@8   SIGKILL during the checkpoint write at step 8 (weights and optimizer written,
                    the checkpoint not yet published)
    save_op@8.5:0   SIGKILL rank 0 right after its 5th file operation of the checkpoint write at
                    step 8 (each file written, renamed or removed counts, the manifest and
                    ``latest`` included; a save is a dozen or so on rank 0, two on the others)
    nan_loss@5:1    make the loss of step 5 NaN on rank 1 (every micro-batch of that step)

Without ``:rank`` an entry applies to every rank. An entry fires only in restart attempt
``#attempt`` of a torchrun job (``TORCHELASTIC_RESTART_COUNT``; default 0, the first attempt), so
torchrun's ``--max-restarts`` can show recovery, and several entries with attempts 0, 1, 2, ...
kill one attempt after the other within one launch. Unset (the normal case), every check is one
dictionary lookup.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable

POINTS = ("kill", "save_midway", "save_op", "nan_loss")
_ENTRY = re.compile(r"^(?P<point>[a-z_]+)@(?P<step>\d+)(?:\.(?P<n>\d+))?(?::(?P<rank>\d+))?(?:#(?P<attempt>\d+))?$")


def _parse(spec: str) -> set[tuple[str, int, int | None, int | None, int]]:
    out = set()
    for item in filter(None, (x.strip() for x in spec.split(","))):
        m = _ENTRY.match(item)
        if not m or m["point"] not in POINTS or (m["point"] == "save_op") != (m["n"] is not None):
            raise ValueError(
                f"LIFT_DS_FAULTS: bad entry {item!r}; expected point@step[:rank][#attempt] with point one of "
                f"{', '.join(POINTS)} (save_op@step.n[:rank][#attempt] for the n-th file operation of a save)"
            )
        out.add(
            (
                m["point"],
                int(m["step"]),
                int(m["n"]) if m["n"] else None,
                int(m["rank"]) if m["rank"] else None,
                int(m["attempt"] or 0),
            )
        )
    return out


def armed(point: str, step: int, rank: int, n: int | None = None) -> bool:
    """True when ``point`` is set for ``step`` (and operation ``n``) on ``rank`` in this attempt."""
    spec = os.environ.get("LIFT_DS_FAULTS")
    if not spec:
        return False
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    return any(
        p == point and s == step and k == n and (r is None or r == rank) and a == attempt
        for p, s, k, r, a in _parse(spec)
    )


def maybe_kill(point: str, step: int, rank: int, n: int | None = None) -> None:
    """SIGKILL this process if ``point`` is armed (no cleanup, no flush: like the OOM killer)."""
    if armed(point, step, rank, n):
        os.kill(os.getpid(), signal.SIGKILL)


def trace(event: dict, rank: int) -> None:
    """Append ``event`` as a JSON line to the file ``LIFT_DS_TRACE`` names (rank 0; nothing when unset).

    The engine writes one line per phase: the step it starts at, the block, and the phase optimizer's
    parameter groups (their parameters' names, weight decay and learning rate): a record of what
    trained with which settings that tests (and a user debugging a recipe) read without touching the
    training script.
    """
    path = os.environ.get("LIFT_DS_TRACE")
    if not path or rank != 0:
        return
    import json

    with open(path, "a") as f:
        f.write(json.dumps(event, default=str) + "\n")


def save_ops(step: int, rank: int) -> Callable[[str], None]:
    """A counter of one save's file operations: call it after each; it kills at an armed ``save_op``."""
    count = 0

    def op(what: str) -> None:
        nonlocal count
        count += 1
        maybe_kill("save_op", step, rank, count)

    return op
