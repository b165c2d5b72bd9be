"""Backends: the only modules that touch torch.distributed, DeepSpeed or FSDP.

One registry maps a ``lift.backend`` name to its class (imported lazily: ``import lift_ds`` stays
cheap). Every backend is built from one :class:`~lift_ds.backends.base.BackendContext` and checks
its own configuration keys (:meth:`~lift_ds.backends.base.Backend.check_config`) before any process
group starts. Every workaround of a DeepSpeed private detail lives in :mod:`.compat`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .base import Backend

#: ``lift.backend`` name -> ``module:class`` (the one registry), keyed by :data:`lift_ds.config.BACKEND_NAMES`
#: (config.py declares the names and imports no backend; tests/test_layout.py keeps the two equal)
REGISTRY: dict[str, str] = {
    "torch": "lift_ds.backends.torch:TorchBackend",
    "deepspeed": "lift_ds.backends.deepspeed:DeepSpeedBackend",
    "fsdp": "lift_ds.backends.fsdp:FSDPBackend",
}


def get_backend_class(name: str) -> type[Backend]:
    """The backend class registered under ``name`` (imported on first use)."""
    if name not in REGISTRY:
        from ..errors import ConfigError

        raise ConfigError([f"lift.backend: {name!r} unknown; allowed: {', '.join(REGISTRY)}"])
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def choose_backend(requested: str, raw: Mapping[str, Any], world_size: int) -> tuple[str, str, list[str]]:
    """``(backend, reason, problems)``: the backend a config runs on.

    ``lift.backend`` set explicitly wins. ``"auto"`` (the default) follows the config, so that "any
    DeepSpeed config with a lift section" does what it says: a ``zero_optimization`` section means
    DeepSpeed, an ``fsdp`` section FSDP2 (both at once: choose), neither the single-process torch
    backend on one rank and DeepSpeed (ZeRO-0) on several. A section the chosen backend cannot
    honour is that backend's own config error.
    """
    if requested != "auto":
        return requested, "lift.backend", []
    has_zero, has_fsdp = raw.get("zero_optimization") is not None, raw.get("fsdp") is not None
    if has_zero and has_fsdp:
        return (
            "deepspeed",
            "",
            [
                'lift.backend: "auto" cannot choose: the config has both a zero_optimization section '
                '(DeepSpeed) and an fsdp section (FSDP2); set lift.backend to "deepspeed" or "fsdp" '
                "and remove the other section"
            ],
        )
    if has_zero:
        return "deepspeed", 'the config\'s zero_optimization section (lift.backend "auto")', []
    if has_fsdp:
        return "fsdp", 'the config\'s fsdp section (lift.backend "auto")', []
    if world_size > 1:
        return (
            "deepspeed",
            f'{world_size} ranks and no zero_optimization or fsdp section (lift.backend "auto": DeepSpeed, ZeRO-0)',
            [],
        )
    return "torch", 'one process and no zero_optimization or fsdp section (lift.backend "auto")', []


def shards_parameters(backend: str, raw: Mapping[str, Any]) -> bool:
    """Whether ``backend`` keeps only a shard of each parameter on a rank (ZeRO-3, FSDP2), so that a
    rank's own module does not hold the whole model (a framework that saves rank 0's copy must know)."""
    if backend == "fsdp":
        return True
    if backend == "deepspeed":
        return (raw.get("zero_optimization") or {}).get("stage", 0) == 3
    return False
