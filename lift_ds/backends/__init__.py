"""Backends: the only modules that touch torch.distributed, DeepSpeed or FSDP."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .base import Backend


def get_backend_class(name: str) -> "type[Backend]":
    """The backend class for a ``lift.backend`` name (imported lazily)."""
    if name == "torch":
        from .torch import TorchBackend

        return TorchBackend
    if name == "deepspeed":
        from .deepspeed import DeepSpeedBackend

        return DeepSpeedBackend
    if name == "fsdp":
        try:
            from .fsdp import FSDPBackend  # type: ignore[import-not-found]
        except ImportError:
            from ..config import ConfigError

            raise ConfigError(["lift.backend: \"fsdp\" is not available in this version yet; use \"torch\" or \"deepspeed\""]) from None
        return FSDPBackend
    from ..config import BACKENDS, ConfigError

    raise ConfigError([f"lift.backend: {name!r} unknown; allowed: {', '.join(BACKENDS)}"])
