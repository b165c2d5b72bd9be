"""What a backend tells :class:`~lift_ds.engine.LiftEngine`'s DeepSpeed-compatible surface
(:mod:`lift_ds.facade`): members of its library's engine, ``no_sync``, the run-long monitor, and
whether a consolidated 16-bit save happens. Defaults for every backend; ``deepspeed`` overrides them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any

from ..errors import NotUnderLiftError
from . import compat

#: ``Backend.library_member``'s answer for a name its library's engine does not have
MISSING = object()


def phase_engine_member(current: Any, name: str) -> Any:
    """``name`` of whichever DeepSpeed engine ``current()`` returns when it is used: a method is bound at each
    call (a phase switch replaces the engine), any other member is read now. ``MISSING`` for other names."""
    if not compat.is_deepspeed_engine_member(name):
        return MISSING
    engine = current()
    if engine is None:
        return MISSING
    if callable(getattr(type(engine), name, None)):

        def member(*args: Any, **kwargs: Any) -> Any:
            return getattr(current(), name)(*args, **kwargs)

        member.__name__ = name
        member.__doc__ = f"DeepSpeedEngine.{name} of the current LIFT phase's engine (the active block).\n\n" + (
            getattr(type(engine), name).__doc__ or ""
        )
        return member
    return getattr(engine, name)


class EngineMembers:
    """Mixin of :class:`~lift_ds.backends.base.Backend` (see the module docstring)."""

    name = "base"
    world_size = 1

    def library_member(self, name: str) -> Any:
        """``name`` on the current phase's engine of the backend's library (DeepSpeed's), else :data:`MISSING`."""
        return MISSING

    def library_member_problem(self, name: str) -> str | None:
        """Why ``name`` is unavailable, when it is a DeepSpeedEngine member this backend has no engine for."""
        if compat.is_deepspeed_engine_member(name):
            return (
                f"a DeepSpeedEngine member, and this run's backend is {self.name!r}, which builds no DeepSpeed engine "
                '(lift.backend "deepspeed" has one per phase)'
            )
        return None

    def no_sync(self) -> AbstractContextManager[None]:
        """A context in which backward does not reduce gradients across ranks."""
        if self.world_size == 1:
            return contextlib.nullcontext()
        raise NotUnderLiftError(f"no_sync: backend {self.name!r} cannot skip the gradient reduction of a backward")

    def monitor(self) -> Any:
        """The run-long monitor (DeepSpeed's TensorBoard / W&B / CSV / Comet writers), or None."""
        return None

    @staticmethod
    def end_process_group(models: Iterable[Any] = ()) -> None:
        """Destroy the default process group and every group made from it, if one is up (at exit), and free
        them now, so their worker threads are joined while the interpreter is whole (gloo's threads, torn
        down with the interpreter, can abort the process). Through DeepSpeed's
        ``deepspeed.comm.destroy_process_group`` when DeepSpeed's comm layer is up: it also drops the
        groups DeepSpeed keeps (``groups._WORLD_GROUP``, ...); ``models``' ZeRO-3 parameters drop theirs."""
        import gc
        import sys

        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        ds_comm = sys.modules.get("deepspeed.comm")
        if ds_comm is not None and ds_comm.is_initialized():
            from . import compat

            compat.forget_process_groups(list(models))
            ds_comm.destroy_process_group()
        else:
            dist.destroy_process_group()
        gc.collect()

    def gathers_16bit_on_save(self) -> bool:
        """Whether a consolidated 16-bit save writes the model (DeepSpeed ZeRO-3 asks its config)."""
        return True
