"""Portable optimizer state: full per-parameter tensors, independent of ranks and backend.

A LIFT phase holds optimizer state for one block, so a consolidated copy is small. Every backend
reads and writes it in one form, ``{"step", "keys", "state": {name: {key: tensor}}, "master": {name:
fp32 tensor}}``, which is what checkpoints store (``optimizer_state.pt``) and what
``optimizer_state: offload`` stashes (split across ranks by parameter). A checkpoint written by 2
ranks of ZeRO-3 therefore loads into 1 rank of the torch backend, 4 ranks of FSDP2, and so on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

#: the portable files of a checkpoint (any ranks, any backend): full weights, full optimizer state
WEIGHTS_FILE = "weights.safetensors"
OPTIMIZER_FILE = "optimizer_state.pt"
OPTIMIZER_FORMAT = "lift_ds/full-optimizer-state/1"


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A fp32 copy on the host. From a GPU: into pinned memory, without waiting (the copy overlaps
    what follows; :func:`host_copies_done` waits for all of them before the copies are read)."""
    t = t.detach()
    if type(t) is not torch.Tensor and hasattr(t, "dequantize") and not hasattr(t, "full_tensor"):
        t = t.dequantize()  # torchao's 8-bit optimizer state: its values, as a plain tensor
    if t.is_cuda:
        out = torch.empty(t.shape, dtype=torch.float32, pin_memory=True)
        out.copy_(t, non_blocking=True)
        return out
    return t.to("cpu", torch.float32, copy=True)


def host_copies_done() -> None:
    """Wait for the :func:`to_host` copies issued on the current CUDA stream (no-op without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.current_stream().synchronize()


def full_value(t: torch.Tensor) -> torch.Tensor:
    """The full value of a (possibly DTensor-sharded) tensor, on the host in fp32 (collective for a
    DTensor; see :func:`to_host` for GPU tensors)."""
    return to_host(t.full_tensor() if hasattr(t, "full_tensor") else t)


def placed_like(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``full`` placed like parameter ``p`` (its shard for a DTensor), in ``p``'s dtype and device
    (a pinned host tensor goes up without blocking the host)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(p, DTensor):
        return distribute_tensor(
            full.to(p.device_mesh.device_type, p.dtype, non_blocking=full.is_pinned()), p.device_mesh, p.placements
        )
    return full.to(p.device, p.dtype, non_blocking=full.is_pinned())


def torch_optimizer_full_state(
    optimizer: torch.optim.Optimizer, names: list[str], params: list[nn.Parameter]
) -> dict[str, Any]:
    """:meth:`Backend.full_optimizer_state` of a ``torch.optim`` optimizer over the parameters
    themselves (their values are the fp32 master); DTensor shards are gathered."""
    out: dict[str, Any] = {"step": None, "keys": [], "state": {}, "master": {}}
    keys: set[str] = set()
    for n, p in zip(names, params):
        out["master"][n] = full_value(p)
        st = optimizer.state.get(p, {})
        out["state"][n] = {k: full_value(v) for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0}
        keys |= set(out["state"][n])
        if "step" in st:
            out["step"] = float(st["step"])
    out["keys"] = sorted(keys)
    host_copies_done()
    return out


def load_torch_optimizer_full_state(
    optimizer: torch.optim.Optimizer, names: list[str], params: list[nn.Parameter], state: dict[str, Any]
) -> None:
    """The inverse of :func:`torch_optimizer_full_state` (a fresh optimizer takes the state as its own)."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    with torch.no_grad():
        for n, p in zip(names, params):
            master = placed_like(state["master"][n], p)
            (p.to_local() if hasattr(p, "to_local") else p).copy_(
                master.to_local() if hasattr(master, "to_local") else master
            )
            tensors = state["state"].get(n, {})
            if not tensors:
                continue
            new_buffer = getattr(optimizer, "_new_buffer", None)  # torchao's low-bit optimizers: their own state type
            if new_buffer is not None:
                st: dict[str, Any] = {
                    k: new_buffer(p, k == "exp_avg").copy_(v.to(p.device)) for k, v in tensors.items()
                }
            else:
                st = {k: placed_like(v, p) for k, v in tensors.items()}
            if state["step"] is not None:
                st["step"] = _step_tensor(state["step"], group_of[id(p)], p)
            optimizer.state[p] = st


def _step_tensor(step: float, group: Mapping[str, Any], p: torch.Tensor) -> torch.Tensor:
    """A step counter as torch's Adam/AdamW create it (on the parameter's device when fused/capturable)."""
    on_device = group.get("fused") or group.get("capturable")
    return torch.tensor(step, dtype=torch.float32, device=p.device if on_device else "cpu")
