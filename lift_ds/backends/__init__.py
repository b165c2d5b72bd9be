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
        from .fsdp import FSDPBackend

        return FSDPBackend
    from ..config import BACKENDS, ConfigError

    raise ConfigError([f"lift.backend: {name!r} unknown; allowed: {', '.join(BACKENDS)}"])
