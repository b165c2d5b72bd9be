"""A causal-LM loss that computes only what it needs (``lift.loss``).

A Hugging Face causal LM computes logits for every position over the whole vocabulary, upcasts them to
fp32 and takes the cross-entropy over the positions whose label is not -100. With LIFT the head is
frozen in most phases, yet that work (and its backward) runs at every step; on a classification task
almost every position is ignored. :func:`install_loss` gives a model's forward a training path that
runs the base model for the final hidden states, keeps the positions whose *next-token* label counts
(the shift is applied first), and hands them with the targets to one call of the head module, inside
which :class:`ChunkedLinearCrossEntropy` goes through the positions in chunks: logits of a chunk
(in the model's dtype, as ``lm_head`` computes them), their fp32 log-softmax, the summed negative
log-likelihood, and at once the gradients of the summed loss with respect to the hidden states and (when
the head trains) the head's weight. No fp32 logits over the whole vocabulary for all positions ever
exist, and backward only scales the stored gradients.

The head is called as a module (its ``forward`` swapped for the duration of the call), so every backend's
own hooks run: a ZeRO-3-partitioned ``lm_head`` weight is gathered by DeepSpeed's hooks and its gradient
reduced as usual, FSDP2's root unit holds it unsharded, tied embeddings accumulate both gradients into
the one parameter. The loss equals the model's own (``ForCausalLMLoss``: mean over counted tokens, or
the sum over ``num_items_in_batch``) within float noise; ``tests/test_loss.py`` checks loss and
gradients against it.

The training path is taken when ``labels`` are given and autograd is on (``torch.is_grad_enabled()``:
a loss to back-propagate, whether or not ``model.train()`` was called); otherwise (``torch.no_grad()``
evaluation, generation, ``return_dict=False``, ``logits_to_keep``, TRL's ``fused_lm_head``) the model's
own forward runs. It returns ``logits=None``, like Liger's and TRL's fused heads; ``lift.loss: "model"``
keeps the model's own forward (logits at every position). On CUDA, ``auto`` uses Liger's fused linear
cross-entropy or Apple's cut-cross-entropy when one is installed (never required).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import LOSS_MODES
from .utils import get_logger

logger = get_logger(__name__)

#: model types whose causal-LM forward is ``logits = lm_head(base(...).last_hidden_state)`` then the
#: standard loss (tests/test_loss.py checks each one present in the installed transformers)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo2", "smollm3", "starcoder2")
#: config attributes that change the logits after lm_head (softcapping, scaling) or add to the loss
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)
#: fp32 logits elements of one chunk (32 MiB): a chunk holds ``CHUNK_ELEMENTS // vocab`` positions
CHUNK_ELEMENTS = 1 << 23
IGNORE_INDEX = -100
_MARK = "_lift_ds_loss"


def chunk_rows(vocab: int, budget: int = CHUNK_ELEMENTS) -> int:
    """Positions per chunk so that a chunk's fp32 logits stay within ``budget`` elements."""
    return max(1, budget // max(1, vocab))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``sum_i -log softmax(hidden_i @ weight.T + bias)[target_i]`` without logits for all rows at once.

    Forward goes through ``rows`` positions at a time; with ``defer=False`` it also computes the
    gradients of the sum (hidden, weight, bias: whichever needs one) and backward scales them by the
    incoming gradient. With ``defer=True`` (fp16, where an unscaled gradient would underflow) it keeps
    each row's log-sum-exp and backward recomputes the chunks' logits, scaling before the cast as the
    unfused path does. How the weight's gradient is gathered over chunks: :class:`_GradBuffers`.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        rows: int,
        defer: bool,
    ) -> torch.Tensor:
        need = ctx.needs_input_grad[:3]
        grads = _GradBuffers(hidden, weight, bias, need) if any(need) and not defer else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device) if defer else None
        for s in range(0, hidden.shape[0], rows):
            h, t = hidden[s : s + rows], targets[s : s + rows, None]
            logits = F.linear(h, weight, bias).float()
            p = torch.softmax(logits, -1)
            nll = _nll(logits, p, t)
            total += nll.sum()
            if lse is not None:
                lse[s : s + rows] = logits.gather(1, t).squeeze(1) + nll
            elif grads is not None:
                del logits
                p.scatter_add_(1, t, torch.full(t.shape, -1.0, dtype=p.dtype, device=p.device))
                grads.add(s, h, p.to(hidden.dtype))
        ctx.rows, ctx.dtypes = rows, (weight.dtype, None if bias is None else bias.dtype)
        if defer:
            ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.grads = grads
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        grads, ctx.grads = ctx.grads, None
        if grads is None:  # defer: recompute each chunk's softmax and scale before the cast
            hidden, weight, bias, targets, lse = ctx.saved_tensors
            grads = _GradBuffers(hidden, weight, bias, ctx.needs_input_grad[:3])
            for s in range(0, hidden.shape[0], ctx.rows):
                h, t = hidden[s : s + ctx.rows], targets[s : s + ctx.rows, None]
                p = (F.linear(h, weight, bias).float() - lse[s : s + ctx.rows, None]).exp_()
                p.scatter_add_(1, t, torch.full(t.shape, -1.0, dtype=p.dtype, device=p.device))
                grads.add(s, h, (p * grad_out).to(hidden.dtype))
            return (*grads.result(None, ctx.dtypes), None, None, None)
        return (*grads.result(grad_out, ctx.dtypes), None, None, None)


#: below this softmax probability of the target, its negative log-likelihood is taken from the
#: log-sum-exp instead (-log p loses precision in fp32's subnormal range, and is inf at 0)
_TINY = 1e-30


def _nll(logits: torch.Tensor, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-row ``-log softmax(logits)[t]`` from the softmax ``p`` (exact where p is tiny too)."""
    pt = p.gather(1, t).squeeze(1)
    nll = -torch.log(pt)
    tiny = pt < _TINY
    if bool(tiny.any()):
        rows = tiny.nonzero().squeeze(1)
        exact = torch.logsumexp(logits[rows], -1) - logits[rows].gather(1, t[rows]).squeeze(1)
        nll = nll.index_put((rows,), exact)
    return nll


class _GradBuffers:
    """Gradients of the summed loss, filled chunk by chunk: hidden rows in place; the weight's either
    from the logits gradients of every row kept in the model's dtype and one matmul at the end (when
    that is smaller: ``rows x vocab`` against ``vocab x hidden`` fp32, i.e. fewer rows than
    ``4 x hidden / itemsize``), or summed over chunks in fp32; the bias's summed in fp32."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, need: tuple) -> None:
        self.weight, self.hidden = weight, hidden
        self.h = torch.empty_like(hidden) if need[0] else None
        self.g = self.w = None
        if need[1]:
            if hidden.shape[0] * hidden.element_size() < 4 * hidden.shape[1]:
                self.g = torch.empty((hidden.shape[0], weight.shape[0]), dtype=hidden.dtype, device=hidden.device)
            else:
                self.w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        self.b = (
            torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need[2] and bias is not None else None
        )

    def add(self, start: int, h: torch.Tensor, g: torch.Tensor) -> None:
        """Chunk ``h`` (rows from ``start``) with logits gradient ``g`` (in the model's dtype)."""
        if self.h is not None:
            self.h[start : start + len(h)] = g @ self.weight
        if self.g is not None:
            self.g[start : start + len(h)] = g
        if self.w is not None:
            self.w += g.t() @ h
        if self.b is not None:
            self.b += g.float().sum(0)

    def result(self, scale: torch.Tensor | None, dtypes: tuple) -> tuple:
        def out(x: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
            if x is None:
                return None
            return (x if scale is None else x.float() * scale.float()).to(dtype or x.dtype)

        w = self.w if self.g is None else self.g.t() @ self.hidden
        self.g = self.hidden = None
        return out(self.h, None), out(w, dtypes[0]), out(self.b, dtypes[1])


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    rows: int | None = None,
    defer: bool | None = None,
) -> torch.Tensor:
    """Summed negative log-likelihood of ``targets`` under ``hidden @ weight.T + bias`` (fp32 scalar),
    through :class:`ChunkedLinearCrossEntropy` (``defer`` defaults to True for fp16)."""
    rows = rows or chunk_rows(weight.shape[0])
    defer = hidden.dtype == torch.float16 if defer is None else defer
    return ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, rows, defer)


# --------------------------------------------------------------------------- implementations


def _liger() -> Callable | None:
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:  # noqa: BLE001 - an incompatible install: use ours
        return None
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    return lambda h, w, b, t: loss(w, h, t, b)


def _cut_cross_entropy() -> Callable | None:
    if importlib.util.find_spec("cut_cross_entropy") is None:
        return None
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception:  # noqa: BLE001
        return None
    return lambda h, w, b, t: linear_cross_entropy(h, w, t, bias=b, reduction="sum").float()


def choose_implementation(mode: str, device: torch.device) -> tuple[str, Callable]:
    """``(name, fn(hidden, weight, bias, targets) -> summed NLL)`` for ``lift.loss`` on ``device``:
    on CUDA with ``auto``, Liger's fused linear cross-entropy or cut-cross-entropy when installed;
    else lift_ds's :func:`linear_cross_entropy_sum`."""
    if mode == "auto" and device.type == "cuda":
        for name, make in (("liger_kernel", _liger), ("cut_cross_entropy", _cut_cross_entropy)):
            fn = make()
            if fn is not None:
                return name, fn
    return "chunked", lambda h, w, b, t: linear_cross_entropy_sum(h, w, b, t)


def _call_module(module: nn.Module, fn: Callable, *args: Any) -> Any:
    """``module(*args)`` with ``fn`` as its forward: the module's hooks (ZeRO-3 gathers, FSDP) run."""
    own = module.__dict__.get("forward")
    module.forward = fn
    try:
        return module(*args)
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


def causal_lm_loss(
    hidden: torch.Tensor,
    head: nn.Module,
    labels: torch.Tensor | None,
    *,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: Any = None,
    ignore_index: int = IGNORE_INDEX,
    mode: str = "chunked",
) -> torch.Tensor:
    """The causal-LM loss of Hugging Face's ``ForCausalLMLoss`` from the final hidden states.

    Args:
        hidden: ``[batch, seq, hidden]`` final hidden states (after the final norm).
        head: the output embedding (``nn.Linear``); called once, as a module.
        labels: ``[batch, seq]`` token labels (shifted here: position i predicts label i+1).
        shift_labels: already shifted labels (then ``labels`` is not used).
        num_items_in_batch: divide the summed loss by this instead of the counted tokens.
        ignore_index: the label that does not count.
        mode: ``lift.loss`` (``auto`` may pick a CUDA kernel).
    """
    if shift_labels is None:
        shift_labels, hidden = labels[:, 1:], hidden[:, :-1]
    shift_labels = shift_labels.to(hidden.device)
    keep = (shift_labels != ignore_index).reshape(-1)
    idx = keep.nonzero().squeeze(1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx)
    t = shift_labels.reshape(-1).index_select(0, idx)
    _, fn = choose_implementation(mode, h.device)
    total = _call_module(head, lambda hh, tt: fn(hh, head.weight, head.bias, tt), h, t)
    if num_items_in_batch is None:
        return total / keep.sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


# --------------------------------------------------------------------------- the model's forward


def _inner_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PEFT wrapper (or the model itself)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") and hasattr(model, "peft_config") else model
    return inner


def unsupported_reason(model: nn.Module) -> str | None:
    """Why :func:`install_loss` cannot serve this model (None when it can)."""
    inner = _inner_model(model)
    config = getattr(inner, "config", None)
    kind = getattr(config, "model_type", None)
    if config is None or not type(inner).__name__.endswith("ForCausalLM"):
        return (
            f"{type(inner).__name__} is not a Hugging Face causal "
            "LM (a sequence-classification head keeps its own loss)"
        )
    if kind not in SUPPORTED_MODEL_TYPES:
        return f"model type {kind!r} is not one whose loss lift_ds reproduces ({', '.join(SUPPORTED_MODEL_TYPES)})"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in _LOGIT_TRANSFORMS:
        if getattr(text, attr, None) not in (None, 1, 1.0):
            return f"its config sets {attr} (logits transformed after lm_head)"
    if getattr(text, "output_router_logits", False):
        return "its config sets output_router_logits (a router loss is added)"
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        return f"its output embedding is {type(head).__name__}, not nn.Linear"
    return None


_LOSS_ONLY = ("labels", "num_items_in_batch", "shift_labels", "ignore_index")


def install_loss(model: nn.Module, mode: str) -> str | None:
    """Give ``model`` (a Hugging Face causal LM, possibly inside PEFT) the training path described in the
    module docstring. Returns the implementation's name, or None when the model keeps its own loss
    (``mode`` ``model``, or ``auto`` on a model :func:`unsupported_reason` rejects).

    Raises:
        ValueError: ``mode`` is ``chunked`` and the model is not supported.
    """
    if mode not in LOSS_MODES:
        raise ValueError(f"lift.loss: got {mode!r}; allowed: {', '.join(LOSS_MODES)}")
    inner = _inner_model(model)
    if mode == "model":
        remove_loss(model)
        return None
    reason = unsupported_reason(model)
    if reason is not None:
        if mode == "chunked":
            raise ValueError(
                f'lift.loss: "chunked" needs a causal LM whose logits are lm_head(hidden states); {reason}. '
                'Use "auto" (falls back to the model\'s own loss) or "model"'
            )
        logger.info("lift.loss auto: the model's own loss (%s)", reason)
        return None
    if getattr(inner, _MARK, None) is not None:
        remove_loss(model)
    original = inner.forward
    names = [n for n in _signature_names(type(inner).forward)]

    # the model's own signature: Trainer drops dataset columns its forward does not name, generate() checks kwargs
    @functools.wraps(type(inner).forward)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        for name, value in zip(names, args):
            kwargs[name] = value
        labels, shift = kwargs.get("labels"), kwargs.get("shift_labels")
        if (
            not torch.is_grad_enabled()
            or (labels is None and shift is None)
            or kwargs.get("return_dict") is False
            or kwargs.get("fused_lm_head")
            or kwargs.get("logits_to_keep") not in (None, 0)
        ):
            return original(**kwargs)
        loss_kw = {k: kwargs.pop(k) for k in _LOSS_ONLY if k in kwargs}
        kwargs.pop("logits_to_keep", None)
        outputs = self.base_model(**kwargs)
        loss = causal_lm_loss(
            outputs.last_hidden_state,
            self.get_output_embeddings(),
            loss_kw.get("labels"),
            shift_labels=loss_kw.get("shift_labels"),
            num_items_in_batch=loss_kw.get("num_items_in_batch"),
            ignore_index=loss_kw.get("ignore_index", IGNORE_INDEX),
            mode=mode,
        )
        return _causal_lm_output(loss, outputs)

    previous = inner.__dict__.get("forward")  # an instance-level forward someone installed first (TRL's fused head)
    inner.forward = types.MethodType(forward, inner)
    setattr(inner, _MARK, (mode, previous))
    name, _ = choose_implementation(mode, next(inner.parameters()).device)
    logger.info(
        "lift.loss %s: logits only at counted positions, %s cross-entropy (%d positions per chunk)",
        mode,
        name,
        chunk_rows(inner.get_output_embeddings().weight.shape[0]),
    )
    return name


def remove_loss(model: nn.Module) -> None:
    """Undo :func:`install_loss` (the model's own forward again)."""
    inner = _inner_model(model)
    mark = getattr(inner, _MARK, None)
    if mark is not None:
        del inner.forward
        if mark[1] is not None:
            inner.forward = mark[1]
        delattr(inner, _MARK)


def installed_loss(model: nn.Module) -> str | None:
    """The ``lift.loss`` mode installed on ``model`` (None: its own loss)."""
    mark = getattr(_inner_model(model), _MARK, None)
    return None if mark is None else mark[0]


def _signature_names(fn: Callable) -> list[str]:
    import inspect

    params = list(inspect.signature(fn).parameters.values())[1:]  # without self
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _causal_lm_output(loss: torch.Tensor, outputs: Any) -> Any:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} - {"loss", "logits"}
    return CausalLMOutputWithPast(loss=loss, logits=None, **{k: getattr(outputs, k, None) for k in fields})


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether ``model``'s forward (a LIFT engine's module, a PEFT model, a Hugging Face model) takes
    ``logits_to_keep`` (transformers >= 4.50), so evaluation asks for the logits it scores only."""
    import inspect

    inner = getattr(model, "module", model)
    inner = _inner_model(inner) if isinstance(inner, nn.Module) else inner
    fwd = getattr(type(inner), "forward", None)
    try:
        return fwd is not None and "logits_to_keep" in inspect.signature(fwd).parameters
    except (TypeError, ValueError):
        return False
