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
    """The number of ranks the launcher started (``WORLD_SIZE``; 1 when not launched): the one reader of the
    variable. The entry points call it to build a run configuration and hand ``RunConfig.world_size`` on; only
    the per-rank block-store directory (``quant.rank_dir``), built where no configuration is at hand, asks again."""
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
        np.random.set_state(
            (name, np.asarray(keys, dtype=np.int64).astype(np.uint32), int(pos), int(has_gauss), float(cached))
        )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


#: glibc's ``mallopt`` parameter number of ``M_MMAP_THRESHOLD`` (malloc.h)
_M_MMAP_THRESHOLD = -3


def fix_malloc_mmap_threshold(nbytes: int) -> bool:
    """glibc: serve every allocation of at least ``nbytes`` by ``mmap``, so that freeing it gives the
    memory back to the OS. By default glibc raises that threshold after a large block is freed (up to
    32 MiB), and freed tensors below it then stay in the heap, fragmented: a process that frees and
    allocates layers of a few MiB over and over (streamed layers, one phase after another) grows in
    resident memory. Setting the threshold fixes it (glibc's own ``MALLOC_MMAP_THRESHOLD_``, as an
    API call). Returns whether it was set (False off glibc)."""
    import ctypes
    import platform

    if platform.system() != "Linux":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, int(nbytes)))
