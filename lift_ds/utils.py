"""Small shared helpers: the rank-aware logger and RNG state capture."""

from __future__ import annotations

import logging
import os
import random
from typing import Any


def get_rank() -> int:
    """This process's global rank from the launchers' variables (0 when not launched)."""
    return int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    """The number of ranks the launcher started (``WORLD_SIZE``; 1 when not launched): read here only, by the
    entry points that build a run configuration; everything after them takes ``RunConfig.world_size``."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class _RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "all_ranks", False) or get_rank() == 0


def get_logger(name: str = "lift_ds") -> logging.Logger:
    """The library logger: records from rank 0 only unless logged with ``extra={"all_ranks": True}``."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, _RankZeroFilter) for f in logger.filters):
        logger.addFilter(_RankZeroFilter())
    return logger


def rng_state() -> dict[str, Any]:
    """Python, NumPy (if installed) and torch RNG states of this process, as tensors, numbers,
    strings and lists only (a checkpoint is read back with ``torch.load(weights_only=True)``)."""
    import torch

    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a state from :func:`rng_state`."""
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=default_pg_timeout)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"/lift_ds/attempt_{attempt}", store), rank=int(os.environ["RANK"]), world_size=world)
    else:
        dist.init_process_group(backend)
