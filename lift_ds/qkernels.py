"""Frozen linear layers' arithmetic: chunked NF4 / int8 quantization and a chunked dequantize-matmul.

torchao's tensors define the formats (``NF4Tensor``: QLoRA's 4-bit NormalFloat, blocks of 64 with
double-quantized scalers; ``Int8Tensor``: int8 per output row); this module computes with their
inner tensors, faster and in bounded memory, with the same numbers:

- :func:`quantize_weight` returns the tensor torchao's own constructor returns, bit for bit (a test
  compares every inner tensor), but works through the weight a chunk at a time: no full-size float
  or int64 temporary (torchao's NF4 builds several, and an ``(n, 16)`` distance matrix per chunk).
- :func:`dequantize_rows` decodes rows of a quantized weight into a reusable scratch buffer: NF4 by
  one lookup of each byte in a 256-entry table of value pairs (int32 indices, no int64 tensor), then
  one multiply by the block's scaler; the result equals torchao's ``get_original_weight`` /
  ``dequantize`` bit for bit.
- :func:`frozen_linear` is ``F.linear`` for a frozen weight, through an autograd Function that saves
  no weight for backward: it asks its source for the weight again there (a streamed layer is read
  again, :mod:`lift_ds.stream`). A weight of more than :data:`CHUNK` elements is processed a block
  of rows at a time (forward: those output columns; backward: accumulated into the input's
  gradient a block of input columns at a time), so the largest temporary is one chunk. A weight
  within one chunk gives exactly torchao's results (same operations on the same values); in a
  chunked one every output element is still one dot product, rounded once, and differs from
  torchao's at most as two matrix-multiply kernels do. A dense weight (streamed in the training
  dtype, or a cached dense copy, ``lift.frozen_cache_mb``) is one matmul, as ``nn.Linear``'s.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Protocol

import torch
from torch import nn

from .backends.compat import aten_linear

#: aten's linear (``torch.nn.functional.linear`` unless something replaced it, e.g. DeepSpeed ZeRO-3)
_LINEAR = aten_linear()
NF4_BLOCK = 64
NF4_SCALER_BLOCK = 256
#: elements of a weight dequantized at once (one scratch buffer of this size per dtype)
CHUNK = 1 << 22
#: bytes of NF4 data decoded per inner step (near the cache, and few operations per weight)
_DECODE_BYTES = 1 << 18
NF4_VALUES = (
    -1.0,
    -0.6962,
    -0.5251,
    -0.3949,
    -0.2844,
    -0.1848,
    -0.0911,
    0.0,
    0.0796,
    0.1609,
    0.2461,
    0.3379,
    0.4407,
    0.5626,
    0.7230,
    1.0,
)


def nf4_scaler_block(numel: int) -> int:
    """NF4's scaler block: 256 (torchtune's and QLoRA's), or the largest divisor of the number of
    scalers below it for a weight too small for 256 (tiny test models)."""
    scalers = numel // NF4_BLOCK
    return max(d for d in range(1, NF4_SCALER_BLOCK + 1) if scalers % d == 0)


def kind_of(w: torch.Tensor) -> str:
    """``nf4``, ``int8`` or ``full`` (a plain tensor) for a frozen weight."""
    name = type(w).__name__
    return "nf4" if name == "NF4Tensor" else "int8" if name == "Int8Tensor" else "full"


# --------------------------------------------------------------------------- quantization


@torch.no_grad()
def quantize_weight(weight: torch.Tensor, mode: str) -> torch.Tensor:
    """A torchao quantized copy of a linear weight (``nf4`` / ``int8``), equal to torchao's own
    constructor's, made a chunk at a time; ``full`` returns the weight itself."""
    w = weight.detach()
    if mode == "nf4":
        return _quantize_nf4(w.contiguous())
    if mode == "int8":
        return _quantize_int8(w)
    if mode == "full":
        return w
    raise ValueError(f"frozen_weights mode {mode!r}; allowed: int8, nf4")


def _torchao_nearest(v: torch.Tensor, nf4: torch.Tensor) -> torch.Tensor:
    """torchao's own rule (``NF4Tensor.quantize_tensor_nearest``): the first index of the smallest distance."""
    return (v.unsqueeze(-1) - nf4).abs().min(dim=-1).indices


_NEAREST_TABLES: dict[
    tuple[torch.dtype, torch.device], torch.Tensor
] = {}  # per dtype: torchao's choice per bit pattern


def _nearest_nf4(v: torch.Tensor, nf4: torch.Tensor) -> torch.Tensor:
    """Index (uint8) of the nearest NF4 value to each element, exactly as torchao chooses it.

    16-bit values: a table of torchao's own choice for each of the 65536 bit patterns, looked up with
    int32 indices. fp32: the same choice for the two ends of each run of 65536 consecutive values that
    share their upper 16 bits; torchao's choice never decreases as the value grows (the computed
    distance to each NF4 value is monotone on each side of it), so where the two ends agree the
    whole run agrees, and the few elements in a run that straddles a boundary get torchao's rule
    itself."""
    key = (v.dtype, v.device)
    if v.element_size() == 2:
        table = _NEAREST_TABLES.get(key)
        if table is None:
            every = torch.arange(-32768, 32768, dtype=torch.int32, device=v.device).to(torch.int16).view(v.dtype)
            table = _NEAREST_TABLES[key] = _torchao_nearest(every, nf4).to(torch.uint8)
        return torch.index_select(table, 0, v.view(torch.int16).to(torch.int32).add_(32768))
    tables = _NEAREST_TABLES.get(key)
    if tables is None:
        starts = torch.arange(65536, dtype=torch.int64, device=v.device) << 16
        # bit patterns: int64 -> int32 wraps to the same bits
        ends = (starts | 0xFFFF).to(torch.int32).view(torch.float32)
        starts = starts.to(torch.int32).view(torch.float32)
        a, b = _torchao_nearest(starts, nf4).to(torch.uint8), _torchao_nearest(ends, nf4).to(torch.uint8)
        tables = _NEAREST_TABLES[key] = torch.stack([a, b])
    upper = v.view(torch.int32).bitwise_right_shift(16).bitwise_and_(0xFFFF)
    idx = torch.index_select(tables[0], 0, upper)
    unsure = (torch.index_select(tables[1], 0, upper) != idx).nonzero().view(-1)
    if unsure.numel():
        idx[unsure] = _torchao_nearest(v[unsure], nf4).to(torch.uint8)
    return idx


def _quantize_nf4(w: torch.Tensor) -> torch.Tensor:
    from torchao.quantization import NF4Tensor
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import SubclassTensorArgs

    flat = w.view(-1)
    numel, sb = flat.numel(), nf4_scaler_block(w.numel())
    n_blocks = numel // NF4_BLOCK
    nf4 = torch.tensor(NF4_VALUES, device=w.device, dtype=w.dtype)
    step = max(1, CHUNK // NF4_BLOCK)  # blocks per chunk
    absmax = torch.empty(n_blocks, dtype=w.dtype, device=w.device)
    for s in range(0, n_blocks, step):
        e = min(n_blocks, s + step)
        absmax[s:e] = flat[s * NF4_BLOCK : e * NF4_BLOCK].view(-1, NF4_BLOCK).abs().amax(dim=1)
    # double quantization of the scalers, as torchao's NF4Tensor.double_quantize_scalers
    mean = absmax.mean()
    centred = (absmax - mean).view(-1, sb)
    scaler_absmax = centred.abs().amax(dim=1)
    factor = 256 / (2 * scaler_absmax)
    quantized_scalers = (centred * factor.unsqueeze(-1)).round().clamp(-128, 127).flatten().to(torch.int8)
    data = torch.empty(numel // 2, dtype=torch.uint8, device=w.device)
    for s in range(0, n_blocks, step):
        e = min(n_blocks, s + step)
        scaled = (flat[s * NF4_BLOCK : e * NF4_BLOCK].view(-1, NF4_BLOCK) / absmax[s:e, None]).view(-1)
        idx = _nearest_nf4(scaled, nf4).view(-1, 2)
        out = data[s * NF4_BLOCK // 2 : e * NF4_BLOCK // 2]
        torch.bitwise_left_shift(idx[:, 0], 4, out=out)
        out.bitwise_or_(idx[:, 1])
    meta = SubclassTensorArgs(w.size(), w.stride(), w.storage_offset(), w.dtype, w.device, False)
    return NF4Tensor(meta, NF4_BLOCK, n_blocks, sb, quantized_scalers, factor.contiguous(), mean, data, nf4)


def _quantize_int8(w: torch.Tensor) -> torch.Tensor:
    """Per-row int8 (torchao's ``Int8WeightOnlyConfig``), row chunk by row chunk: rows are independent."""
    from torchao.quantization import Int8Tensor, Int8WeightOnlyConfig, quantize_

    rows = max(1, CHUNK // max(1, w.shape[1]))
    qdata = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], 1, dtype=torch.float32, device=w.device)
    zero = torch.empty(w.shape[0], 1, dtype=torch.int8, device=w.device)
    first = None
    for r in range(0, w.shape[0], rows):
        part = w[r : r + rows]
        holder = nn.Linear(part.shape[1], part.shape[0], bias=False, device="meta")
        holder.weight = nn.Parameter(part.contiguous(), requires_grad=False)
        quantize_(holder, Int8WeightOnlyConfig())
        q = holder.weight.detach()
        first = q if first is None else first
        qdata[r : r + rows], scale[r : r + rows] = q.qdata, q.scale
        zero[r : r + rows] = q.zero_point if q.zero_point is not None else 0
    assert first is not None and first.act_quant_kwargs is None, "int8 weight-only quantization expected"
    return Int8Tensor(
        qdata,
        scale,
        [1, w.shape[1]],
        w.dtype,
        zero_point=zero if first.zero_point is not None else None,
        reduce_range=first.reduce_range,
    )


# --------------------------------------------------------------------------- dequantization

_local = threading.local()


def _scratch(numel: int, dtype: torch.dtype, device: torch.device, minimum: int | None = None) -> torch.Tensor:
    """A reusable buffer (per thread, dtype and device) of at least ``numel`` elements (and of :data:`CHUNK`)."""
    minimum = CHUNK if minimum is None else minimum
    pool = _local.__dict__.setdefault("pool", {})
    key = (dtype, device)
    buf = pool.get(key)
    if buf is None or buf.numel() < numel:
        buf = pool[key] = torch.empty(max(numel, minimum), dtype=dtype, device=device)
    return buf[:numel]


_PAIR_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _pair_table(nf4: torch.Tensor) -> torch.Tensor:
    """The 256 byte values' decoded (high, low) pairs, each pair one 32- or 64-bit word (per dtype and
    device: every NF4 tensor has the same 16 values, :data:`NF4_VALUES`, as torchao's constructor)."""
    key = (nf4.dtype, nf4.device)
    table = _PAIR_TABLES.get(key)
    if table is None:
        nf4 = torch.tensor(NF4_VALUES, dtype=nf4.dtype, device=nf4.device)  # torchao's table (a test compares them)
        pairs = torch.stack([nf4.repeat_interleave(16), nf4.repeat(16)], 1).contiguous()
        table = _PAIR_TABLES[key] = pairs.view({2: torch.int32, 4: torch.int64}[nf4.element_size()]).view(-1)
    return table


def nf4_scalers(q: Any) -> torch.Tensor:
    """The dequantized per-block scalers of an NF4 tensor (torchao's ``dequantize_scalers``)."""
    qs = q.quantized_scalers.view(-1, q.scaler_block_size)
    return (qs / q.quantization_factor.unsqueeze(-1)).flatten().to(q.dtype) + q.scaler_mean


def row_step(w: torch.Tensor) -> int:
    """Rows decoded per chunk: at most :data:`CHUNK` elements, NF4 chunks on whole blocks of 64."""
    out, cols = w.shape
    rows = max(1, CHUNK // max(1, cols))
    if kind_of(w) == "nf4":
        align = NF4_BLOCK // math.gcd(cols, NF4_BLOCK)
        rows = max(align, rows // align * align)
    return min(out, rows)


def dequantize_rows(w: torch.Tensor, r0: int, r1: int, scalers: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``r0:r1`` of a frozen weight in its dtype, in a scratch buffer (valid until the next call).

    Args:
        w: an NF4Tensor, an Int8Tensor or a plain tensor.
        scalers: NF4's :func:`nf4_scalers`, when the caller decodes several chunks.
    """
    kind, cols = kind_of(w), w.shape[1]
    if kind == "full":
        return w[r0:r1]
    out = _scratch((r1 - r0) * cols, w.dtype, w.device).view(r1 - r0, cols)
    if kind == "int8":
        return out.copy_(w.qdata[r0:r1])  # scaled after the matmul, as torchao does
    scalers = nf4_scalers(w) if scalers is None else scalers
    table = _pair_table(w.nf4)
    words = out.view(-1).view(table.dtype)
    e0, e1 = r0 * cols, r1 * cols
    data = w.quantized_data
    step = min(_DECODE_BYTES, max(1, CHUNK // 2))
    index = _scratch(step, torch.int32, w.device, minimum=step)
    for s in range(e0 // 2, e1 // 2, step):
        e = min(e1 // 2, s + step)
        idx = index[: e - s]
        idx.copy_(data[s:e])
        torch.index_select(table, 0, idx, out=words[s - e0 // 2 : e - e0 // 2])
    out.view(-1, NF4_BLOCK).mul_(scalers[e0 // NF4_BLOCK : e1 // NF4_BLOCK, None])
    return out


def dequantize(w: torch.Tensor) -> torch.Tensor:
    """The whole weight in its dtype, in a new tensor (export checks, tests)."""
    if kind_of(w) == "int8":
        return w.dequantize()
    out = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    step, scalers = row_step(w), nf4_scalers(w) if kind_of(w) == "nf4" else None
    for r in range(0, w.shape[0], step):
        out[r : r + step] = dequantize_rows(w, r, min(w.shape[0], r + step), scalers)
    return out


# --------------------------------------------------------------------------- the linear


class WeightSource(Protocol):
    """Gives a frozen linear its weight, in the forward and again in the backward."""

    def frozen_weight(self) -> torch.Tensor: ...


def _forward(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    kind, (out_f, in_f) = kind_of(w), w.shape
    x2 = x.reshape(-1, in_f)
    if kind == "full":  # a dense weight needs no scratch: one matmul, as nn.Linear's
        y = _LINEAR(x2, w, bias)
        return y.reshape(*x.shape[:-1], out_f)
    step = row_step(w)
    scalers = nf4_scalers(w) if kind == "nf4" else None
    y = None if step >= out_f else torch.empty(x2.shape[0], out_f, dtype=x.dtype, device=x.device)
    for r in range(0, out_f, step):
        r1 = min(out_f, r + step)
        wc = dequantize_rows(w, r, r1, scalers)
        if wc.dtype != x.dtype:
            wc = wc.to(x.dtype)
        if kind == "int8":  # torchao's weight-only int8: (x @ q^T) * scale
            part = torch.mm(x2, wc.t()) * w.scale[r:r1].to(x.dtype).flatten()
        else:
            part = _LINEAR(x2, wc)
        if y is None:
            y = part
        else:
            y[:, r:r1] = part
    assert y is not None
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], out_f)


def col_step(w: torch.Tensor) -> int:
    """Columns decoded per backward chunk: at most :data:`CHUNK` elements, NF4 chunks on whole
    blocks (a weight whose rows are not whole NF4 blocks is decoded in one piece)."""
    out, cols = w.shape
    if kind_of(w) == "nf4" and cols % NF4_BLOCK:
        return cols
    step = max(1, CHUNK // max(1, out))
    if kind_of(w) == "nf4":
        step = max(NF4_BLOCK, step // NF4_BLOCK * NF4_BLOCK)
    return min(cols, step)


def dequantize_cols(w: torch.Tensor, c0: int, c1: int, scalers: torch.Tensor | None = None) -> torch.Tensor:
    """Columns ``c0:c1`` of a frozen weight in its dtype (a scratch buffer for NF4 / int8; NF4
    needs rows of whole blocks unless the range is the whole weight)."""
    kind, (out_f, in_f) = kind_of(w), w.shape
    if kind == "full":
        return w[:, c0:c1]
    if c0 == 0 and c1 == in_f:
        return dequantize_rows(w, 0, out_f, scalers)
    width = c1 - c0
    out = _scratch(out_f * width, w.dtype, w.device).view(out_f, width)
    if kind == "int8":
        return out.copy_(w.qdata[:, c0:c1])
    scalers = nf4_scalers(w) if scalers is None else scalers
    table = _pair_table(w.nf4)
    data = w.quantized_data.view(out_f, in_f // 2)[:, c0 // 2 : c1 // 2]
    words = out.view(-1).view(table.dtype).view(out_f, width // 2)
    rows = max(1, min(_DECODE_BYTES, max(1, CHUNK // 2)) // (width // 2))
    index = _scratch(rows * (width // 2), torch.int32, w.device, minimum=rows * (width // 2))
    for r in range(0, out_f, rows):
        r1 = min(out_f, r + rows)
        idx = index[: (r1 - r) * (width // 2)].view(r1 - r, width // 2)
        idx.copy_(data[r:r1])
        torch.index_select(table, 0, idx.view(-1), out=words[r:r1].view(-1))
    sc = scalers.view(out_f, in_f // NF4_BLOCK)[:, c0 // NF4_BLOCK : c1 // NF4_BLOCK]
    out.view(out_f, width // NF4_BLOCK, NF4_BLOCK).mul_(sc.unsqueeze(-1))
    return out


def _grad_input(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``g W`` a block of input columns at a time: each element is one dot product (one rounding)."""
    kind, (out_f, in_f) = kind_of(w), w.shape
    g2 = g.reshape(-1, out_f)
    if kind == "full":
        return torch.mm(g2, w).reshape(*g.shape[:-1], in_f)
    if kind == "int8":  # torchao's weight-only int8: y = (x q^T) * scale, so dx = (g * scale) q
        g2 = g2 * w.scale.to(g.dtype).flatten()
    step = col_step(w)
    scalers = nf4_scalers(w) if kind == "nf4" else None
    gx = None if step >= in_f else torch.empty(g2.shape[0], in_f, dtype=g.dtype, device=g.device)
    for c in range(0, in_f, step):
        c1 = min(in_f, c + step)
        wc = dequantize_cols(w, c, c1, scalers)
        if wc.dtype != g.dtype:
            wc = wc.to(g.dtype)
        part = torch.mm(g2, wc)
        if gx is None:
            gx = part
        else:
            gx[:, c:c1] = part
    assert gx is not None
    return gx.reshape(*g.shape[:-1], in_f)


class _FrozenLinear(torch.autograd.Function):
    """``y = x W^T + b`` with a frozen ``W`` fetched from its source in forward and in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, source: WeightSource, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.source = source
        return _forward(x, source.frozen_weight(), bias)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return _grad_input(g.contiguous(), ctx.source.frozen_weight()), None, None


def frozen_linear(x: torch.Tensor, source: WeightSource, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for a frozen weight (NF4, int8 or plain) that autograd does not keep:
    the backward asks ``source`` for it again. ``bias`` must not require a gradient."""
    if bias is not None and bias.requires_grad:
        raise RuntimeError("frozen_linear: the bias of a frozen linear layer requires a gradient; freeze it first")
    if torch.is_grad_enabled() and x.requires_grad:
        return _FrozenLinear.apply(x, source, bias)
    return _forward(x, source.frozen_weight(), bias)
