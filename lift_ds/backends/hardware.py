"""What the accelerator can run, asked the way each backend's library asks it.

A config asking for a precision the hardware cannot run must fail in config checking, naming the
key, the hardware fact and what to use instead, not with a library traceback inside the first phase
build. The question is the library's own: DeepSpeed's accelerator (``is_fp16_supported()`` /
``is_bf16_supported()``, which ``DeepSpeedEngine._do_sanity_check`` raises on) for backend
``deepspeed``; torch's for ``torch`` and ``fsdp`` (CUDA: ``torch.cuda.is_bf16_supported``; CPU
autocast runs bf16 on any x86/ARM CPU). Tests ask the same functions, so a hardware-dependent test
runs the feature where it is supported and the error path where it is not.
"""

from __future__ import annotations

import functools
from pathlib import Path

PRECISIONS = ("fp32", "bf16", "fp16")


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or ``"unknown CPU"``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _cpu_fact(dtype: str) -> str:
    import torch

    probe = {"fp16": "_is_mkldnn_fp16_supported", "bf16": "_is_mkldnn_bf16_supported"}[dtype]
    try:
        native = bool(getattr(torch.ops.mkldnn, probe)())
    except Exception:  # noqa: BLE001 - an old torch without the probe
        native = False
    isa = {"fp16": "AVX-512 FP16 or AMX-FP16", "bf16": "AVX-512 BF16 or AMX-BF16"}[dtype]
    return f"torch.ops.mkldnn.{probe}() is {native} on this CPU ({cpu_model()}; native {dtype} needs {isa})"


def deepspeed_supports(dtype: str) -> tuple[bool, str]:
    """``(supported, fact)`` for ``dtype`` (``fp16``/``bf16``) as DeepSpeed's accelerator reports it."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    ok = bool(acc.is_fp16_supported() if dtype == "fp16" else acc.is_bf16_supported())
    name = acc.device_name()
    fact = f"DeepSpeed's {name} accelerator reports is_{dtype}_supported() = {ok}"
    if name == "cpu":
        fact += f" ({_cpu_fact(dtype)})"
    elif name == "cuda":
        import torch

        fact += (
            f" ({torch.cuda.get_device_name()}, compute capability "
            f"{'.'.join(map(str, torch.cuda.get_device_capability()))})"
        )
    return ok, fact


def torch_supports(dtype: str) -> tuple[bool, str]:
    """``(supported, fact)`` for ``dtype`` on the device the torch and FSDP backends train on."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        cc = ".".join(map(str, torch.cuda.get_device_capability()))
        if dtype == "bf16":
            ok = torch.cuda.is_bf16_supported(including_emulation=False)
            return ok, f"torch.cuda.is_bf16_supported() is {ok} on {name} (compute capability {cc}; bf16 needs 8.0+)"
        return True, f"{name} runs fp16"
    # CPU autocast computes bf16 on any CPU (natively with AVX-512 BF16/AMX, else converted): slow, never wrong
    if dtype == "bf16":
        return True, f"CPU autocast runs bf16 on any CPU ({_cpu_fact('bf16')})"
    return True, "CPU"


def supports(backend: str, dtype: str) -> tuple[bool, str]:
    """``(supported, fact)``: can ``backend`` train in ``dtype`` on this machine? ``fp32`` always can."""
    if dtype == "fp32":
        return True, "fp32 runs everywhere"
    if dtype not in PRECISIONS:
        raise ValueError(f"dtype must be one of {', '.join(PRECISIONS)}, got {dtype!r}")
    if backend == "deepspeed":
        return deepspeed_supports(dtype)
    return torch_supports(dtype)


def precision_problems(backend: str, precision: str) -> list[str]:
    """A config problem (JSON path, hardware fact, what to use instead) when ``precision`` cannot run."""
    if precision == "fp32":
        return []
    ok, fact = supports(backend, precision)
    if ok:
        return []
    other = "bf16" if precision == "fp16" else "fp16"
    alt_ok, _ = supports(backend, other) if backend == "deepspeed" or other == "bf16" else (False, "")
    instead = f'set "{precision}": {{"enabled": false}} to train in fp32' + (
        f', or use "{other}": {{"enabled": true}}, which this machine supports' if alt_ok else ""
    )
    return [
        f"{precision}.enabled: true, but this machine cannot train in {precision}: "
        f"{fact}. {instead[0].upper()}{instead[1:]}"
    ]
