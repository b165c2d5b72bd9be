"""Where and when a measurement was taken: the record every data file under docs/ carries.

Every benchmark and experiment script writes :func:`provenance` into its JSON (``"provenance"``):
the machine (CPU model and the instruction sets that change CPU speed: AVX-512, its BF16/FP16
extensions, AMX; cores; memory; a GPU's name and driver where there is one), the date, the commit
(``git rev-parse HEAD``, or ``LIFT_DS_COMMIT`` where the tree has no ``.git``, e.g. a copy on a GPU
machine) and whether the tree had uncommitted changes, the command and the library versions. A figure
in the docs is then reproducible: same commit, same command, and the machine it needs is named.

Nothing here imports torch at module import; :func:`provenance` imports it (and the other libraries)
only to read their versions.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: /proc/cpuinfo flags that decide what CPU kernels torch runs (native bf16/fp16 matmuls, AMX tiles)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")
LIBRARIES = ("torch", "deepspeed", "transformers", "accelerate", "peft", "torchao")


def cpu_info() -> dict[str, Any]:
    """CPU model, the flags of :data:`CPU_FLAGS` it has, logical cores (and those this process may use)."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "model": model,
        "flags": [f for f in CPU_FLAGS if f in flags],
        "avx512": "avx512f" in flags,
        "amx": "amx_tile" in flags,
        "cores": os.cpu_count(),
        "cores_usable": usable,
    }


def memory_gib() -> float | None:
    """Total memory of the machine (``MemTotal``), GiB."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def gpu_info() -> list[dict[str, str]]:
    """Each GPU ``nvidia-smi`` lists (name, driver, memory); empty without one. Starts no CUDA context."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.stdout.strip().splitlines() if out.returncode == 0 else []:
        name, driver, mem = (x.strip() for x in line.split(",")[:3])
        gpus.append({"name": name, "driver": driver, "memory": mem})
    return gpus


def machine() -> dict[str, Any]:
    """The machine a measurement ran on."""
    return {
        "cpu": cpu_info(),
        "memory_gib": memory_gib(),
        "gpus": gpu_info(),
        "hostname_hash": _host_hash(),
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def _host_hash() -> str:
    """A short hash of the host name: tells two machines apart without naming them."""
    import hashlib

    return hashlib.sha256(platform.node().encode()).hexdigest()[:8]


def git_commit(repo: Path = REPO) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}``: HEAD of ``repo`` and whether tracked files
    outside ``docs/`` differ from it (the code measured; a data file an earlier step of the same
    measurement wrote under ``docs/`` is listed in ``"docs_changed"`` instead); ``LIFT_DS_COMMIT``
    when there is no git checkout (dirty then unknown)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=20)
        if sha.returncode == 0:
            status = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=repo,
                capture_output=True,
                text=True,
                timeout=20,
            )
            paths = [line[3:].split(" -> ")[-1] for line in status.stdout.splitlines() if line.strip()]
            docs = [p for p in paths if p.startswith("docs/")]
            out: dict[str, Any] = {"commit": sha.stdout.strip(), "dirty": len(paths) > len(docs)}
            if docs:
                out["docs_changed"] = docs[:20]
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    env = os.environ.get("LIFT_DS_COMMIT")
    return {
        "commit": env or None,
        "dirty": None,
        "commit_from": "LIFT_DS_COMMIT" if env else "unknown: no git checkout and no LIFT_DS_COMMIT",
    }


def versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str | None]:
    """Installed versions of ``names`` (None where missing), read from package metadata (nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    return out


def provenance(command: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """The record a data file carries: machine, date (UTC), commit, command, library versions.

    Args:
        command: the command that produced the data (default: this process's ``sys.argv``).
        **extra: more fields (e.g. ``note="..."``).
    """
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **git_commit(),
        "command": " ".join(command if command is not None else [Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "versions": versions(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES") if k in os.environ},
    }
    record.update(extra)
    return record


def stamped(record: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """``record`` with a ``"provenance"`` entry (kept if it has one: the data's own, e.g. when re-written)."""
    out = dict(record)
    out.setdefault("provenance", provenance(**extra))
    return out


def write_json(path: str | os.PathLike, record: Mapping[str, Any], **extra: Any) -> Path:
    """Write ``record`` with its provenance to ``path`` (atomically: a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(stamped(record, **extra), indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


def sidecar(path: str | os.PathLike, **extra: Any) -> Path:
    """Provenance for a data file that cannot hold it (CSV, PNG): ``<path>.provenance.json`` beside it."""
    path = Path(path)
    return write_json(path.with_name(path.name + ".provenance.json"), {"describes": path.name}, **extra)
