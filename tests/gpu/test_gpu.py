"""Checks for a GPU machine (scripts/gpu_check.sh runs them; on CPU with --cpu-smoke, so they cannot rot).

Every test runs on CUDA when there is one, else on CPU: 1-rank DeepSpeed ZeRO-2 LIFT equals the torch
backend, bf16 LIFT reduces the loss on both, the config's AdamW runs the implementation lift_ds chose
for this machine (never a JIT-compiled op), gradient checkpointing keeps the weights, and the offload
stash round-trips through host memory.
"""

from __future__ import annotations

import logging

import pytest
import torch

import lift_ds

from helpers import lm_batches, per_block_adam_reference, tiny_llama

pytestmark = pytest.mark.gpu
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ADAMW = {"type": "AdamW", "params": {"lr": 1e-2, "eps": 1e-3}}


def run(backend: str, precision: str = "fp32", steps: int = 8, factory: bool = True, lift: dict | None = None):
    """Train a tiny LLaMA; ``factory`` False: the config's AdamW section builds the optimizer."""
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_clipping": 0.0,
        "optimizer": ADAMW,
        "lift": {"backend": backend, "total_steps": steps, "layer_range": [3, 4], "include_head": True, **(lift or {})},
    }
    if backend == "deepspeed":
        cfg["zero_optimization"] = {"stage": 2}
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    model = tiny_llama(hidden=64)
    start = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    opt = (lambda ps: torch.optim.AdamW(ps, lr=1e-2, eps=1e-3)) if factory else None
    engine, *_ = lift_ds.initialize(model=model, config=cfg, optimizer=opt)
    losses = []
    for b in lm_batches(steps, seq=32):
        loss = engine(**b).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        del loss
    final = {n: t.float().cpu() for n, t in engine.backend.full_state_dict().items() if n in start}
    return engine, start, final, losses


def test_zero2_one_rank_equals_the_torch_backend_on_the_device():
    _, start, ref, _ = run("torch")
    engine, _, final, _ = run("deepspeed")
    assert engine.backend.comm_device.type == DEVICE
    move = max((ref[n] - start[n]).abs().max().item() for n in ref)
    err = max((final[n] - ref[n]).abs().max().item() for n in ref)
    assert move > 1e-3 and err <= 1e-3 * move, (err, move)


@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_bf16_lift_reduces_the_loss(backend):
    engine, _, _, losses = run(backend, "bf16", steps=24, lift={"layer_range": [4, 4]})
    assert {p.dtype for p in engine.module.parameters()} == {torch.bfloat16}
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05, losses


def test_config_adamw_runs_the_chosen_implementation(caplog):
    """No optimizer= given: the config's AdamW runs as DeepSpeed's fused op only where it is pre-built,
    else as torch's AdamW (fused on CUDA): nothing is compiled (scripts/gpu_check.sh checks that its
    fresh TORCH_EXTENSIONS_DIR stays empty); the log says which, and it trains."""
    from lift_ds.backends.ops import choose_optimizer

    expected = choose_optimizer(ADAMW, DEVICE, offload=False).message
    with caplog.at_level(logging.INFO):
        _, start, final, _ = run("deepspeed", factory=False)
    assert expected in caplog.text, caplog.text[-2000:]
    assert max((final[n] - start[n]).abs().max().item() for n in final) > 1e-4


def test_gradient_checkpointing_keeps_weights():
    _, _, plain, _ = run("torch", lift={"gradient_checkpointing": False})
    engine, _, ckpt, _ = run("torch", lift={"gradient_checkpointing": True})
    assert engine.module.is_gradient_checkpointing
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-5, rtol=1e-4, msg=n)


def test_offload_stash_round_trip_on_the_device():
    """optimizer_state offload through host memory (pinned, non-blocking copies on CUDA): a cyclic plan
    that revisits every block equals one persistent optimizer per block."""
    import copy

    model = tiny_llama(hidden=64, layers=3)
    ref_model = copy.deepcopy(model).to(DEVICE)
    opt = lambda ps: torch.optim.Adam(ps, lr=1e-2, eps=1e-3)  # noqa: E731
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_clipping": 0.0,
        "lift": {"backend": "torch", "total_steps": 9, "policy": "cyclic", "optimizer_state": "offload"},
    }
    engine, *_ = lift_ds.initialize(model=model, config=cfg, optimizer=opt)
    data = lm_batches(9, seq=32)
    for b in data:
        loss = engine(**b).loss
        engine.backward(loss)
        engine.step()
    per_block_adam_reference(ref_model, data, opt, layers=3, device=DEVICE)
    for (n, a), (_, r) in zip(model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-4, msg=n)
