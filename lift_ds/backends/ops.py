"""Which implementation runs a config's Adam/AdamW under DeepSpeed: its compiled op where it is
pre-built or can be built here, torch's own otherwise, said in one log line.

DeepSpeed builds ``FusedAdam`` (GPU) and ``DeepSpeedCPUAdam`` (optimizer offload) from C++/CUDA sources
on first use: minutes with ninja and a matching compiler, a failure without them. On CUDA lift_ds runs
DeepSpeed's ``FusedAdam`` only where it was pre-built (``DS_BUILD_FUSED_ADAM=1`` at install), and
otherwise ``torch.optim.AdamW(fused=True)``, a multi-tensor kernel of its own that needs no compile (a
JIT build would cost minutes at the first phase, against a torch it was never tested with). For
``cpu_adam`` (optimizer offload, where torch's CPU AdamW is much slower) it asks DeepSpeed's op builder
(``is_compatible``) and looks for the tools; without them it runs ``torch.optim.AdamW`` over the CPU
partitions, which DeepSpeed allows with ``zero_force_ds_cpu_optimizer: false``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

ADAM_TYPES = ("adam", "adamw")


@dataclass
class OptimizerChoice:
    """``factory`` None: DeepSpeed builds the config's optimizer (its op); else this torch one.
    ``config`` holds DeepSpeed keys the choice needs; ``message`` is logged once."""

    factory: Callable | None
    message: str
    config: dict[str, Any] = field(default_factory=dict)


def _tools(cuda: bool) -> list[str]:
    """The build tools that are missing (ninja, a C++ compiler, and nvcc for CUDA ops)."""
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available

    missing = [] if is_ninja_available() else ["ninja"]
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        missing.append("a C++ compiler")
    if cuda and not (shutil.which("nvcc") or (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))):
        missing.append("nvcc")
    return missing


def op_status(op: str) -> tuple[str, str]:
    """``("prebuilt" | "buildable" | "unavailable", why)`` for DeepSpeed's ``cpu_adam`` or ``fused_adam``."""
    from . import compat

    prebuilt = compat.installed_op(op)
    if prebuilt is None:
        return "unavailable", "DeepSpeed is not installed"
    if prebuilt:
        return "prebuilt", f"DeepSpeed was installed with {op} built"
    from deepspeed.ops.op_builder import CPUAdamBuilder, FusedAdamBuilder

    builder = CPUAdamBuilder() if op == "cpu_adam" else FusedAdamBuilder()
    if not builder.is_compatible(verbose=False):
        return "unavailable", f"DeepSpeed's {builder.NAME} builder reports this machine incompatible"
    missing = _tools(cuda=op == "fused_adam")
    if missing:
        return "unavailable", f"{' and '.join(missing)} not found"
    return "buildable", f"{op} compiles on first use (about 1-2 minutes, cached in TORCH_EXTENSIONS_DIR)"


def choose_optimizer(section: Mapping[str, Any] | None, device: str, offload: bool) -> OptimizerChoice:
    """The implementation for the config's ``optimizer`` section on ``device`` (``cuda``, ``cpu``, ...)."""
    from ..optim import optimizer_factory_from_section

    kind = str((section or {}).get("type", "")).lower()
    if section is None:
        return OptimizerChoice(None, "")
    if kind == "sgd":
        return OptimizerChoice(optimizer_factory_from_section(section), "the config's SGD runs as torch.optim.SGD")
    if kind not in ADAM_TYPES:
        return OptimizerChoice(None, f"the config's {section.get('type')} runs as DeepSpeed builds it")
    op = "cpu_adam" if offload else "fused_adam" if device == "cuda" else None
    if op is not None:
        status, why = op_status(op)
        if status == "prebuilt" or (status == "buildable" and op == "cpu_adam"):
            return OptimizerChoice(None, f"the config's {section.get('type')} runs as DeepSpeed's {op} ({why})")
        if status == "buildable":
            why = (
                "DeepSpeed's fused_adam is not pre-built, "
                "and lift_ds does not compile it: torch's fused AdamW needs no build"
            )
    else:
        why = "no op to compile on a CPU accelerator"
    fused = device == "cuda" and not offload
    factory = optimizer_factory_from_section(section, extra={"fused": True} if fused else {})
    what = "torch.optim.AdamW(fused=True)" if fused else "torch.optim.AdamW"
    extra = {"zero_force_ds_cpu_optimizer": False} if offload else {}
    where = " over the offloaded CPU partitions" if offload else ""
    return OptimizerChoice(factory, f"the config's {section.get('type')} runs as {what}{where} ({why})", extra)
