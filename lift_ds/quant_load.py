"""Build a Q-LIFT model layer by layer: never the whole model in full precision in host memory.

:func:`build_quantized_model` makes the model's skeleton without weights (accelerate's
``init_empty_weights``), then for each decoder layer in turn: allocates it, fills it (from the
checkpoint's safetensors shards, tensor by tensor, or with the model's own random init), writes its
linear weights to the block store and replaces them by quantized copies. Peak host memory while
loading: the quantized layers so far, the non-layer parameters, and one layer in full precision
(with a disk store, the store is on disk). The result is what :class:`lift_ds.quant.QuantizedFrozenBlocks`
expects: it adopts the store (``model.lift_block_store``) instead of quantizing again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .blocks import find_layer_stack
from .quant import QuantizedFrozenLinear, BlockStore, quantize_weight
from .utils import get_logger

logger = get_logger(__name__)


class SafetensorsReader:
    """Tensors of a Hugging Face checkpoint directory by name (single file or sharded with an index)."""

    def __init__(self, model_dir: str | Path) -> None:
        d = Path(model_dir)
        index = d / "model.safetensors.index.json"
        if index.is_file():
            self.where = {n: d / f for n, f in json.loads(index.read_text())["weight_map"].items()}
        elif (d / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(d / "model.safetensors"), framework="pt") as f:
                self.where = {n: d / "model.safetensors" for n in f.keys()}
        else:
            raise FileNotFoundError(f"{d}: no model.safetensors or model.safetensors.index.json (Q-LIFT loads safetensors layer by layer)")
        self._open: dict[Path, Any] = {}

    def get(self, name: str) -> torch.Tensor | None:
        path = self.where.get(name)
        if path is None:
            return None
        if path not in self._open:
            from safetensors import safe_open

            self._open[path] = safe_open(str(path), framework="pt")
        return self._open[path].get_tensor(name)


def _fill(model: nn.Module, module: nn.Module, prefix: str, reader: SafetensorsReader | None, dtype: torch.dtype, recurse: bool) -> None:
    """Allocate ``module``'s meta parameters on CPU and fill them: from the checkpoint, or (random
    init, or a parameter the checkpoint lacks, e.g. a new classification head) by the model's init."""
    module.to_empty(device="cpu", recurse=recurse)
    missing = []
    with torch.no_grad():
        for name, p in module.named_parameters(recurse=recurse):
            value = reader.get(prefix + name) if reader is not None else None
            if value is None:
                missing.append(name)
            else:
                p.copy_(value.to(dtype))
    if missing:
        for sub in (module.modules() if recurse else [module]):
            model._init_weights(sub)  # Hugging Face's per-module init (normal(0, initializer_range), ones for norms, ...)
        if reader is not None:  # only the missing ones keep the init; the rest are read again
            with torch.no_grad():
                for name, p in module.named_parameters(recurse=recurse):
                    if name not in missing:
                        p.copy_(reader.get(prefix + name).to(dtype))


def build_quantized_model(model_dir: str, mode: str, store: BlockStore, *, random_init: bool = False, seed: int = 0,
                          dtype: torch.dtype = torch.float32, num_labels: int | None = None, pad_id: int | None = None,
                          config: Any = None) -> nn.Module:
    """A model whose decoder layers' linear weights are quantized (``mode``), their exact weights in ``store``.

    Args:
        model_dir: a Hugging Face directory (its config, and its safetensors unless ``random_init``).
        mode: ``int8`` or ``nf4``.
        store: the block store to fill (a disk store keeps host memory at a few layers).
        random_init: the model's own random init, layer by layer, instead of the checkpoint.
        seed: seeds the random init.
        dtype: the training dtype (the store holds this).
        num_labels, pad_id: a sequence-classification model with a new head.
        config: a ``transformers`` config to use instead of ``model_dir``'s.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = config if config is not None else AutoConfig.from_pretrained(model_dir)
    cls = AutoModelForCausalLM
    if num_labels is not None:
        cls = AutoModelForSequenceClassification
        cfg.num_labels, cfg.pad_token_id = num_labels, pad_id
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(cfg, dtype=dtype)
    torch.manual_seed(seed)
    reader = None if random_init else SafetensorsReader(model_dir)
    stack_name, stack = find_layer_stack(model)
    for i, layer in enumerate(stack):
        block = f"{stack_name}.{i}"
        _fill(model, layer, block + ".", reader, dtype, recurse=True)
        linears = [(n, m) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
        store.put(block, {f"{block}.{n}.weight": m.weight for n, m in linears})
        for n, m in linears:
            parent, _, attr = n.rpartition(".")
            if m.bias is not None:
                m.bias.requires_grad_(False)
            q = QuantizedFrozenLinear(quantize_weight(m.weight, mode), m.bias, m.in_features, m.out_features)
            setattr(layer.get_submodule(parent) if parent else layer, attr, q)
        logger.debug("layer %d of %d quantized", i + 1, len(stack))
    for name, module in model.named_modules():
        if name == stack_name or name.startswith(stack_name + "."):
            continue
        if any(p.is_meta for p in module.parameters(recurse=False)):
            _fill(model, module, f"{name}." if name else "", reader, dtype, recurse=False)
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"parameters left without values after the layer-by-layer build: {left[:5]}")
    model.config.use_cache = False
    model.lift_block_store = store
    model.lift_frozen_weights = mode
    logger.info("built %s layer by layer: %d layers in %s, exact weights in a %s block store", type(model).__name__, len(stack), mode, store.kind)
    return model
