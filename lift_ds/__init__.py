"""lift_ds: layer-wise fine-tuning (LIFT) of large language models on DeepSpeed ZeRO and FSDP.

``import lift_ds`` is cheap: torch, transformers and DeepSpeed are imported only when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import LiftConfig, TrainingConfig
from .errors import ConfigError
from .run_config import Override, RunConfig, load_run_config
from .schedule import PhaseCursor, phases, plan

if TYPE_CHECKING:  # pragma: no cover
    from .blocks import Block, find_blocks
    from .engine import LiftEngine
    from .integrations.transformers import LiftSFTTrainer, LiftTrainer
    from .plan import LiftPlan, resolve_plan

__version__ = "0.1.0"

__all__ = [
    "Block",
    "ConfigError",
    "LiftConfig",
    "LiftEngine",
    "LiftPlan",
    "LiftSFTTrainer",
    "LiftTrainer",
    "Override",
    "PhaseCursor",
    "RunConfig",
    "TrainingConfig",
    "find_blocks",
    "initialize",
    "load_run_config",
    "phases",
    "plan",
    "resolve_plan",
]

_LAZY = {
    "find_blocks": "blocks",
    "Block": "blocks",
    "LiftEngine": "engine",
    "LiftPlan": "plan",
    "resolve_plan": "plan",
    # the class swaps for transformers' Trainer and TRL's SFTTrainer,
    # importable as lift_ds.LiftTrainer (transformers loads on first use)
    "LiftTrainer": "integrations.transformers",
    "LiftSFTTrainer": "integrations.transformers",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'lift_ds' has no attribute {name!r}")


def initialize(*args: Any, **kwargs: Any) -> tuple[Any, Any, Any, Any]:
    """A drop-in for ``deepspeed.initialize`` that trains one block at a time.

    See :func:`lift_ds.api.initialize` for the arguments.
    """
    from .api import initialize as _initialize

    return _initialize(*args, **kwargs)
