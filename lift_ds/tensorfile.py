"""Safetensors files read with ``pread`` into ordinary (or given) buffers, never memory-mapped.

A memory-mapped file's touched pages count in the process's resident set until it is unmapped, so a
model read layer by layer through ``safe_open`` (which maps each shard) grows in RSS with every
layer read from a shard it keeps open. Here a file's header is parsed once (8-byte little-endian
length, a JSON table of ``dtype`` / ``shape`` / ``data_offsets``) and each tensor is read with
``os.preadv`` into memory the caller owns: resident memory is what the caller keeps, and the page
cache (which the kernel may drop) holds the rest. Writing streams each tensor's bytes from its own
memory (the format is 8 bytes of header length, the JSON header padded to 8 bytes, the data).
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import TensorFileError

DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
_MAX_HEADER = 100 * 2**20


class Entry:
    """Where one tensor lies in a file: dtype, shape, and byte range (absolute offsets)."""

    __slots__ = ("dtype", "shape", "start", "end")

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...], start: int, end: int) -> None:
        self.dtype, self.shape, self.start, self.end = dtype, shape, start, end


def read_header(path: str | Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """``(entries by name, the file's string metadata)`` of a safetensors file.

    Raises:
        TensorFileError: the file is not a readable safetensors file.
    """
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise TensorFileError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            raise TensorFileError(f"{path}: safetensors header of {n} bytes (more than {_MAX_HEADER})")
        try:
            table = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TensorFileError(f"{path}: bad safetensors header: {e}") from None
    size = os.path.getsize(path)
    base = 8 + n
    entries: dict[str, Entry] = {}
    for name, info in table.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in DTYPES:
            raise TensorFileError(
                f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}; readable: {', '.join(DTYPES)}"
            )
        b, e = info["data_offsets"]
        shape = tuple(int(s) for s in info["shape"])
        dtype = DTYPES[info["dtype"]]
        numel = 1
        for s in shape:
            numel *= s
        if not 0 <= b <= e or base + e > size or e - b != numel * torch.empty(0, dtype=dtype).element_size():
            raise TensorFileError(
                f"{path}: tensor {name!r} has byte range {b}..{e}, "
                f"which does not fit its shape {list(shape)} or the file"
            )
        entries[name] = Entry(dtype, shape, base + b, base + e)
    return entries, dict(table.get("__metadata__") or {})


def _bytes_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def read_into(fd: int, entry: Entry, out: torch.Tensor) -> torch.Tensor:
    """Read one tensor into ``out`` (a contiguous CPU tensor of its dtype and shape, e.g. pinned)."""
    if out.dtype != entry.dtype or tuple(out.shape) != entry.shape or not out.is_contiguous():
        raise ValueError(
            f"buffer {out.dtype} {list(out.shape)} does not fit a {entry.dtype} {list(entry.shape)} tensor"
        )
    if entry.end == entry.start:
        return out
    view, done = _bytes_view(out), 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], entry.start + done)
        if got <= 0:
            raise TensorFileError(f"short read at byte {entry.start + done} (file truncated?)")
        done += got
    return out


class TensorFile:
    """One safetensors file opened for reading tensors by name (thread-safe: ``pread`` only).

    Args:
        path: the file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.entries, self.metadata = read_header(self.path)
        self._fd: int | None = os.open(self.path, os.O_RDONLY)
        self._lock = threading.Lock()

    def keys(self) -> list[str]:
        return list(self.entries)

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``name`` (into ``out`` when given)."""
        e = self.entries[name]
        if self._fd is None:
            raise ValueError(f"{self.path}: closed")
        return read_into(self._fd, e, torch.empty(e.shape, dtype=e.dtype) if out is None else out)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_file(path: str | Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (all, or ``names``), read without memory-mapping it."""
    with TensorFile(path) as f:
        return {n: f.get(n) for n in (names if names is not None else f.keys())}


CODES = {dtype: code for code, dtype in DTYPES.items()}


def write_file(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write a safetensors file atomically (a ``.partial`` file renamed over the target), each tensor's
    bytes straight from its memory: no serialized copy of the whole file is built (``safetensors``'
    own ``save_file`` holds one), so writing a layer or a shard costs no second copy of it."""
    path = Path(path)
    header: dict[str, Any] = {}
    items = []
    offset = 0
    for name, t in tensors.items():
        t = t.detach()
        t = (t if t.device.type == "cpu" else t.cpu()).contiguous()
        if t.dtype not in CODES:
            raise TypeError(f"{name}: dtype {t.dtype} cannot be written to a safetensors file")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        items.append(t)
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for t in items:
            if t.numel():
                f.write(_bytes_view(t))
    os.replace(tmp, path)
