"""Where ``lift_ds.initialize`` finds the ``"lift"`` section and the run's length when a client builds its
DeepSpeed config in code (DeepSpeed-Chat's ``get_train_ds_config``) and passes a built scheduler.

Such a client has no JSON of its own to add a ``"lift"`` section to, but it already takes DeepSpeed's
``--deepspeed_config`` flag (``deepspeed.add_config_arguments``): a file given there that holds only a
``"lift"`` section is merged into the config built in code. And its built schedule already knows how many
optimizer steps the run has (``get_scheduler(..., num_training_steps=N)``): with ``lift.total_steps``
absent or ``"auto"``, LIFT plans over that horizon.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError
from .run_config import read_config_file
from .utils import get_logger

logger = get_logger(__name__)


def merge_args_lift_section(config: Any, args: Any) -> Any:
    """``config`` with the ``"lift"`` section of ``args.deepspeed_config`` merged in, when both are given.

    DeepSpeed refuses a config both in ``config=`` and in ``args.deepspeed_config``; LIFT accepts the
    pair only when the file holds nothing but a ``"lift"`` section and ``config`` has none.

    Raises:
        ConfigError: the file holds other keys (two DeepSpeed configs), or both hold a ``"lift"`` section.
    """
    path = getattr(args, "deepspeed_config", None) if args is not None else None
    if not path or config is None or not isinstance(config, (str, Mapping)) and not hasattr(config, "__fspath__"):
        return config
    file_raw, file_name = read_config_file(path)
    other = sorted(k for k in file_raw if k != "lift")
    if other or "lift" not in file_raw:
        has = f"keys {other}" if other else 'no "lift" section'
        raise ConfigError(
            [
                f"args.deepspeed_config: {file_name!r} given beside config=; DeepSpeed refuses two configs, and LIFT "
                "accepts a --deepspeed_config file beside a config built in code only when it holds nothing but a "
                f'"lift" section (this one has {has}); put every other key in '
                "one of the two"
            ],
            source=file_name,
        )
    raw, name = read_config_file(config)
    if "lift" in raw:
        raise ConfigError(
            [f"lift: given both in config= ({name}) and in args.deepspeed_config ({file_name!r}); keep one"],
            source=name,
        )
    logger.info("lift section taken from %s (args.deepspeed_config), the rest of the config from config=", file_name)
    return {**raw, "lift": file_raw["lift"]}


def scheduler_horizon(scheduler: Any) -> int | None:
    """The number of optimizer steps a built scheduler is laid out for, when it says so unambiguously.

    Hugging Face's ``get_scheduler`` schedules (a ``LambdaLR`` over a ``partial`` with ``num_training_steps``),
    ``OneCycleLR`` (``total_steps``) and DeepSpeed's ``WarmupDecayLR`` / ``WarmupCosineLR``
    (``total_num_steps``); None for anything else (a callable factory, a constant schedule, ...).
    """
    for attr in ("total_steps", "total_num_steps"):  # OneCycleLR; DeepSpeed's decaying WarmupLR family
        value = getattr(scheduler, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0 and hasattr(scheduler, "step"):
            return value
    found = set()
    for fn in getattr(scheduler, "lr_lambdas", None) or ():
        while isinstance(fn, functools.partial):
            if "num_training_steps" in fn.keywords:
                found.add(fn.keywords["num_training_steps"])
                break
            fn = fn.func
    if len(found) == 1:
        (steps,) = found
        if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0:
            return steps
    return None
