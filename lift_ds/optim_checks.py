"""Checks of an optimizer and a schedule before any process group: the config section's values, the
built optimizer's groups (finite, Adam's eps above 0), a schedule stepped over the plan; and the part
of a run's fingerprint they give (:func:`describe_optimizer`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .optim import OptimizerFactory, SchedulerFactory

#: numeric optimizer parameters: (must be >= this, strictly greater)
_NUMERIC = {
    "lr": (0.0, True),
    "eps": (0.0, False),
    "weight_decay": (0.0, False),
    "momentum": (0.0, False),
    "dampening": (0.0, False),
}
#: words in torch's argument errors -> the parameter they are about
_ERROR_KEYS = (
    ("learning rate", "lr"),
    ("epsilon", "eps"),
    ("beta", "betas"),
    ("weight_decay", "weight_decay"),
    ("nesterov", "nesterov"),
    ("momentum", "momentum"),
    ("dampening", "dampening"),
    ("amsgrad", "amsgrad"),
    ("maximize", "maximize"),
)


def section_value_problems(params: Mapping[str, Any]) -> list[str]:
    """Types and ranges torch's constructors leave to fail later (or to train wrong)."""
    problems = []
    for key, (lo, strict) in _NUMERIC.items():
        v = params.get(key)
        if v is None or v == "auto":
            continue
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not (v > lo if strict else v >= lo):
            problems.append(
                f"optimizer.params.{key}: must be a finite number {'>' if strict else '>='} {lo:g}, got {v!r}"
            )
    betas = params.get("betas")
    if betas is not None and betas != "auto":
        ok = (
            isinstance(betas, (list, tuple))
            and len(betas) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)
        )
        if not ok:
            problems.append(
                f"optimizer.params.betas: must be a list of two numbers in [0, 1) (beta1, beta2), got {betas!r}"
            )
    for key in (
        "amsgrad",
        "maximize",
        "nesterov",
        "foreach",
        "capturable",
        "differentiable",
        "fused",
        "adam_w_mode",
        "torch_adam",
    ):
        if key in params and params[key] is not None and not isinstance(params[key], bool):
            problems.append(f"optimizer.params.{key}: must be true or false, got {params[key]!r}")
    if params.get("bias_correction", True) is not True:
        problems.append(
            "optimizer.params.bias_correction: false is DeepSpeed's FusedAdam only; "
            "torch's Adam/AdamW always correct the bias "
            "(remove the key)"
        )
    return problems


#: optimizer-group keys that say how a step is computed, not what it computes (and the rate, which may change)
_IMPLEMENTATION_KEYS = {
    "params",
    "lr",
    "initial_lr",
    "lift_base_lr",
    "foreach",
    "fused",
    "capturable",
    "differentiable",
    "step",
}


def describe_optimizer(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimizer's class and first group's hyperparameters (not its rate): part of a run's fingerprint."""
    group = opt.param_groups[0]
    out: dict[str, Any] = {"type": type(opt).__name__}
    for k, v in sorted(group.items()):
        if k not in _IMPLEMENTATION_KEYS and isinstance(v, (int, float, str, bool, tuple, list, type(None))):
            out[k] = list(v) if isinstance(v, tuple) else v
    return out


def probe_optimizer(
    factory: OptimizerFactory,
    where: str = "optimizer",
    params: Mapping[str, Any] | None = None,
    param: torch.nn.Parameter | None = None,
    keep: bool = False,
) -> Any:
    """Build the optimizer once, so its own argument checks are problems now, named
    ``where.<param>`` for a config section, instead of errors after the process group started; its
    groups' hyperparameters must be finite, and an Adam-style ``eps`` above 0 (with 0, a parameter
    whose gradient is 0, e.g. an unused embedding row, becomes NaN). Nothing is stepped.

    It runs on a dummy parameter, or on ``param`` (a model's parameter, for factories that look
    their parameters up by name). Returns the problems, or with ``keep`` ``(problems, the optimizer
    or None)``. No process group; milliseconds."""
    import math

    p = param if param is not None else torch.nn.Parameter(torch.ones(2))
    try:
        opt = factory([p])
    except Exception as e:  # noqa: BLE001 - any error of the optimizer is a config problem here
        text = str(e).lower()
        key = next((k for word, k in _ERROR_KEYS if word in text), None) if params is not None else None
        path = f"{where}.{key}" if key else where
        got = f" (got {params[key]!r})" if key and params is not None and key in params else ""
        problems = [f"{path}: the optimizer refuses it: {type(e).__name__}: {e}{got}"]
        return (problems, None) if keep else problems
    if not isinstance(opt, torch.optim.Optimizer):
        problems = [f"{where}: the factory returned {type(opt).__name__}, not a torch.optim.Optimizer"]
        return (problems, None) if keep else problems
    problems = []
    for i, group in enumerate(opt.param_groups):
        for k, v in group.items():
            values = v if isinstance(v, (tuple, list)) and k != "params" else [v]
            if k != "params" and any(isinstance(x, float) and not math.isfinite(x) for x in values):
                problems.append(f"{where}: parameter group {i} has {k} = {v!r}; it must be finite")
        if "betas" in group and group.get("eps") == 0:
            problems.append(
                f"{where}{'.eps' if params is not None else ''}: "
                "eps 0 turns a zero gradient (e.g. an embedding row no batch "
                "used) into NaN in Adam's update; use a small positive eps such as 1e-8"
            )
    return (problems, opt) if keep else problems


def probe_scheduler(
    factory: SchedulerFactory, base_lr: float, total_steps: int | None, where: str = "lr_scheduler"
) -> list[str]:
    """Build the schedule on a dummy optimizer and run it over the plan's steps (at most 2,000): an
    error, or a learning rate that is negative or not finite, is a problem now."""
    import math
    import warnings

    proxy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sched = factory(proxy)
            for k in range(min(total_steps or 100, 2000)):
                lr = float(proxy.param_groups[0]["lr"])
                if not math.isfinite(lr) or lr < 0:
                    return [
                        f"{where}: the schedule gives a learning rate of {lr} at step {k}; "
                        "it must be a finite number >= 0"
                    ]
                proxy.step()
                sched.step()
    except Exception as e:  # noqa: BLE001
        return [f"{where}: building or stepping the schedule failed: {type(e).__name__}: {e}"]
    return []
