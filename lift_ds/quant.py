"""Q-LIFT: frozen decoder layers held quantized (int8 / NF4) or streamed, the exact weights in a block store.

``lift.frozen_weights: "int8" | "nf4"`` replaces every ``nn.Linear`` inside a decoder layer that is
not training now (attention and MLP projections) by a :class:`QuantizedFrozenLinear` whose weight is
a torchao tensor (``Int8Tensor``: int8 per output row; ``NF4Tensor``: 4-bit NormalFloat in blocks of
64 with double-quantized scalers, QLoRA's format). Embedding, norms, biases and the head are not
quantized (torchao's NF4 has no embedding lookup, and many heads are tied to the embedding).
``lift.stream_frozen`` replaces them by :class:`lift_ds.stream.StreamedFrozenLinear` instead: the
(quantized, or with ``frozen_weights: full`` plain) weight lives in a file per layer and is read
when the pass reaches it (:mod:`lift_ds.stream`).

The semantics:

- The exact weights of every frozen module live in a :class:`~lift_ds.store.BlockStore` (host
  memory, or one safetensors file per layer on local disk; backed by the checkpoint or the seeded
  init a model was built from, :mod:`lift_ds.store`), in the model's training dtype.
- When a layer becomes active its ``nn.Linear`` modules come back with weights read from the store,
  never dequantized from the quantized copy; they train with fp32 master and optimizer state as any
  LIFT block. When the phase ends, the trained weights go to the store and the layer is quantized
  (and written to its stream file) again for the forward passes of later phases.
- The export (:func:`write_hf_shards`) and checkpoints take frozen modules' weights from the
  store: trained layers exactly as trained, never-trained layers bit-identical to what the run
  started from.
- The approximation: a phase's forward and backward pass through quantized copies of the other
  layers (as QLoRA trains against a quantized base). The arithmetic is torchao's, computed by
  :mod:`lift_ds.qkernels` a chunk at a time (no full-size temporary, no weight kept for backward).

Quantized weights are buffers, not parameters: DeepSpeed (ZeRO-1/2) neither broadcasts, casts nor
partitions them; every rank holds them whole. ZeRO-3 and FSDP2, which shard the layers, are refused
by the configuration check (each backend's ``check_config``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .qkernels import NF4_BLOCK, frozen_linear, quantize_weight
from .store import BlockStore
from .stream import LayerStreamer, StreamedFrozenLinear
from .utils import get_logger, get_rank, get_world_size

logger = get_logger(__name__)

MODES = ("int8", "nf4")
STORE_FILE = "block_store.safetensors"


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds, counting a quantized tensor's inner tensors (data, scales, ...)."""
    if type(t) is not torch.Tensor and type(t) is not nn.Parameter and hasattr(t, "__tensor_flatten__"):
        return sum(
            tensor_bytes(getattr(t, name)) for name in t.__tensor_flatten__()[0] if getattr(t, name, None) is not None
        )
    return t.numel() * t.element_size()


class DenseCache:
    """Dense copies of quantized frozen weights, within a byte budget (``lift.frozen_cache_mb``).

    A quantized layer costs a dequantization in every forward, and another in the backward when the
    pass goes through it to the active layer below. Its weight does not change while it is frozen, so a
    dense copy (exactly :func:`~lift_ds.qkernels.dequantize` of it: the values the chunked kernel
    computes with) saves both, for the memory of the weight in its training dtype. Copies are made on
    first use while the budget allows; a layer the backward passes through (``grad``) may take the
    place of one it does not. A layer that becomes active drops its copies (its modules are replaced),
    and a phase switch clears the marks, which the next passes set again.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget = int(budget_bytes)
        self.used = 0
        self._held: dict[int, tuple[QuantizedFrozenLinear, bool]] = {}
        self.stats = {"copies": 0, "evictions": 0}

    def weight(self, m: QuantizedFrozenLinear, grad: bool) -> torch.Tensor:
        """``m``'s dense copy (made now if the budget allows), or its quantized weight."""
        dense = m._dense
        if dense is not None:
            if grad and not self._held[id(m)][1]:
                self._held[id(m)] = (m, True)
            return dense
        q = m.qweight
        size = q.numel() * q.dtype.itemsize
        if not self._room(size, grad):
            return q
        from .qkernels import dequantize

        with torch.no_grad():
            m._dense = dequantize(q)
        self.used += size
        self._held[id(m)] = (m, grad)
        self.stats["copies"] += 1
        return m._dense

    def _room(self, size: int, grad: bool) -> bool:
        if self.used + size <= self.budget:
            return True
        if not grad:
            return False
        spare = [m for m, g in self._held.values() if not g]
        if self.used - sum(tensor_bytes(m._dense) for m in spare) + size > self.budget:
            return False
        while self.used + size > self.budget:
            self.drop(spare.pop())
            self.stats["evictions"] += 1
        return True

    def drop(self, m: nn.Module) -> None:
        """Forget ``m``'s copy (its layer became active, or it moved device)."""
        if self._held.pop(id(m), None) is not None and m._dense is not None:
            self.used -= tensor_bytes(m._dense)
            m._dense = None

    def new_phase(self) -> None:
        """The active layer changed: which layers the backward passes through is learnt again."""
        self._held = {k: (m, False) for k, (m, _) in self._held.items()}

    def clear(self) -> None:
        for m, _ in list(self._held.values()):
            self.drop(m)


class QuantizedFrozenLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is a quantized buffer (the bias stays a frozen parameter);
    with a :class:`DenseCache`, it computes with the cache's dense copy when there is one."""

    def __init__(
        self,
        qweight: torch.Tensor,
        bias: nn.Parameter | None,
        in_features: int,
        out_features: int,
        cache: DenseCache | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", qweight, persistent=False)
        self.bias = bias
        self._cache = cache
        self._dense: torch.Tensor | None = None
        self._grad = False

    def frozen_weight(self) -> torch.Tensor:
        if self._cache is None:
            return self.qweight
        return self._cache.weight(self, self._grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # lift_ds.qkernels: chunked dequantize-matmul; autograd keeps no dequantized copy for backward
        self._grad = torch.is_grad_enabled() and x.requires_grad
        return frozen_linear(x, self, self.bias)

    def _apply(self, fn: Any, recurse: bool = True) -> QuantizedFrozenLinear:
        # ``model.to(dtype=...)`` must not turn the quantized weight into a dense one (torchao's NF4
        # ``.to(dtype)`` dequantizes): it follows device moves only, and keeps its own dtype
        if self._cache is not None:
            self._cache.drop(self)
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
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, qweight={type(self.qweight).__name__}"
        )


FROZEN_MODULES = (QuantizedFrozenLinear, StreamedFrozenLinear)


def frozen_module(
    weight: torch.Tensor,
    linear: nn.Module,
    mode: str,
    streamer: LayerStreamer | None,
    block: str,
    path: str,
    cache: DenseCache | None = None,
) -> nn.Module:
    """The frozen replacement of ``linear``: quantized in place (its dense copies in ``cache``), or
    (``streamer``) streamed from its file (the caller writes the file); ``weight`` is its quantized
    (or, ``full``, plain) weight."""
    bias = linear.bias
    if bias is not None:
        bias.requires_grad_(False)
    if streamer is not None:
        return StreamedFrozenLinear(streamer, block, path, bias, linear.in_features, linear.out_features, mode)
    return QuantizedFrozenLinear(weight, bias, linear.in_features, linear.out_features, cache)


# --------------------------------------------------------------------------- the layers


class QuantizedFrozenBlocks:
    """Keeps every decoder layer but the active one frozen outside the parameters: quantized in place,
    or (with a streamer) streamed from a file per layer, with its exact weights in the store.

    Args:
        model: the model, on its device and in its training dtype.
        layer_blocks: ``(layer name, its parameter names)`` of every decoder layer.
        mode: ``int8`` or ``nf4``; ``full`` (only with a streamer): streamed in the training dtype.
        store: where the exact weights live.
        keep: parameter names never quantized (``always_trainable``).
        dtype: the training dtype the store keeps (bf16 / fp16 runs; None: the weights' own).
        streamer: stream the frozen layers (``lift.stream_frozen``, :mod:`lift_ds.stream`).
        cache_bytes: the budget of dense copies of quantized weights (``lift.frozen_cache_mb``; not streamed).

    Raises:
        ConfigError: a weight NF4 cannot hold (its size is not a multiple of 64).
    """

    def __init__(
        self,
        model: nn.Module,
        layer_blocks: list[tuple[str, tuple[str, ...]]],
        mode: str,
        store: BlockStore,
        keep: set[str] = frozenset(),
        dtype: torch.dtype | None = None,  # type: ignore[assignment]
        streamer: LayerStreamer | None = None,
        cache_bytes: int = 0,
    ) -> None:
        if mode == "full" and streamer is None:
            raise ValueError("mode 'full' keeps layers frozen outside the parameters only when they are streamed")
        if cache_bytes and streamer is not None:
            raise ValueError("a dense cache of streamed layers would keep them in memory; use one or the other")
        self.model, self.mode, self.store, self.dtype, self.streamer = model, mode, store, dtype, streamer
        self.cache = DenseCache(cache_bytes) if cache_bytes else None
        modules = dict(model.named_modules())
        self.linears: dict[str, list[str]] = {}
        problems = []
        for block, param_names in layer_blocks:
            paths = [
                n
                for n, m in modules.items()
                if n.startswith(block + ".")
                and isinstance(m, (nn.Linear, *FROZEN_MODULES))
                and f"{n}.weight" not in keep
                and f"{n}.weight" in param_names
            ]
            for p in paths:
                m = modules[p]
                if mode == "nf4" and isinstance(m, nn.Linear) and m.weight.numel() % NF4_BLOCK:
                    problems.append(
                        "lift.frozen_weights: nf4 needs weights whose "
                        f"size is a multiple of {NF4_BLOCK}; {p}.weight has "
                        f'shape {list(m.weight.shape)}. Use "int8" or "full"'
                    )
            self.linears[block] = paths
        if problems:
            raise ConfigError(problems[:5], source="model")
        for block in self.linears:
            self.deactivate(block)

    def _swap(self, path: str, new: nn.Module) -> None:
        parent, _, attr = path.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, attr, new)

    def _frozen(self, block: str) -> list[str]:
        return [p for p in self.linears.get(block, []) if isinstance(self.model.get_submodule(p), FROZEN_MODULES)]

    def is_quantized(self, block: str) -> bool:
        """The layer is frozen outside the parameters (quantized or streamed): its exact weights are in the store."""
        return bool(self._frozen(block))

    def quantized_names(self) -> list[str]:
        """Weight names held frozen outside the parameters now (their exact values are in the store)."""
        return [f"{p}.weight" for block in self.linears for p in self._frozen(block)]

    def _freeze(self, block: str, weights: dict[str, torch.Tensor], mods: dict[str, nn.Module]) -> None:
        """Quantize a layer's exact weights and swap its linears for frozen modules (streamed: written to its file)."""
        frozen = {p: quantize_weight(w, self.mode) for p, w in weights.items()}
        if self.streamer is not None:
            self.streamer.write(block, frozen)
        for p, m in mods.items():
            if self.cache is not None:
                self.cache.drop(m)  # a frozen layer frozen again (a checkpoint's weights loaded)
            self._swap(p, frozen_module(frozen[p], m, self.mode, self.streamer, block, p, self.cache))
        if self.cache is not None:
            self.cache.new_phase()

    @torch.no_grad()
    def deactivate(self, block: str) -> None:
        """Store a layer's (trained) weights and freeze it; a no-op for a frozen layer."""
        paths = [p for p in self.linears.get(block, []) if isinstance(self.model.get_submodule(p), nn.Linear)]
        if not paths:
            return
        mods = {p: self.model.get_submodule(p) for p in paths}
        weights = {
            p: m.weight.detach() if self.dtype is None else m.weight.detach().to(self.dtype) for p, m in mods.items()
        }
        self.store.put(block, {f"{p}.weight": w for p, w in weights.items()})
        self._freeze(block, weights, mods)

    def _device(self, q: nn.Module) -> torch.device:
        if isinstance(q, QuantizedFrozenLinear):
            return q.qweight.device
        return self.streamer.device if self.streamer is not None else torch.device("cpu")

    @torch.no_grad()
    def activate(self, block: str) -> None:
        """Bring a layer's ``nn.Linear`` modules back with their exact weights from the store."""
        paths = self._frozen(block)
        if not paths:
            return
        stored = self.store.get(block)
        for p in paths:
            q = self.model.get_submodule(p)
            if self.cache is not None:
                self.cache.drop(q)
            weight = stored[f"{p}.weight"].to(device=self._device(q))  # the store's dtype: the training dtype
            lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
            lin.weight = nn.Parameter(weight, requires_grad=False)
            lin.bias = q.bias
            self._swap(p, lin)
        if self.streamer is not None:
            self.streamer.forget(block)

    def exact_weights(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """The store's values of frozen weights (all, or those in ``names``)."""
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
        """Live bytes of the frozen weights held in memory (quantized; streamed: the layers read now),
        the same weights in bf16, and the streamed layers' files (the census)."""
        quantized = bf16 = 0
        for block in self.linears:
            for p in self._frozen(block):
                m = self.model.get_submodule(p)
                bf16 += 2 * m.in_features * m.out_features
                if isinstance(m, QuantizedFrozenLinear):
                    quantized += tensor_bytes(m.qweight)
        out = {"quantized_bytes": quantized, "bf16_bytes": bf16}
        if self.cache is not None:
            out["dense_cache_bytes"] = self.cache.used
        if self.streamer is not None:
            out["streamed_file_bytes"] = self.streamer.file_bytes()
        return out

    # ----------------------------------------------------------------- checkpoints

    def save(self, directory: Path, names: list[str]) -> None:
        """Write the store's values of the frozen weights among ``names`` (rank 0 calls it)."""
        from .tensorfile import write_file

        write_file(directory / STORE_FILE, self.exact_weights(names))

    @torch.no_grad()
    def load(self, directory: Path, weights_file: Path) -> set[str]:
        """Put saved exact weights of frozen layers into the store and freeze them again: the store
        file, and any entries of the weights file for modules frozen now. Returns the names taken
        from the weights file (the backend loads the rest)."""
        from .tensorfile import TensorFile

        quantized = set(self.quantized_names())
        values: dict[str, torch.Tensor] = {}
        taken: set[str] = set()
        for f, from_weights in ((directory / STORE_FILE, False), (weights_file, True)):
            if not f.is_file():
                continue
            with TensorFile(f) as fh:
                for n in fh.keys():
                    if n in quantized:
                        values[n] = fh.get(n)
                        taken.add(n) if from_weights else None
        for block, paths in self.linears.items():
            mine = {f"{p}.weight" for p in paths} & set(values)
            if not mine:
                continue
            current = self.store.get(block)
            updated = {n: values.get(n, current[n]) for n in current}
            self.store.put(block, updated)
            weights = {p: updated[f"{p}.weight"].to(self._device(self.model.get_submodule(p))) for p in paths}
            self._freeze(block, weights, {p: self.model.get_submodule(p) for p in paths})
        return taken

    def around_optimizer_step(self, before: bool) -> None:
        """Streamed layers: none in memory during an optimizer step (``before``), the first ones read
        ahead for the next forward after it."""
        if self.streamer is not None:
            self.streamer.release() if before else self.streamer.prefetch_first()

    def close(self) -> None:
        if self.cache is not None:
            self.cache.clear()
        self.store.close()
        if self.streamer is not None:
            self.streamer.close()


def make_store(kind: str, directory: str | None, origin: Any = None) -> BlockStore:
    """The run's block store; a disk store under several ranks gets a directory per rank (``rank<r>``)."""
    return BlockStore(kind, rank_dir(directory), origin)


def rank_dir(directory: str | None, sub: str | None = None) -> str | None:
    """``directory`` (``/<sub>``), per rank (``/rank<r>``) under several ranks; None stays None."""
    if directory is None:
        return None
    d = Path(directory) / sub if sub else Path(directory)
    if get_world_size() > 1:
        d = d / f"rank{get_rank()}"
    return str(d)


def make_streamer(store_dir: str | None) -> LayerStreamer:
    """The run's layer streamer: its files in ``<block_store_dir>/stream`` (per rank), or a temporary directory."""
    return LayerStreamer(rank_dir(store_dir, "stream"))


def store_dtype(precision: str) -> torch.dtype | None:
    """The dtype a block store keeps for a run in ``precision`` (its training dtype; None: fp32, as the model)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def build_quantized_blocks(
    model: nn.Module,
    plan: Any,
    mode: str,
    store_kind: str,
    store_dir: str | None,
    precision: str = "fp32",
    stream: bool = False,
    cache_mb: int = 0,
) -> QuantizedFrozenBlocks:
    """The :class:`QuantizedFrozenBlocks` of a run: every decoder layer of ``plan.blocks``; the store
    keeps the training dtype (bf16 / fp16 runs train 16-bit weights with fp32 masters). A model built
    layer by layer (:mod:`lift_ds.quant_load`) brings its store (and streamer)."""
    dtype = store_dtype(precision)
    layers = [(b.name, b.param_names) for b in plan.blocks if b.kind == "layer"]
    keep = set(plan.always_trainable)
    store = getattr(model, "lift_block_store", None)
    streamer = getattr(model, "lift_streamer", None)
    problems = []
    if store is not None and getattr(model, "lift_frozen_weights", mode) != mode:
        problems.append(
            f"lift.frozen_weights: {mode!r}, but the model was built with {model.lift_frozen_weights!r} layers; "
            "build it with the same mode"
        )
    if store is not None and (streamer is not None) != stream:
        problems.append(
            f"lift.stream_frozen: {str(stream).lower()}, "
            f"but the model was built with{'out' if streamer is None else ''} "
            "streamed layers; build it with the same setting"
        )
    if problems:
        raise ConfigError(problems, source="model")
    if stream and streamer is None:
        streamer = make_streamer(store_dir)
        streamer.device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return QuantizedFrozenBlocks(
        model, layers, mode, store or make_store(store_kind, store_dir), keep, dtype, streamer, cache_mb << 20
    )


# --------------------------------------------------------------------------- export


def write_hf_shards(out: Path, live: dict[str, torch.Tensor], quant: QuantizedFrozenBlocks) -> None:
    """Write a sharded Hugging Face safetensors checkpoint: the live parameters in one shard, each
    quantized layer's exact weights (from the store) in its own, and the index. Peak memory: one
    layer's weights (a disk store is read layer by layer)."""
    from .tensorfile import write_file

    blocks = [b for b in quant.linears if quant.is_quantized(b)]
    total = 1 + len(blocks)
    index: dict[str, str] = {}
    size = 0

    def shard(k: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal size
        name = f"model-{k:05d}-of-{total:05d}.safetensors"
        write_file(out / name, tensors, metadata={"format": "pt"})
        index.update({n: name for n in tensors})
        size += sum(t.numel() * t.element_size() for t in tensors.values())

    quantized = set(quant.quantized_names())
    shard(1, {n: t for n, t in live.items() if n not in quantized})
    for k, block in enumerate(blocks, start=2):
        values = quant.store.get(block)
        shard(k, {n: values[n] for n in quant.store.names(block) if n in quantized})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": size}, "weight_map": index}, indent=1)
    )
    for stale in out.glob("model.safetensors"):
        stale.unlink()
    logger.info("wrote %d shards (%d tensors, %.1f MiB) to %s", total, len(index), size / 2**20, out)


def bytes_ratio(counts: dict[str, int]) -> float:
    return counts["quantized_bytes"] / max(1, counts["bf16_bytes"]) if counts["bf16_bytes"] else math.nan
