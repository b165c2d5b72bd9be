"""lift_ds.qkernels: chunked NF4 / int8 quantization and dequantize-matmul give torchao's numbers, with
no full-size temporary and no weight kept by autograd."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from lift_ds import qkernels as K

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None, reason="torchao (lift_ds[quant]) not installed"
)


def torchao_quantized(w, mode):
    """torchao's own constructors (what lift_ds used before its chunked path)."""
    if mode == "nf4":
        from torchao.quantization import NF4Tensor

        return NF4Tensor.from_tensor(w.contiguous(), 64, K.nf4_scaler_block(w.numel()))
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    holder = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    holder.weight = nn.Parameter(w, requires_grad=False)
    quantize_(holder, Int8WeightOnlyConfig())
    return holder.weight.detach()


def assert_same_tensor(a, b):
    names, ctx = a.__tensor_flatten__()
    assert type(a) is type(b) and names == b.__tensor_flatten__()[0]
    for n in names:
        x, y = getattr(a, n), getattr(b, n)
        assert (x is None) == (y is None), n
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), n


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 4096 elements, so that small weights take the chunked paths (and fresh scratch buffers)."""
    monkeypatch.setattr(K, "CHUNK", 4096)
    monkeypatch.setattr(K._local, "pool", {}, raising=False)


class Source:
    def __init__(self, w):
        self.w = w

    def frozen_weight(self):
        return self.w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["nf4", "int8"])
@pytest.mark.parametrize("shape", [(96, 128), (64, 24 * 8), (40, 100 * 64 // 10)])
def test_quantization_equals_torchao_bit_for_bit(small_chunks, dtype, mode, shape):
    torch.manual_seed(0)
    w = (torch.randn(*shape) * 0.02).to(dtype)
    # zeros, tiny values, a large block absmax
    w[0, :7] = torch.tensor([0.0, 1e-30, -1e-30, 0.02, -0.02, 0.5, -0.5]).to(dtype)
    mine = K.quantize_weight(w, mode)
    assert_same_tensor(mine, torchao_quantized(w, mode))
    want = mine.get_original_weight() if mode == "nf4" else mine.dequantize()
    assert torch.equal(K.dequantize(mine), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_over_every_bf16_value_and_every_midpoint(dtype):
    """Blocks made of every finite bf16 bit pattern, and of the NF4 values and the midpoints between
    them (where a nearest-value rule decides a tie): the same codes as torchao's."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    every = every[torch.isfinite(every)]
    every = every[: every.numel() // 256 * 256][
        torch.randperm(every.numel() // 256 * 256, generator=torch.Generator().manual_seed(0))
    ]
    nf4 = torch.tensor(K.NF4_VALUES)
    block = torch.cat([torch.tensor([1.0]), (nf4[1:] + nf4[:-1]) / 2, nf4, torch.zeros(64 - 32)])
    for w in (every.view(-1, 256), block.repeat(64, 1).view(-1, 128)):
        assert_same_tensor(K.quantize_weight(w.to(dtype), "nf4"), torchao_quantized(w.to(dtype), "nf4"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_frozen_linear_equals_torchao_linear(dtype, mode):
    """Within one chunk: forward and input gradient exactly torchao's (``F.linear`` on its tensors)."""
    torch.manual_seed(0)
    w = (torch.randn(96, 128) * 0.05).to(dtype)
    q = K.quantize_weight(w, mode)
    bias = torch.randn(96).to(dtype)
    x = torch.randn(2, 5, 128).to(dtype).requires_grad_()
    want = torch._C._nn.linear(x, q, bias)
    g = torch.randn_like(want)
    (gx_want,) = torch.autograd.grad(want, x, g)
    got = K.frozen_linear(x, Source(q), bias)
    (gx,) = torch.autograd.grad(got, x, g)
    assert torch.equal(got, want) and torch.equal(gx, gx_want)


@pytest.mark.parametrize("mode", ["nf4", "int8", "full"])
def test_chunked_linear_equals_one_piece(monkeypatch, mode):
    """Rows at a time forward, input columns at a time backward: each element is one dot product, so
    the chunked result equals the one-piece result to fp32 rounding."""
    torch.manual_seed(0)
    q = K.quantize_weight(torch.randn(200, 256) * 0.05, mode)
    x = torch.randn(3, 7, 256, dtype=torch.float64).float().requires_grad_()
    g = torch.randn(3, 7, 200)
    outs = []
    for chunk in (1 << 22, 4096):
        monkeypatch.setattr(K, "CHUNK", chunk)
        y = K.frozen_linear(x, Source(q), None)
        outs.append((y, *torch.autograd.grad(y, x, g)))
    assert K.row_step(q) < 200 and K.col_step(q) < 256  # the second pass was chunked
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _largest_allocation(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)


def test_no_full_size_temporary(small_chunks):
    """Quantizing, and a forward and backward through a frozen NF4 / int8 weight, allocate a chunk at a
    time: no operation allocates more than the int8 result itself (a quarter of the weight's fp32 size),
    a linear step not an eighth. torchao's own NF4 constructor allocates 16x the weight's fp32 size in
    one operation, its dequantization the fp32 size: the measure sees such temporaries."""
    torch.manual_seed(0)
    w = torch.randn(256, 512)
    full = w.numel() * 4
    assert _largest_allocation(lambda: torchao_quantized(w, "nf4")) >= full
    assert _largest_allocation(lambda: torchao_quantized(w, "nf4").get_original_weight()) >= full
    for mode in ("nf4", "int8"):
        # int8: its own output
        assert _largest_allocation(lambda: K.quantize_weight(w, mode)) <= full / 4, mode  # noqa: B023 (called at once)
        q = K.quantize_weight(w, mode)
        x = torch.randn(4, 512, requires_grad=True)

        def step():
            K.frozen_linear(x, Source(q), None).sum().backward()  # noqa: B023 (called at once)

        assert _largest_allocation(step) <= full / 8, mode
    # the scratch buffers stay a chunk (or NF4's narrowest column block: 64 columns)
    assert (
        max(b.numel() * b.element_size() for b in K._local.pool.values())
        <= 4 * max(K.CHUNK, 64 * w.shape[0])
        < full / 2
    )


def test_autograd_keeps_no_weight():
    """The graph of a frozen linear holds its source, not a (dequantized) weight: the weight is asked
    for again in backward."""
    q = K.quantize_weight(torch.randn(64, 64), "nf4")
    calls = []

    class Counting(Source):
        def frozen_weight(self):
            calls.append(1)
            return self.w

    x = torch.randn(2, 64, requires_grad=True)
    y = K.frozen_linear(x, Counting(q), None)
    saved = [t for t in (y.grad_fn.saved_tensors if hasattr(y.grad_fn, "saved_tensors") else ())]
    assert saved == [] and len(calls) == 1
    y.sum().backward()
    assert len(calls) == 2 and x.grad is not None
    bias = torch.zeros(64, requires_grad=True)
    with pytest.raises(RuntimeError, match="bias of a frozen linear layer requires a gradient"):
        K.frozen_linear(x, Counting(q), bias)
