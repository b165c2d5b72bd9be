"""The block store: the exact weights of the frozen layers Q-LIFT holds quantized (or streams).

One entry per decoder layer, in the training dtype, in host memory or as one safetensors file per
layer on local disk. A store may be *backed by its origin*: a model built layer by layer
(:mod:`lift_ds.quant_load`) registers each layer it read from a checkpoint (or drew from a seeded
random init) without writing it, and the store reads it again from there when it is needed — when
the layer becomes active, or at export. Only layers that trained are written, so disk (or memory)
use is the trained layers, not the model a second time. An origin gives back exactly what the
build started from: the checkpoint's tensors cast to the training dtype, or the same seeded init.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .tensorfile import TensorFile, read_file, write_file

#: ``origin(block, names) -> {name: tensor}``: a layer's weights as the run started
Origin = Callable[[str, list[str]], dict[str, torch.Tensor]]


class BlockStore:
    """The exact weights of frozen layers, one entry per layer, off the accelerator.

    Args:
        kind: ``memory`` (CPU tensors) or ``disk`` (``<directory>/<layer>.safetensors``, read when
            a layer becomes active; for models larger than host memory).
        directory: where a disk store writes (a fresh temporary directory, removed by
            :meth:`close`, when None).
        origin: reads a registered, never-written layer's weights again (see the module docstring).
    """

    def __init__(self, kind: str = "memory", directory: str | Path | None = None, origin: Origin | None = None) -> None:
        if kind not in ("memory", "disk"):
            raise ValueError(f"block store kind {kind!r}; allowed: memory, disk")
        self.kind = kind
        self.origin = origin
        self._blocks: dict[str, dict[str, torch.Tensor]] = {}
        self._names: dict[str, list[str]] = {}
        self._written: set[str] = set()
        self._own_dir = kind == "disk" and directory is None
        self.directory = (
            Path(tempfile.mkdtemp(prefix="lift_ds_block_store_"))
            if self._own_dir
            else (Path(directory) if directory else None)
        )
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    def _file(self, block: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{block}.safetensors"

    def register(self, block: str, names: list[str]) -> None:
        """Know a layer without storing it: its origin gives its weights (nothing is written)."""
        if self.origin is None:
            raise ValueError("register() needs a store with an origin")
        self._names[block] = list(names)

    def put(self, block: str, tensors: dict[str, torch.Tensor]) -> None:
        """Store a layer's weights (a memory store copies them to CPU; a disk store writes them
        atomically, straight from their memory)."""
        self._names[block] = list(tensors)
        self._written.add(block)
        if self.kind == "memory":
            self._blocks[block] = {n: t.detach().to("cpu", copy=True).contiguous() for n, t in tensors.items()}
        else:
            write_file(self._file(block), tensors)

    def get(self, block: str) -> dict[str, torch.Tensor]:
        """A layer's stored weights (CPU tensors): written ones, else its origin's."""
        if block not in self._written:
            if self.origin is None or block not in self._names:
                raise KeyError(f"block store: no layer {block!r}")
            return self.origin(block, self._names[block])
        if self.kind == "memory":
            return self._blocks[block]
        return read_file(self._file(block))

    def blocks(self) -> list[str]:
        return list(self._names)

    def names(self, block: str) -> list[str]:
        return list(self._names.get(block, []))

    def written(self) -> list[str]:
        """Layers whose weights this store holds itself (the others come from its origin)."""
        return sorted(self._written)

    def close(self) -> None:
        self._blocks.clear()
        if self._own_dir and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


# --------------------------------------------------------------------------- origins


class SafetensorsReader:
    """Tensors of a Hugging Face checkpoint directory by name (single file or sharded with an index),
    read with ``pread`` (:mod:`lift_ds.tensorfile`): host memory holds what is read, never a mapped shard."""

    def __init__(self, model_dir: str | Path) -> None:
        import json

        d = Path(model_dir)
        index = d / "model.safetensors.index.json"
        if index.is_file():
            files = json.loads(index.read_text())["weight_map"]
            self.where = {n: self._inside(d, f) for n, f in files.items()}
        elif (d / "model.safetensors").is_file():
            with TensorFile(d / "model.safetensors") as f:
                self.where = {n: d / "model.safetensors" for n in f.keys()}
        else:
            raise FileNotFoundError(
                f"{d}: no model.safetensors or model.safetensors.index.json (Q-LIFT loads safetensors layer by layer)"
            )
        self._open: dict[Path, TensorFile] = {}

    @staticmethod
    def _inside(d: Path, name: str) -> Path:
        p = (d / name).resolve()
        if p.parent != d.resolve():
            raise ValueError(f"{d}/model.safetensors.index.json names {name!r}, outside the checkpoint directory")
        return p

    def get(self, name: str) -> torch.Tensor | None:
        path = self.where.get(name)
        if path is None:
            return None
        if path not in self._open:
            self._open[path] = TensorFile(path)
        return self._open[path].get(name)


class CheckpointOrigin:
    """A layer's weights read again from the checkpoint's shards, cast to the training dtype
    (exactly what the layer-by-layer build loaded)."""

    def __init__(self, reader: SafetensorsReader, dtype: torch.dtype) -> None:
        self.reader, self.dtype = reader, dtype

    def __call__(self, block: str, names: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for n in names:
            t = self.reader.get(n)
            if t is None:
                raise KeyError(f"{n}: not in the checkpoint the model was built from")
            out[n] = t.to(self.dtype)
        return out


def layer_seed(seed: int, index: int) -> int:
    """The seed of layer ``index``'s random init (each layer its own, so one can be drawn again)."""
    return seed * 1_000_003 + index + 1


def init_layer(model: nn.Module, layer: nn.Module, seed: int, index: int) -> None:
    """Allocate a meta layer on CPU and draw its weights with the model's own init, seeded per layer."""
    layer.to_empty(device="cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(layer_seed(seed, index))
        for sub in layer.modules():
            # Hugging Face's per-module init (normal(0, initializer_range), ones for norms, ...)
            model._init_weights(sub)


class SeedOrigin:
    """A random-init layer drawn again from its seed (:func:`init_layer` on a copy of a meta template)."""

    def __init__(self, model: nn.Module, template: nn.Module, seed: int, dtype: torch.dtype, prefix: str) -> None:
        self.model, self.template, self.seed, self.dtype, self.prefix = model, template, seed, dtype, prefix

    def __call__(self, block: str, names: list[str]) -> dict[str, torch.Tensor]:
        index = int(block.rsplit(".", 1)[1])
        layer = copy.deepcopy(self.template)
        init_layer(self.model, layer, self.seed, index)
        params = dict(layer.named_parameters())
        return {n: params[n[len(block) + 1 :]].detach().to(self.dtype) for n in names}


def describe(store: Any) -> str:
    """``memory`` / ``disk``, and what backs it."""
    origin = getattr(store, "origin", None)
    return store.kind + (f", backed by its origin ({type(origin).__name__})" if origin is not None else "")
