"""The config's ``"scheduler"`` section: DeepSpeed's learning-rate schedules, for every backend.

``WarmupLR``, ``WarmupDecayLR``, ``WarmupCosineLR``, ``OneCycle`` and ``LRRangeTest`` are
DeepSpeed's classes (public API, ``deepspeed.runtime.lr_schedules``); they drive LIFT's one
run-long schedule (:class:`lift_ds.optim.CrossPhaseLRScheduler`) on every backend, so a config means
the same thing on the torch reference, FSDP2 and DeepSpeed.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

from ..config import ConfigError


def scheduler_problems(section: Mapping[str, Any]) -> list[str]:
    """The scheduler type and parameter names, checked without building anything."""
    from deepspeed.runtime import lr_schedules

    kind = section.get("type")
    if kind not in lr_schedules.VALID_LR_SCHEDULES:
        return [f"scheduler.type: {kind!r} unknown; allowed: {', '.join(lr_schedules.VALID_LR_SCHEDULES)}"]
    allowed = set(inspect.signature(getattr(lr_schedules, kind).__init__).parameters) - {"self", "optimizer"}
    return [f"scheduler.params.{k}: not a parameter of {kind}; allowed: {', '.join(sorted(allowed))}"
            for k in sorted(set(section.get("params", {})) - allowed)]


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
            raise ConfigError([f"scheduler.params.{key}: \"auto\" cannot be derived here; give a number"])
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
