"""Streamed frozen layers (``lift.stream_frozen``): a frozen decoder layer's weights are not resident.

Each frozen layer's linear weights (NF4 / int8 quantized, or in the training dtype) are written once,
as the inner tensors of their torchao form, to a safetensors file per layer (``<dir>/<layer>.safetensors``).
While the model runs, a :class:`LayerStreamer` holds at most ``capacity`` layers in memory (device
memory on a GPU, host RAM on a CPU): the one computing and the next ones it will need, read ahead by a
background thread (``pread`` into reused buffers, never a memory map, so resident memory is those
buffers; on CUDA then copied on a side stream from pinned buffers). What "next" means follows the pass:

- forward: the layers above; near the top, the top layers again, for the backward that follows;
- backward (through the frozen layers above the active one): the layers below, down to the lowest
  one that needs a gradient; then the first layers, for the next forward;
- an optimizer step: none (:meth:`LayerStreamer.release`, so that the step's peak holds no frozen
  layer), then the first layers again, read while the step runs (:meth:`LayerStreamer.prefetch_first`).

:class:`StreamedFrozenLinear` replaces each ``nn.Linear`` of a streamed layer. It holds no weight: it
asks the streamer for it in the forward, and :func:`lift_ds.qkernels.frozen_linear` asks again in
the backward, so autograd never keeps a frozen layer's weight between the two (activation
checkpointing's recomputation asks a third time). Memory for frozen weights is therefore
``capacity`` layers, whatever the depth.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .qkernels import frozen_linear, kind_of
from .tensorfile import Entry, read_header, read_into, write_file
from .utils import fix_malloc_mmap_threshold

#: layers held at once: the one computing and two read ahead
CAPACITY = 3
#: host allocations from this size up are mmap'd and given back to the OS when freed (glibc): layers'
#: buffers and a phase's gradients and optimizer state, freed and allocated again, do not fragment the
#: heap (without it a 7B-shaped streamed run's peak RSS grew 3.02 -> 3.25 GiB over its phases)
MMAP_THRESHOLD = 1 << 17
_META_KEY = "lift_ds.stream"


# --------------------------------------------------------------------------- one layer's file


def _parts(w: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A frozen weight's inner tensors and what rebuilds it (torchao's own flatten)."""
    kind = kind_of(w)
    meta: dict[str, Any] = {"kind": kind, "shape": list(w.shape), "dtype": str(w.dtype).removeprefix("torch.")}
    if kind == "full":
        return {"weight": w.detach().cpu()}, meta
    names, ctx = w.__tensor_flatten__()
    tensors = {n: getattr(w, n).detach().cpu() for n in names if getattr(w, n, None) is not None}
    if kind == "nf4":
        meta.update(block_size=ctx["block_size"], n_blocks=ctx["n_blocks"], scaler_block_size=ctx["scaler_block_size"])
    else:
        if w.act_quant_kwargs is not None:
            raise ValueError("streaming an int8 weight with activation quantization is not supported")
        meta.update(block_size=list(w.block_size), reduce_range=bool(w.reduce_range))
    return tensors, meta


def _rebuild(meta: dict[str, Any], t: dict[str, torch.Tensor]) -> torch.Tensor:
    kind, dtype, shape = meta["kind"], getattr(torch, meta["dtype"]), torch.Size(meta["shape"])
    if kind == "full":
        return t["weight"]
    if kind == "nf4":
        from torchao.quantization import NF4Tensor
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import SubclassTensorArgs

        args = SubclassTensorArgs(shape, (shape[1], 1), 0, dtype, t["quantized_data"].device, False)
        return NF4Tensor(
            args,
            meta["block_size"],
            meta["n_blocks"],
            meta["scaler_block_size"],
            t["quantized_scalers"],
            t["quantization_factor"],
            t["scaler_mean"],
            t["quantized_data"],
            t["nf4"],
        )
    from torchao.quantization import Int8Tensor

    return Int8Tensor(
        t["qdata"],
        t["scale"],
        meta["block_size"],
        dtype,
        zero_point=t.get("zero_point"),
        reduce_range=meta["reduce_range"],
    )


def write_layer(path: Path, weights: dict[str, torch.Tensor]) -> None:
    """One layer's frozen weights (module path -> torchao tensor or plain weight) as one file."""
    tensors, meta = {}, {}
    for p, w in weights.items():
        parts, meta[p] = _parts(w)
        tensors.update({f"{p}/{n}": t for n, t in parts.items()})
    write_file(path, tensors, {_META_KEY: json.dumps(meta)})


# --------------------------------------------------------------------------- the streamer


class _Slot:
    """One layer in memory (or on its way): its weights by module path, and the buffers they use."""

    __slots__ = ("layer", "future", "weights", "buffers")

    def __init__(self, layer: str) -> None:
        self.layer = layer
        self.future: Future | None = None
        self.weights: dict[str, torch.Tensor] | None = None
        self.buffers: dict[str, torch.Tensor] | None = None


class LayerStreamer:
    """Keeps at most ``capacity`` frozen layers in memory, read from their files ahead of use.

    Args:
        directory: where layer files go (a temporary directory, removed by :meth:`close`, when None).
        device: where weights are used (``cuda``: copied there from pinned host buffers).
        capacity: layers held at once (>= 1; 1 reads each layer on demand, nothing ahead).
    """

    def __init__(
        self, directory: str | Path | None = None, device: str | torch.device = "cpu", capacity: int = CAPACITY
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        fix_malloc_mmap_threshold(MMAP_THRESHOLD)
        self._own_dir = directory is None
        self.directory = Path(tempfile.mkdtemp(prefix="lift_ds_stream_")) if directory is None else Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(device)
        self.capacity = capacity
        self._files: dict[str, tuple[Path, dict[str, Entry], dict[str, Any]]] = {}
        self._order: list[str] = []
        self._slots: dict[str, _Slot] = {}
        self._pool: list[dict[str, torch.Tensor]] = []
        self._lock = threading.RLock()
        self._executor: ThreadPoolExecutor | None = None
        self._copy_stream: Any = None
        self._current: tuple[str, str] | None = None
        self._grad_low: int | None = None
        self.stats: dict[str, float] = {
            "loads": 0,
            "misses": 0,
            "wait_seconds": 0.0,
            "peak_materialised": 0,
            "read_bytes": 0,
        }
        #: when a list, every load / evict / get is appended as ``(event, layer)`` (tests count with it)
        self.trace: list[tuple[str, str]] | None = None

    # ----------------------------------------------------------------- files

    def write(self, layer: str, weights: dict[str, torch.Tensor]) -> None:
        """Write (or replace) a layer's file; it is streamed from now on."""
        path = self.directory / f"{layer}.safetensors"
        write_layer(path, weights)
        entries, meta = read_header(path)
        with self._lock:
            self._drop(layer)
            self._files[layer] = (path, entries, json.loads(meta[_META_KEY]))
            self._order = sorted(self._files, key=_position)

    def forget(self, layer: str) -> None:
        """The layer is resident again (it became active): drop its slot and its file."""
        with self._lock:
            self._drop(layer)
            entry = self._files.pop(layer, None)
            self._order = sorted(self._files, key=_position)
        if entry is not None:
            entry[0].unlink(missing_ok=True)

    def layers(self) -> list[str]:
        return list(self._order)

    def file_bytes(self) -> int:
        return sum(p.stat().st_size for p, _, _ in self._files.values())

    def materialised(self) -> list[str]:
        """Layers in memory now (loaded or being read)."""
        return list(self._slots)

    # ----------------------------------------------------------------- use

    def weight(self, layer: str, path: str, grad: bool = False) -> torch.Tensor:
        """Module ``path``'s weight in layer ``layer``, on :attr:`device`; reads ahead for what follows.

        Args:
            grad: the forward through this layer will be back-propagated (its input needs a gradient).
        """
        with self._lock:
            if layer not in self._files:
                raise RuntimeError(f"{layer}: not a streamed layer (it is active, or was never written)")
            self._advance(layer, grad)
            slot = self._slots.get(layer)
            if slot is None:  # not read ahead (e.g. a layer called on its own): read it now
                self.stats["misses"] += 1
                self._make_room(keep=())
                slot = self._schedule(layer)
            if self.trace is not None:
                self.trace.append(("get", layer))
        if slot.weights is None:
            t0 = time.perf_counter()
            self._finish(slot)
            self.stats["wait_seconds"] += time.perf_counter() - t0
        assert slot.weights is not None
        return slot.weights[path]

    def _advance(self, layer: str, grad: bool) -> None:
        """On entering a layer: drop what is no longer wanted, read ahead what will be."""
        backward = torch._C._current_autograd_node() is not None
        phase = "backward" if backward else "forward"
        if self._current == (layer, phase):
            return
        pos = self._order.index(layer)
        if phase == "forward":
            prev = self._current
            if prev is None or prev[1] != "forward" or prev[0] not in self._files or self._order.index(prev[0]) > pos:
                self._grad_low = None  # a new forward pass
            if grad and (self._grad_low is None or pos < self._grad_low):
                self._grad_low = pos
            seq = self._order[pos:]
            if self._grad_low is not None:
                seq = seq + self._order[self._grad_low :][::-1]
        else:
            low = self._grad_low if self._grad_low is not None and self._grad_low <= pos else 0
            seq = self._order[low : pos + 1][::-1]
        self._current = (layer, phase)
        wanted = list(dict.fromkeys(seq + self._order))[: self.capacity]
        for other in [s for s in self._slots if s not in wanted]:
            self._drop(other)
        for w in wanted:
            if w not in self._slots:
                self._schedule(w)

    def _make_room(self, keep: tuple[str, ...]) -> None:
        while len(self._slots) >= self.capacity:
            victim = next((s for s in self._slots if s not in keep), None)
            if victim is None:
                return
            self._drop(victim)

    def _schedule(self, layer: str) -> _Slot:
        slot = _Slot(layer)
        buffers = self._pool.pop() if self._pool else None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="lift_ds-stream")
        slot.future = self._executor.submit(self._read, layer, buffers)
        self._slots[layer] = slot
        self.stats["loads"] += 1
        self.stats["peak_materialised"] = max(self.stats["peak_materialised"], len(self._slots))
        if self.trace is not None:
            self.trace.append(("load", layer))
        return slot

    def _finish(self, slot: _Slot) -> None:
        assert slot.future is not None
        weights, buffers = slot.future.result()
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            for w in weights.values():
                for t in _inner(w):
                    t.record_stream(stream)  # its memory is not reused before this stream is done with it
        slot.weights, slot.buffers = weights, buffers

    def _drop(self, layer: str) -> None:
        slot = self._slots.pop(layer, None)
        if slot is None:
            return
        if slot.weights is None and slot.future is not None:
            try:
                self._finish(slot)
            except Exception:  # noqa: BLE001 - a failed read of a layer no longer wanted
                pass
        if slot.buffers is not None:  # CPU: the buffers the weights lived in; CUDA: pinned staging buffers, copied
            self._pool.append(slot.buffers)
        slot.weights = None
        if self.trace is not None:
            self.trace.append(("evict", layer))

    def _read(
        self, layer: str, buffers: dict[str, torch.Tensor] | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(worker thread) Read a layer's file into buffers (reused when their shapes fit)."""
        path, entries, meta = self._files[layer]
        cuda = self.device.type == "cuda"
        out: dict[str, torch.Tensor] = {}
        fd = os.open(path, os.O_RDONLY)
        try:
            for name, e in entries.items():
                key = _suffix(name, layer)
                buf = buffers.get(key) if buffers else None
                if buf is None or buf.dtype != e.dtype or tuple(buf.shape) != e.shape:
                    buf = torch.empty(e.shape, dtype=e.dtype, pin_memory=cuda)
                out[key] = read_into(fd, e, buf)
                self.stats["read_bytes"] += e.end - e.start
        finally:
            os.close(fd)
        tensors = out
        if cuda:
            if self._copy_stream is None:
                self._copy_stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(self._copy_stream):
                tensors = {k: v.to(self.device, non_blocking=True) for k, v in out.items()}
            self._copy_stream.synchronize()
        weights = {
            p: _rebuild(
                m, {n.split("/", 1)[1]: t for n, t in tensors.items() if n.split("/", 1)[0] == _suffix(p, layer)}
            )
            for p, m in meta.items()
        }
        return weights, out

    def release(self) -> None:
        """Hold no layer (and no spare buffer) while the optimizer steps: its peak (gradients, moments,
        the step's temporaries) then has no frozen layer beside it."""
        with self._lock:
            for layer in list(self._slots):
                self._drop(layer)
            self._pool.clear()
            self._current = None

    def prefetch_first(self) -> None:
        """Start reading the first layers, for the forward that follows an optimizer step."""
        with self._lock:
            for layer in self._order[: self.capacity]:
                if layer not in self._slots:
                    self._schedule(layer)

    def to(self, device: torch.device) -> None:
        """Use the weights on another device from now on (drops what is in memory)."""
        with self._lock:
            for layer in list(self._slots):
                self._drop(layer)
            self._pool.clear()
            self.device = torch.device(device)

    def close(self) -> None:
        with self._lock:
            for layer in list(self._slots):
                self._drop(layer)
            self._pool.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)


def _position(layer: str) -> tuple[str, int]:
    stack, _, index = layer.rpartition(".")
    return (stack, int(index)) if index.isdigit() else (layer, -1)


def _suffix(name: str, layer: str) -> str:
    """A tensor name without its layer prefix (buffers are reused across layers of one shape)."""
    return name[len(layer) + 1 :] if name.startswith(layer + ".") else name


def _inner(w: torch.Tensor) -> list[torch.Tensor]:
    if kind_of(w) == "full":
        return [w]
    return [getattr(w, n) for n in w.__tensor_flatten__()[0] if getattr(w, n, None) is not None]


# --------------------------------------------------------------------------- the module


class StreamedFrozenLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight lives in the streamer's files (the bias stays a frozen parameter)."""

    def __init__(
        self,
        streamer: LayerStreamer,
        layer: str,
        path: str,
        bias: nn.Parameter | None,
        in_features: int,
        out_features: int,
        kind: str,
    ) -> None:
        super().__init__()
        self.streamer, self.layer, self.path = streamer, layer, path
        self.in_features, self.out_features, self.kind = in_features, out_features, kind
        self.bias = bias
        self._grad = False

    def frozen_weight(self) -> torch.Tensor:
        return self.streamer.weight(self.layer, self.path, self._grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._grad = torch.is_grad_enabled() and x.requires_grad
        return frozen_linear(x, self, self.bias)

    def _apply(self, fn: Any, recurse: bool = True) -> StreamedFrozenLinear:
        super()._apply(fn, recurse)
        target = fn(torch.zeros(1, device=self.streamer.device)).device
        if target != self.streamer.device:
            self.streamer.to(target)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, streamed={self.kind}"
