"""Fault injection for the reliability tests (and for rehearsing a recovery on a real cluster).

``LIFT_DS_FAULTS`` holds comma-separated ``point@step`` or ``point@step:rank`` entries:

    kill@7          SIGKILL this process right after optimizer step 7 (before any save at step 7), in
                    LiftEngine.step: any training loop (launch/train.py, LiftTrainer, a client script)
    save_midway@8   SIGKILL during the checkpoint write at step 8 (weights and optimizer written,
                    the checkpoint not yet published)
    nan_loss@5:1    make the loss of step 5 NaN on rank 1 (every micro-batch of that step)

Without ``:rank`` an entry applies to every rank. Faults fire only in the first attempt of a job
(``TORCHELASTIC_RESTART_COUNT`` unset or 0), so torchrun's ``--max-restarts`` can show recovery.
Unset (the normal case), every check is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

POINTS = ("kill", "save_midway", "nan_loss")


def _parse(spec: str) -> set[tuple[str, int, int | None]]:
    out = set()
    for item in filter(None, (x.strip() for x in spec.split(","))):
        try:
            point, rest = item.split("@")
            step, _, rank = rest.partition(":")
            if point not in POINTS:
                raise ValueError
            out.add((point, int(step), int(rank) if rank else None))
        except ValueError:
            raise ValueError(f"LIFT_DS_FAULTS: bad entry {item!r}; expected point@step[:rank] with point one of {', '.join(POINTS)}") from None
    return out


def armed(point: str, step: int, rank: int) -> bool:
    """True when ``point`` is set for ``step`` on ``rank`` in this attempt."""
    spec = os.environ.get("LIFT_DS_FAULTS")
    if not spec or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        return False
    return any(p == point and s == step and (r is None or r == rank) for p, s, r in _parse(spec))


def maybe_kill(point: str, step: int, rank: int) -> None:
    """SIGKILL this process if ``point`` is armed (no cleanup, no flush: like the OOM killer)."""
    if armed(point, step, rank):
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
