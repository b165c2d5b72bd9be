"""What the modules outside backends/ need of how a run is distributed (they never touch
torch.distributed or a backend's vocabulary themselves): the process group, a rank's shard of a
tensor, and the layout a checkpoint records."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .base import Backend


def init_process_group(backend: str) -> None:
    """``torch.distributed.init_process_group`` from the launcher's environment, safe across
    torchrun elastic restarts.

    Under torchrun the workers share the agent's TCPStore, and with torch 2.13 ``--standalone`` a
    restarted attempt can find the previous attempt's keys in it: a fast rank then reads its peer's
    old gloo address and fails with "connectFullMesh ... Connection refused" (or waits). The store is
    prefixed with the restart attempt here, so each attempt rendezvous only with itself. Without any
    launcher variable, a world of one process is set up on a free local port (as DeepSpeed does).
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if not any(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR")):
        # one process without a launcher (python train.py): a world of one on a free local port
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and "MASTER_ADDR" in os.environ:
        from torch.distributed.constants import default_pg_timeout

        world = int(os.environ["WORLD_SIZE"])
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            world,
            is_master=False,
            timeout=default_pg_timeout,
        )
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        prefixed = dist.PrefixStore(f"/lift_ds/attempt_{attempt}", store)
        dist.init_process_group(backend, store=prefixed, rank=int(os.environ["RANK"]), world_size=world)
    else:
        dist.init_process_group(backend)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this rank holds: a DTensor's local shard (FSDP2), else ``t`` itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def checkpoint_layout(backend: Backend) -> dict[str, Any]:
    """How ``backend`` lays the run out, recorded in a checkpoint's metadata as ``layout``: its ZeRO
    stage (FSDP2 counts as 3, the torch backend as 0). A resume logs a change and never refuses one."""
    return {"zero_stage": backend.memory_layout()[0]}


def layout_changes(backend: Backend, meta: Mapping[str, Any]) -> list[str]:
    """``key old -> new`` for each entry of :func:`checkpoint_layout` that differs from the layout a
    checkpoint's metadata records (``layout``; a checkpoint from before it has a top-level ``zero_stage``)."""
    saved = meta.get("layout")
    if not isinstance(saved, dict):
        saved = {k: meta[k] for k in ("zero_stage",) if k in meta}
    return [f"{k} {saved.get(k)} -> {v}" for k, v in checkpoint_layout(backend).items() if saved.get(k) != v]
