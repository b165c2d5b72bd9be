"""Q-LIFT: frozen decoder layers held quantized (int8 / NF4), the exact weights in a block store.

``lift.frozen_weights: "int8" | "nf4"`` replaces every ``nn.Linear`` inside a decoder layer that is
not training now (attention and MLP projections) by a :class:`QuantizedFrozenLinear` whose weight is
a torchao tensor (``Int8Tensor``: int8 per output row; ``NF4Tensor``: 4-bit NormalFloat in blocks of
64 with double-quantized scalers, QLoRA's format). Embedding, norms, biases and the head are not
quantized (torchao's NF4 has no embedding lookup, and many heads are tied to the embedding).

The semantics:

- The exact weights of every quantized module live in a :class:`BlockStore` (host memory, or one
  safetensors file per layer on local disk), in the model's training dtype.
- When a layer becomes active its ``nn.Linear`` modules come back with weights read from the store,
  never dequantized from the quantized copy; they train with fp32 master and optimizer state as any
  LIFT block. When the phase ends, the trained weights go to the store and the layer is quantized
  again for the forward passes of later phases.
- The export (:func:`write_hf_shards`) and checkpoints take quantized modules' weights from the
  store: trained layers exactly as trained, never-trained layers bit-identical to what the run
  started from.
- The approximation: a phase's forward and backward pass through quantized copies of the other
  layers (as QLoRA trains against a quantized base).

Quantized weights are buffers, not parameters: DeepSpeed (ZeRO-1/2) neither broadcasts, casts nor
partitions them; every rank holds them whole. ZeRO-3 and FSDP2, which shard the layers, are refused
by the configuration check (:func:`lift_ds.run_config.frozen_weights_problems`).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError
from .utils import get_logger

logger = get_logger(__name__)

MODES = ("int8", "nf4")
#: aten's linear (``torch.nn.functional.linear`` unless something replaced it)
_LINEAR = torch._C._nn.linear
NF4_BLOCK = 64
NF4_SCALER_BLOCK = 256
STORE_FILE = "block_store.safetensors"


# --------------------------------------------------------------------------- quantized tensors


def nf4_scaler_block(numel: int) -> int:
    """NF4's scaler block: 256 (torchtune's and QLoRA's), or the largest divisor of the number of
    scalers below it for a weight too small for 256 (tiny test models)."""
    scalers = numel // NF4_BLOCK
    return max(d for d in range(1, NF4_SCALER_BLOCK + 1) if scalers % d == 0)


def quantize_weight(weight: torch.Tensor, mode: str) -> torch.Tensor:
    """A torchao quantized copy of a linear weight (same shape and dtype as seen by ``F.linear``)."""
    w = weight.detach()
    if mode == "nf4":
        from torchao.quantization import NF4Tensor

        return NF4Tensor.from_tensor(w.contiguous(), NF4_BLOCK, nf4_scaler_block(w.numel()))
    if mode == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        holder = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        holder.weight = nn.Parameter(w, requires_grad=False)
        quantize_(holder, Int8WeightOnlyConfig())
        return holder.weight.detach()
    raise ValueError(f"frozen_weights mode {mode!r}; allowed: {', '.join(MODES)}")


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds, counting a quantized tensor's inner tensors (data, scales, ...)."""
    if type(t) is not torch.Tensor and type(t) is not nn.Parameter and hasattr(t, "__tensor_flatten__"):
        return sum(tensor_bytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


class QuantizedFrozenLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is a quantized buffer (the bias stays a frozen parameter)."""

    def __init__(self, qweight: torch.Tensor, bias: nn.Parameter | None, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", qweight, persistent=False)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the C function behind F.linear: a ZeRO-3 engine leaves torch.nn.functional.linear replaced by
        # DeepSpeed's own, which quantized weights do not survive; torchao's tensors still dispatch here
        return _LINEAR(x, self.qweight, self.bias)

    def _apply(self, fn: Any, recurse: bool = True) -> "QuantizedFrozenLinear":
        # ``model.to(dtype=...)`` must not turn the quantized weight into a dense one (torchao's NF4
        # ``.to(dtype)`` dequantizes): it follows device moves only, and keeps its own dtype
        q = self._buffers.pop("qweight")
        try:
            super()._apply(fn, recurse)
            target = fn(torch.zeros(1, device=q.device)).device
            self._buffers["qweight"] = q if target == q.device else q.to(target)
        except BaseException:
            self._buffers.setdefault("qweight", q)
            raise
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qweight={type(self.qweight).__name__}"


# --------------------------------------------------------------------------- the block store


class BlockStore:
    """The exact weights of quantized modules, one entry per layer, off the accelerator.

    Args:
        kind: ``memory`` (CPU tensors) or ``disk`` (``<directory>/<layer>.safetensors``, read when
            a layer becomes active; for models larger than host memory).
        directory: where a disk store writes (a fresh temporary directory, removed by
            :meth:`close`, when None).
    """

    def __init__(self, kind: str = "memory", directory: str | Path | None = None) -> None:
        if kind not in ("memory", "disk"):
            raise ValueError(f"block store kind {kind!r}; allowed: memory, disk")
        self.kind = kind
        self._blocks: dict[str, dict[str, torch.Tensor]] = {}
        self._names: dict[str, list[str]] = {}
        self._own_dir = kind == "disk" and directory is None
        self.directory = Path(tempfile.mkdtemp(prefix="lift_ds_block_store_")) if self._own_dir else (Path(directory) if directory else None)
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    def _file(self, block: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{block}.safetensors"

    def put(self, block: str, tensors: dict[str, torch.Tensor]) -> None:
        """Store a layer's weights (copied to CPU; a disk store writes them atomically)."""
        values = {n: t.detach().to("cpu", copy=True).contiguous() for n, t in tensors.items()}
        self._names[block] = list(values)
        if self.kind == "memory":
            self._blocks[block] = values
            return
        from safetensors.torch import save_file

        tmp = self._file(block).with_suffix(".partial")
        save_file(values, str(tmp))
        tmp.replace(self._file(block))

    def get(self, block: str) -> dict[str, torch.Tensor]:
        """A layer's stored weights (CPU tensors)."""
        if self.kind == "memory":
            return self._blocks[block]
        from safetensors.torch import load_file

        return load_file(str(self._file(block)))

    def blocks(self) -> list[str]:
        return list(self._names)

    def names(self, block: str) -> list[str]:
        return list(self._names.get(block, []))

    def close(self) -> None:
        self._blocks.clear()
        if self._own_dir and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


# --------------------------------------------------------------------------- the layers


class QuantizedFrozenBlocks:
    """Keeps every decoder layer but the active one quantized, with its exact weights in the store.

    Args:
        model: the model, on its device and in its training dtype.
        layer_blocks: ``(layer name, its parameter names)`` of every decoder layer.
        mode: ``int8`` or ``nf4``.
        store: where the exact weights live.
        keep: parameter names never quantized (``always_trainable``).
        dtype: the training dtype the store keeps (bf16 / fp16 runs; None: the weights' own).

    Raises:
        ConfigError: a weight NF4 cannot hold (its size is not a multiple of 64).
    """

    def __init__(self, model: nn.Module, layer_blocks: list[tuple[str, tuple[str, ...]]], mode: str, store: BlockStore,
                 keep: set[str] = frozenset(), dtype: torch.dtype | None = None) -> None:  # type: ignore[assignment]
        self.model, self.mode, self.store, self.dtype = model, mode, store, dtype
        modules = dict(model.named_modules())
        self.linears: dict[str, list[str]] = {}
        problems = []
        for block, param_names in layer_blocks:
            paths = [n for n, m in modules.items() if n.startswith(block + ".") and isinstance(m, (nn.Linear, QuantizedFrozenLinear))
                     and f"{n}.weight" not in keep and f"{n}.weight" in param_names]
            for p in paths:
                m = modules[p]
                if mode == "nf4" and isinstance(m, nn.Linear) and m.weight.numel() % NF4_BLOCK:
                    problems.append(f"lift.frozen_weights: nf4 needs weights whose size is a multiple of {NF4_BLOCK}; {p}.weight has "
                                    f"shape {list(m.weight.shape)}. Use \"int8\" or \"full\"")
            self.linears[block] = paths
        if problems:
            raise ConfigError(problems[:5], source="model")
        for block in self.linears:
            self.deactivate(block)

    def _swap(self, path: str, new: nn.Module) -> None:
        parent, _, attr = path.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, attr, new)

    def is_quantized(self, block: str) -> bool:
        return any(isinstance(self.model.get_submodule(p), QuantizedFrozenLinear) for p in self.linears.get(block, []))

    def quantized_names(self) -> list[str]:
        """Weight names held quantized now (their exact values are in the store)."""
        return [f"{p}.weight" for block, paths in self.linears.items() for p in paths
                if isinstance(self.model.get_submodule(p), QuantizedFrozenLinear)]

    @torch.no_grad()
    def deactivate(self, block: str) -> None:
        """Store a layer's (trained) weights and quantize it; a no-op for a quantized layer."""
        paths = [p for p in self.linears.get(block, []) if isinstance(self.model.get_submodule(p), nn.Linear)]
        if not paths:
            return
        mods = {p: self.model.get_submodule(p) for p in paths}
        weights = {p: m.weight.detach() if self.dtype is None else m.weight.detach().to(self.dtype) for p, m in mods.items()}
        self.store.put(block, {f"{p}.weight": w for p, w in weights.items()})
        for p, m in mods.items():
            bias = m.bias
            if bias is not None:
                bias.requires_grad_(False)
            self._swap(p, QuantizedFrozenLinear(quantize_weight(weights[p], self.mode), bias, m.in_features, m.out_features))

    @torch.no_grad()
    def activate(self, block: str) -> None:
        """Bring a layer's ``nn.Linear`` modules back with their exact weights from the store."""
        paths = [p for p in self.linears.get(block, []) if isinstance(self.model.get_submodule(p), QuantizedFrozenLinear)]
        if not paths:
            return
        stored = self.store.get(block)
        for p in paths:
            q = self.model.get_submodule(p)
            weight = stored[f"{p}.weight"].to(device=q.qweight.device)  # the store's dtype: the training dtype
            lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
            lin.weight = nn.Parameter(weight, requires_grad=False)
            lin.bias = q.bias
            self._swap(p, lin)

    def exact_weights(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """The store's values of quantized weights (all, or those in ``names``)."""
        wanted = None if names is None else set(names)
        out: dict[str, torch.Tensor] = {}
        quantized = set(self.quantized_names())
        for block in self.linears:
            keys = [n for n in self.store.names(block) if n in quantized and (wanted is None or n in wanted)]
            if keys:
                values = self.store.get(block)
                out.update({n: values[n] for n in keys})
        return out

    def bytes(self) -> dict[str, int]:
        """Live bytes of the quantized weights and of the same weights in bf16 (the census)."""
        quantized = bf16 = 0
        for block, paths in self.linears.items():
            for p in paths:
                m = self.model.get_submodule(p)
                if isinstance(m, QuantizedFrozenLinear):
                    quantized += tensor_bytes(m.qweight)
                    bf16 += 2 * m.in_features * m.out_features
        return {"quantized_bytes": quantized, "bf16_bytes": bf16}

    # ----------------------------------------------------------------- checkpoints

    def save(self, directory: Path, names: list[str]) -> None:
        """Write the store's values of the quantized weights among ``names`` (rank 0 calls it)."""
        from safetensors.torch import save_file

        values = self.exact_weights(names)
        save_file({n: t.contiguous() for n, t in values.items()}, str(directory / STORE_FILE))

    @torch.no_grad()
    def load(self, directory: Path, weights_file: Path) -> set[str]:
        """Put saved exact weights of quantized layers into the store and quantize them again: the
        store file, and any entries of the weights file for modules quantized now. Returns the
        names taken from the weights file (the backend loads the rest)."""
        from safetensors import safe_open

        quantized = set(self.quantized_names())
        values: dict[str, torch.Tensor] = {}
        taken: set[str] = set()
        for f, from_weights in ((directory / STORE_FILE, False), (weights_file, True)):
            if not f.is_file():
                continue
            with safe_open(str(f), framework="pt") as fh:
                for n in fh.keys():
                    if n in quantized:
                        values[n] = fh.get_tensor(n)
                        taken.add(n) if from_weights else None
        for block, paths in self.linears.items():
            mine = {f"{p}.weight" for p in paths} & set(values)
            if not mine:
                continue
            current = self.store.get(block)
            updated = {n: values.get(n, current[n]) for n in current}
            self.store.put(block, updated)
            for p in paths:
                q = self.model.get_submodule(p)
                if f"{p}.weight" in mine:
                    q.qweight = quantize_weight(updated[f"{p}.weight"].to(device=q.qweight.device), self.mode)
        return taken

    def close(self) -> None:
        self.store.close()


def make_store(kind: str, directory: str | None) -> BlockStore:
    """The run's block store; a disk store under several ranks gets a directory per rank (``rank<r>``)."""
    import os

    if directory is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        directory = str(Path(directory) / f"rank{os.environ.get('RANK', '0')}")
    return BlockStore(kind, directory)


def store_dtype(precision: str) -> torch.dtype | None:
    """The dtype a block store keeps for a run in ``precision`` (its training dtype; None: fp32, as the model)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def build_quantized_blocks(model: nn.Module, plan: Any, mode: str, store_kind: str, store_dir: str | None,
                           precision: str = "fp32") -> QuantizedFrozenBlocks:
    """The :class:`QuantizedFrozenBlocks` of a run: every decoder layer of ``plan.blocks``; the store
    keeps the training dtype (bf16 / fp16 runs train 16-bit weights with fp32 masters)."""
    dtype = store_dtype(precision)
    layers = [(b.name, b.param_names) for b in plan.blocks if b.kind == "layer"]
    keep = set(plan.always_trainable)
    store = getattr(model, "lift_block_store", None)  # a model built layer by layer (lift_ds.quant_load) brings its store
    if store is not None and getattr(model, "lift_frozen_weights", mode) != mode:
        raise ConfigError([f"lift.frozen_weights: {mode!r}, but the model was built with {model.lift_frozen_weights!r} layers; "
                           "build it with the same mode"], source="model")
    return QuantizedFrozenBlocks(model, layers, mode, store or make_store(store_kind, store_dir), keep, dtype)


# --------------------------------------------------------------------------- export


def write_hf_shards(out: Path, live: dict[str, torch.Tensor], quant: QuantizedFrozenBlocks) -> None:
    """Write a sharded Hugging Face safetensors checkpoint: the live parameters in one shard, each
    quantized layer's exact weights (from the store) in its own, and the index. Peak memory: one
    layer's weights (a disk store is read layer by layer)."""
    from safetensors.torch import save_file

    blocks = [b for b in quant.linears if quant.is_quantized(b)]
    total = 1 + len(blocks)
    index: dict[str, str] = {}
    size = 0

    def shard(k: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal size
        name = f"model-{k:05d}-of-{total:05d}.safetensors"
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(out / name), metadata={"format": "pt"})
        index.update({n: name for n in tensors})
        size += sum(t.numel() * t.element_size() for t in tensors.values())

    quantized = set(quant.quantized_names())
    shard(1, {n: t for n, t in live.items() if n not in quantized})
    for k, block in enumerate(blocks, start=2):
        values = quant.store.get(block)
        shard(k, {n: values[n] for n in quant.store.names(block) if n in quantized})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": index}, indent=1))
    for stale in out.glob("model.safetensors"):
        stale.unlink()
    logger.info("wrote %d shards (%d tensors, %.1f MiB) to %s", total, len(index), size / 2**20, out)


def bytes_ratio(counts: dict[str, int]) -> float:
    return counts["quantized_bytes"] / max(1, counts["bf16_bytes"]) if counts["bf16_bytes"] else math.nan
