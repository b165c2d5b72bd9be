"""Build a Q-LIFT model layer by layer: never the whole model in full precision in host memory.

:func:`build_quantized_model` makes the model's skeleton without weights (accelerate's
``init_empty_weights``), then for each decoder layer in turn: allocates it, fills it (from the
checkpoint's safetensors shards, tensor by tensor with ``pread``, or with the model's own random
init seeded per layer), quantizes its linear weights a chunk at a time (:mod:`lift_ds.qkernels`) and
replaces them by frozen modules: quantized in place, or (``streamer``) written to the layer's file
and streamed (:mod:`lift_ds.stream`). The block store is *backed by the model's origin*: a layer read
from the checkpoint, or drawn from its seed, is registered, not written; the store reads it again from
the shards, or draws it again, when it becomes active or is exported (:mod:`lift_ds.store`).

Peak host memory while loading: one layer in full precision, one chunk of quantization
temporaries, the non-layer parameters, and the quantized layers so far (none with a streamer). The
result is what :class:`lift_ds.quant.QuantizedFrozenBlocks` expects: it adopts the store
(``model.lift_block_store``) and streamer (``model.lift_streamer``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .blocks import find_layer_stack
from .qkernels import quantize_weight
from .quant import frozen_module
from .store import BlockStore, CheckpointOrigin, SafetensorsReader, SeedOrigin, describe, init_layer
from .stream import LayerStreamer
from .utils import get_logger

logger = get_logger(__name__)

__all__ = ["SafetensorsReader", "build_quantized_model"]


def _fill(
    model: nn.Module,
    module: nn.Module,
    prefix: str,
    reader: SafetensorsReader | None,
    dtype: torch.dtype,
    recurse: bool,
) -> list[str]:
    """Allocate ``module``'s meta parameters on CPU and fill them: from the checkpoint, or (random
    init, or a parameter the checkpoint lacks, e.g. a new classification head) by the model's init.
    Returns the names (relative to ``module``) that took the init."""
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
        for sub in module.modules() if recurse else [module]:
            # Hugging Face's per-module init (normal(0, initializer_range), ones for norms, ...)
            model._init_weights(sub)
        if reader is not None:  # only the missing ones keep the init; the rest are read again
            with torch.no_grad():
                for name, p in module.named_parameters(recurse=recurse):
                    if name not in missing:
                        p.copy_(reader.get(prefix + name).to(dtype))
    return missing


def build_quantized_model(
    model_dir: str,
    mode: str,
    store: BlockStore,
    *,
    random_init: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    num_labels: int | None = None,
    pad_id: int | None = None,
    config: Any = None,
    streamer: LayerStreamer | None = None,
    origin_backed: bool = True,
) -> nn.Module:
    """A model whose decoder layers' linear weights are frozen (``mode``), their exact weights in ``store``.

    Args:
        model_dir: a Hugging Face directory (its config, and its safetensors unless ``random_init``).
        mode: ``int8`` or ``nf4``; ``full`` with a ``streamer`` (layers streamed in ``dtype``).
        store: the block store (given an origin here unless it has one, see ``origin_backed``).
        random_init: the model's own random init, layer by layer (each layer seeded from ``seed``
            and its index, so that it can be drawn again), instead of the checkpoint.
        seed: seeds the random init.
        dtype: the training dtype (the store holds this).
        num_labels, pad_id: a sequence-classification model with a new head.
        config: a ``transformers`` config to use instead of ``model_dir``'s.
        streamer: stream the frozen layers from files it writes (``lift.stream_frozen``).
        origin_backed: register untouched layers with the store instead of writing them.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    if mode == "full" and streamer is None:
        raise ValueError(
            "build_quantized_model: mode 'full' needs a streamer (else build the model with from_pretrained)"
        )
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
    if origin_backed and store.origin is None:
        store.origin = (
            SeedOrigin(model, copy.deepcopy(stack[0]), seed, dtype, stack_name)
            if reader is None
            else CheckpointOrigin(reader, dtype)
        )
    for i, layer in enumerate(stack):
        block = f"{stack_name}.{i}"
        if reader is None:
            init_layer(model, layer, seed, i)
            missing = []
        else:
            missing = _fill(model, layer, block + ".", reader, dtype, recurse=True)
        linears = [(n, m) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
        exact = {f"{block}.{n}.weight": m.weight.detach() for n, m in linears}
        if origin_backed and not any(f"{n}.weight" in missing for n, _ in linears):
            store.register(block, list(exact))  # the origin gives them again; nothing written
        else:
            store.put(block, exact)
        frozen = {f"{block}.{n}": quantize_weight(m.weight, mode) for n, m in linears}
        if streamer is not None:
            streamer.write(block, frozen)
        for n, m in linears:
            parent, _, attr = n.rpartition(".")
            new = frozen_module(frozen[f"{block}.{n}"], m, mode, streamer, block, f"{block}.{n}")
            setattr(layer.get_submodule(parent) if parent else layer, attr, new)
        del frozen, exact
        logger.debug("layer %d of %d frozen (%s)", i + 1, len(stack), mode)
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
    model.lift_streamer = streamer
    logger.info(
        "built %s layer by layer: %d layers in %s%s, exact weights in a %s block store",
        type(model).__name__,
        len(stack),
        mode,
        " (streamed)" if streamer is not None else "",
        describe(store),
    )
    return model
