"""Find the candidate blocks of a model, "from embedding to classifier", from its structure.

The layer stack is the ``nn.ModuleList`` whose children are all of a class named in the model's
``_no_split_modules`` (Hugging Face's own declaration of its repeated block); failing that, the
longest ``ModuleList`` of at least two children of one class. Parameters registered before the
first layer form the embedding block, parameters after the last layer the head block (final norm,
lm_head / pooler / classifier). A parameter shared by two modules (tied embeddings) is one
parameter and so belongs to one block, the embedding. :func:`enable_gradient_checkpointing`
turns on activation checkpointing that keeps backward truncated at the active block.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

from .config import LiftConfig
from .errors import BlockFindingError, ConfigError
from .utils import get_logger

logger = get_logger(__name__)


@dataclass(frozen=True)
class Block:
    """One candidate block.

    Attributes:
        name: ``"embedding"``, ``"head"``, or the layer's module path (e.g. ``"model.layers.3"``).
        kind: ``"embedding"``, ``"layer"`` or ``"head"``.
        layer_number: 1-indexed position in the layer stack for layers, else None.
        param_names: names (as in ``model.named_parameters()``) of the block's parameters.
    """

    name: str
    kind: str
    layer_number: int | None
    param_names: tuple[str, ...]


def find_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The module path and ``ModuleList`` holding the model's repeated layers."""
    from torch import nn

    no_split = set(getattr(model, "_no_split_modules", None) or [])
    declared: list[tuple[str, nn.ModuleList]] = []
    uniform: list[tuple[str, nn.ModuleList]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        classes = {type(c).__name__ for c in mod}
        if len(classes) != 1:
            continue
        if classes <= no_split:
            declared.append((name, mod))
        elif len(mod) >= 2:
            uniform.append((name, mod))
    for found in (declared, uniform):
        if found:
            return max(found, key=lambda item: len(item[1]))
    lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    raise BlockFindingError(
        f"no layer stack found in {type(model).__name__}: looked for an nn.ModuleList whose children are "
        f"all of a class in _no_split_modules ({sorted(no_split) or 'not declared'}), then for any "
        f"nn.ModuleList of >= 2 children of one class; ModuleLists present: {lists or 'none'}. "
        "Pass a model whose repeated layers sit in one nn.ModuleList, or set _no_split_modules."
    )


def parameter_names(model: nn.Module) -> list[str]:
    """``model.named_parameters()``'s names in its order, plus the weight of each frozen linear module
    held outside the parameters (Q-LIFT's :class:`lift_ds.quant.QuantizedFrozenLinear`, a buffer, and
    :class:`lift_ds.stream.StreamedFrozenLinear`, a file: modules with a ``frozen_weight`` method; a
    parameter again when its layer trains)."""
    seen: set[int] = set()
    out: list[str] = []
    for mname, mod in model.named_modules():
        items = list(mod.named_parameters(recurse=False))
        if hasattr(mod, "frozen_weight"):
            out.append(f"{mname}.weight")
        for pname, p in items:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(f"{mname}.{pname}" if mname else pname)
    return out


def find_blocks(model: nn.Module) -> list[Block]:
    """All blocks of a model in order: embedding (if any), each layer, head (if any)."""
    stack_name, stack = find_layer_stack(model)
    prefix = stack_name + "."
    before: list[str] = []
    after: list[str] = []
    per_layer: list[list[str]] = [[] for _ in range(len(stack))]
    for pname in parameter_names(model):
        if pname.startswith(prefix):
            idx = int(pname[len(prefix) :].split(".", 1)[0])
            per_layer[idx].append(pname)
        elif any(per_layer):
            after.append(pname)
        else:
            before.append(pname)
    blocks: list[Block] = []
    if before:
        blocks.append(Block("embedding", "embedding", None, tuple(before)))
    for i, names in enumerate(per_layer):
        if not names:
            raise BlockFindingError(f"layer {prefix}{i} of {type(model).__name__} has no parameters")
        blocks.append(Block(f"{prefix}{i}", "layer", i + 1, tuple(names)))
    if after:
        blocks.append(Block("head", "head", None, tuple(after)))
    return blocks


def select_candidates(blocks: list[Block], lift: LiftConfig) -> list[Block]:
    """The blocks the plan iterates over: embedding?, the layer range, head?, in model order."""
    layers = [b for b in blocks if b.kind == "layer"]
    problems: list[str] = []
    first, last = lift.layer_range or (1, len(layers))
    if last > len(layers):
        problems.append(
            f"lift.layer_range: {list(lift.layer_range or ())} reaches past the model's {len(layers)} layers; "
            f"allowed: 1 <= first <= last <= {len(layers)}"
        )
    chosen: list[Block] = []
    if lift.include_embedding:
        emb = [b for b in blocks if b.kind == "embedding"]
        if not emb:
            problems.append("lift.include_embedding: true, but the model has no parameters before its first layer")
        chosen += emb
    chosen += layers[first - 1 : last]
    if lift.include_head:
        head = [b for b in blocks if b.kind == "head"]
        if not head:
            problems.append("lift.include_head: true, but the model has no parameters after its last layer")
        chosen += head
    if problems:
        raise ConfigError(problems)
    return chosen


def match_modules(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Parameter names of the modules whose names match any ``fnmatch`` pattern.

    Raises:
        ConfigError: a pattern that matches no module (a typo would otherwise train nothing).
    """
    patterns = list(patterns)
    names: list[str] = []
    unmatched = []
    for pat in patterns:
        mods = [n for n, _ in model.named_modules() if n and fnmatch.fnmatchcase(n, pat)]
        if not mods:
            unmatched.append(pat)
        for m in mods:
            for pname, _ in model.named_parameters():
                if (pname.startswith(m + ".") or pname == m) and pname not in names:
                    names.append(pname)
    if unmatched:
        top = [n for n, _ in model.named_children()]
        raise ConfigError(
            [f"lift.always_trainable: pattern {p!r} matches no module; top-level modules are {top}" for p in unmatched]
        )
    return names


def set_trainable(model: nn.Module, param_names: Iterable[str]) -> list[torch.nn.Parameter]:
    """Freeze every parameter except ``param_names``; return the trainable ones in model order."""
    wanted = set(param_names)
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in wanted)
        if name in wanted:
            trainable.append(p)
    return trainable


def enable_gradient_checkpointing(model: nn.Module, **kwargs: Any) -> None:
    """Non-reentrant activation checkpointing through transformers' own switch, keeping truncated
    backward: a block before the active one is neither recomputed nor back-propagated.

    transformers also makes the input embeddings' output require a gradient when it turns
    checkpointing on (``enable_input_require_grads``, needed by reentrant checkpointing and PEFT);
    every layer's output would then need a gradient and backward would run through every block
    before the active one. Non-reentrant checkpointing does not need it, so it is removed here.
    """
    kwargs = {**kwargs, "use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ConfigError(
            [
                f"lift.gradient_checkpointing: {type(model).__name__} has no activation_checkpointing_enable / "
                "gradient_checkpointing_enable (a Hugging Face PreTrainedModel has); wrap its layers yourself"
            ]
        )
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
    logger.info("gradient checkpointing on (non-reentrant; truncated backward kept)")
