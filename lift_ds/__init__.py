"""lift_ds: layer-wise fine-tuning (LIFT) of large language models on DeepSpeed ZeRO and FSDP.

``import lift_ds`` is cheap: torch, transformers and DeepSpeed are imported only when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import ConfigError, LiftConfig, TrainingConfig, parse_config
from .schedule import PhaseCursor, phases, plan

if TYPE_CHECKING:  # pragma: no cover
    from .blocks import Block, find_blocks
    from .engine import LiftEngine

__version__ = "0.1.0"

__all__ = [
    "Block",
    "ConfigError",
    "LiftConfig",
    "LiftEngine",
    "PhaseCursor",
    "TrainingConfig",
    "find_blocks",
    "initialize",
    "parse_config",
    "phases",
    "plan",
]


def __getattr__(name: str) -> Any:
    if name in ("find_blocks", "Block"):
        from . import blocks

        return getattr(blocks, name)
    if name == "LiftEngine":
        from .engine import LiftEngine

        return LiftEngine
    raise AttributeError(f"module 'lift_ds' has no attribute {name!r}")


def initialize(*args: Any, **kwargs: Any) -> tuple[Any, Any, Any, Any]:
    """A drop-in for ``deepspeed.initialize`` that trains one block at a time.

    See :func:`lift_ds.api.initialize` for the arguments.
    """
    from .api import initialize as _initialize

    return _initialize(*args, **kwargs)
