"""The config's ``"scheduler"`` section: DeepSpeed's learning-rate schedules, for every backend.

``WarmupLR``, ``WarmupDecayLR``, ``WarmupCosineLR``, ``OneCycle`` and ``LRRangeTest`` are
DeepSpeed's classes (public API, ``deepspeed.runtime.lr_schedules``); they drive LIFT's one
run-long schedule (:class:`lift_ds.optim.CrossPhaseLRScheduler`) on every backend, so a config means
the same thing on the torch reference, FSDP2 and DeepSpeed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import ConfigError


def scheduler_problems(
    section: Mapping[str, Any], total_steps: int | None = None, base_lr: float | None = None
) -> list[str]:
    """The scheduler type and parameter names, then the schedule itself: built once on a dummy
    optimizer (DeepSpeed's own argument checks) and evaluated over the run's ``total_steps`` when
    known, so a schedule that errors, gives a negative or non-finite rate, or ends before the run
    (``total_num_steps`` below the plan's steps: a rate of 0 or its minimum for the rest) is a
    problem now, named by its JSON path."""
    from deepspeed.runtime import lr_schedules

    kind = section.get("type")
    if kind not in lr_schedules.VALID_LR_SCHEDULES:
        return [f"scheduler.type: {kind!r} unknown; allowed: {', '.join(lr_schedules.VALID_LR_SCHEDULES)}"]
    allowed = set(inspect.signature(getattr(lr_schedules, kind).__init__).parameters) - {"self", "optimizer"}
    params = dict(section.get("params", {}))
    problems = [
        f"scheduler.params.{k}: not a parameter of {kind}; allowed: {', '.join(sorted(allowed))}"
        for k in sorted(set(params) - allowed)
    ]
    for k, v in params.items():
        if (
            k.endswith(("_steps", "_size", "_iteration"))
            and v != "auto"
            and (not isinstance(v, int) or isinstance(v, bool) or v < 0)
        ):
            problems.append(f"scheduler.params.{k}: must be an integer >= 0, got {v!r}")
        elif (
            k.endswith("_lr")
            and v != "auto"
            and not isinstance(v, list)
            and (not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0)
        ):
            problems.append(f"scheduler.params.{k}: must be a number >= 0, got {v!r}")
    if "warmup_type" in params and params["warmup_type"] not in ("log", "linear"):
        problems.append(
            f"scheduler.params.warmup_type: got {params['warmup_type']!r}; "
            "allowed: log, linear (DeepSpeed would use log silently)"
        )
    total = params.get("total_num_steps")
    if isinstance(total, int) and not isinstance(total, bool):
        warm = params.get("warmup_num_steps")
        if total < 1:
            problems.append(
                f'scheduler.params.total_num_steps: must be >= 1, got {total} ("auto": the run\'s total steps)'
            )
        elif total_steps is not None and total < total_steps:
            problems.append(
                f"scheduler.params.total_num_steps: {total} is below the "
                f"run's {total_steps} optimizer steps (lift.total_steps): "
                "the learning rate would sit at its end value for steps "
                f'{total + 1}..{total_steps}; set it to {total_steps} or "auto"'
            )
        elif isinstance(warm, int) and not isinstance(warm, bool) and warm > total:
            problems.append(f"scheduler.params.warmup_num_steps: {warm} is more than total_num_steps {total}")
    if problems:
        return problems
    return _probe(kind, params, total_steps, base_lr or 1e-3)


def _probe(kind: str, params: dict[str, Any], total_steps: int | None, base_lr: float) -> list[str]:
    """Build the schedule on a dummy optimizer and read its rate at the run's steps (sampled when long)."""
    import math

    import torch
    from deepspeed.runtime import lr_schedules

    if total_steps is None and any(v == "auto" for v in params.values()):
        return []  # the run's length fills "auto"; checked again when it is known (lift_ds.initialize)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    try:
        sched = getattr(lr_schedules, kind)(opt, **_fill_auto(params, base_lr, total_steps))
        n = total_steps or 100
        steps = range(n) if n <= 2000 else sorted({*range(0, n, max(1, n // 2000)), n - 1})
        for k in steps:
            sched.step(k)
            lr = float(opt.param_groups[0]["lr"])
            if not math.isfinite(lr) or lr < 0:
                return [
                    f"scheduler.params: {kind} gives a learning rate of "
                    f"{lr} at step {k + 1}; it must be a finite number >= 0"
                ]
    except (TypeError, ValueError, ZeroDivisionError, AssertionError, KeyError, IndexError, ConfigError) as e:
        key = next((k for k in sorted(params, key=len, reverse=True) if k in str(e)), None)
        return [f"scheduler.params{'.' + key if key else ''}: {kind} refuses it: {e}"]
    return []


def config_lr(section: Mapping[str, Any] | None) -> float | None:
    """The ``optimizer`` section's lr when it is a number."""
    lr = (section or {}).get("params", {}).get("lr") if isinstance((section or {}).get("params", {}), Mapping) else None
    return float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0 else None


def _fill_auto(params: dict[str, Any], base_lr: float, total_steps: int | None) -> dict[str, Any]:
    """``"auto"`` parameters LIFT fills in: the optimizer's lr, the run's total steps, and a warm-up
    of 3% of them (at least one step)."""
    filled = dict(params)
    for key, value in params.items():
        if value != "auto":
            continue
        if key in ("warmup_max_lr", "cycle_max_lr", "lr_range_test_min_lr"):
            filled[key] = base_lr
        elif key in ("warmup_min_lr", "cycle_min_lr"):
            filled[key] = 0.0
        elif key == "total_num_steps" and total_steps is not None:
            filled[key] = total_steps
        elif key == "warmup_num_steps" and total_steps is not None:
            filled[key] = max(1, round(0.03 * total_steps))
        else:
            raise ConfigError([f'scheduler.params.{key}: "auto" cannot be derived here; give a number'])
    return filled


def scheduler_factory(section: Mapping[str, Any], total_steps: int | None = None) -> Callable[[Any], Any]:
    """A factory ``optimizer -> scheduler`` for a DeepSpeed ``"scheduler"`` section."""
    problems = scheduler_problems(section)
    if problems:
        raise ConfigError(problems)
    kind = section["type"]

    def factory(opt: Any) -> Any:
        from deepspeed.runtime import lr_schedules

        params = _fill_auto(dict(section.get("params", {})), float(opt.param_groups[0]["lr"]), total_steps)
        try:
            return getattr(lr_schedules, kind)(opt, **params)
        except TypeError as e:
            raise ConfigError([f"scheduler.params: {e}"]) from None

    return factory
