"""ZeRO-3: one parameter offload for the run (a workaround listed in :mod:`lift_ds.backends.compat`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

#: the keyword arguments of ``DeepSpeedZeroOptimizer_Stage3.initialize_ds_offload`` that are per engine, not settings
_PER_ENGINE_OFFLOAD_ARGS = ("module", "timers", "ds_config", "mpu")


class Zero3OffloadKeeper:
    """Keeps one ZeRO-3 ``DeepSpeedZeRoOffload`` for the model across LIFT's engine rebuilds.

    Every ZeRO-3 engine builds a model-wide ``DeepSpeedZeRoOffload`` (its parameter coordinator and a
    forward/backward hook on every module; 60-70% of a ZeRO-3 phase switch, mostly wrapping each hook in
    ``torch.compiler.disable``) and removes it when destroyed, although nothing in it depends on the
    phase: the modules, the partitioning and the settings stay. While :meth:`building` is active,
    ``DeepSpeedZeroOptimizer_Stage3.initialize_ds_offload`` hands the new optimizer the offload built for
    the previous phase when it is for the same module with the same settings (its trace invalidated, so
    the first step of a phase records the new forward/backward order as a fresh engine's would), and the
    kept offload's ``destroy`` is a no-op until :meth:`release` (the end of the run) removes its hooks.
    """

    def __init__(self) -> None:
        self.offload: Any = None
        self._settings: dict[str, Any] | None = None
        self._module: Any = None
        self.reused = 0

    @contextlib.contextmanager
    def building(self, active: bool) -> Iterator[None]:
        """While a ZeRO-3 engine is built (``active``), reuse the kept offload or keep the new one."""
        if not active:
            yield
            return
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

        original = Stage3.initialize_ds_offload
        keeper = self

        def initialize_ds_offload(optimizer: Any, **kwargs: Any) -> Any:
            settings = {k: v for k, v in kwargs.items() if k not in _PER_ENGINE_OFFLOAD_ARGS}
            if keeper.offload is not None and keeper._module is kwargs.get("module") and keeper._settings == settings:
                keeper.offload.partition_all_parameters()
                coordinator = keeper.offload.get_param_coordinator()
                if not coordinator.is_invalid_trace():
                    coordinator._invalidate_trace()
                keeper.reused += 1
                return keeper.offload
            keeper.release()
            offload = original(optimizer, **kwargs)
            offload.destroy = lambda: None  # engine.destroy() must leave the kept hooks; release() removes them
            keeper.offload, keeper._settings, keeper._module = offload, settings, kwargs.get("module")
            return offload

        Stage3.initialize_ds_offload = initialize_ds_offload  # type: ignore[method-assign]
        try:
            yield
        finally:
            Stage3.initialize_ds_offload = original  # type: ignore[method-assign]

    def release(self) -> None:
        """Remove the kept offload's hooks (every parameter partitioned first)."""
        offload, self.offload, self._settings, self._module = self.offload, None, None, None
        if offload is None:
            return
        offload.partition_all_parameters()
        del offload.destroy  # the class's: removes every module hook
        offload.destroy()
        from .compat import drop_zero3_module_functions

        drop_zero3_module_functions(offload.module)  # their closures call this offload's coordinator
