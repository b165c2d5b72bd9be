"""A reference for the 2-rank equivalence tests that shares nothing with lift_ds's engine: a plain PyTorch
loop written out here, with LIFT's block order worked out by hand.

The other reference (``launch.reference``) runs lift_ds's own torch backend, so a bug in the code every
backend shares (the plan, the phase switches, the optimizer wrapper, clipping) would cancel out there.
This loop imports nothing from lift_ds: ``requires_grad`` on the active block only, a fresh optimizer
at every phase, the global batch's mean loss, clipping over the active block's gradients.
"""

from __future__ import annotations

import torch

from helpers import lm_batches, tiny_llama


def layer_block(i: int) -> str:
    """Parameter-name prefix of decoder layer ``i`` (1-indexed, as ``layer_range`` counts)."""
    return f"model.layers.{i - 1}."


HEAD = ("model.norm.", "lm_head.")


def block_order(blocks: list[tuple[str, ...]], total_steps: int, schedule: str, policy: str) -> list[tuple[str, ...]]:
    """The block of every step, from the paper's definitions (not lift_ds.schedule): front2end runs the
    blocks from the embedding side, end2front the reverse; grouped gives each block floor(t/N) consecutive
    steps (the first t mod N blocks one more), cyclic goes round-robin, one step per block."""
    order = list(blocks) if schedule == "front2end" else list(reversed(blocks))
    n = len(order)
    if policy == "cyclic":
        return [order[k % n] for k in range(total_steps)]
    steps: list[tuple[str, ...]] = []
    for i, block in enumerate(order):
        steps += [block] * (total_steps // n + (1 if i < total_steps % n else 0))
    return steps


def plain_lift(
    order: list[tuple[str, ...]], optimizer, clip: float, batches: list[dict], **model_kw
) -> tuple[dict, dict]:
    """Train a fresh ``tiny_llama(**model_kw)`` step by step through ``order``; returns (start, final)."""
    model = tiny_llama(**model_kw)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt, active = None, None
    for block, batch in zip(order, batches):
        if block != active:  # a phase boundary: only this block trains, with a new optimizer
            active = block
            params = []
            for n, p in model.named_parameters():
                p.requires_grad_(n.startswith(block))
                if p.requires_grad:
                    params.append(p)
            opt = optimizer(params)
        loss = model(**batch).loss
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return start, {n: p.detach().clone() for n, p in model.named_parameters()}


def plain_reference(sc: dict, world: int, optimizers: dict) -> tuple[dict, dict]:
    """(start, final) of the plain loop for a worker scenario: ``layer_range`` [2, 4] plus the head,
    fed the same global batches (micro batch x ranks rows) as the ranks together."""
    cfg = sc["config"]
    lift = cfg["lift"]
    assert lift.get("layer_range") == [2, 4] and lift.get("include_head") and lift.get("method", "lift") == "lift", lift
    assert cfg.get("gradient_accumulation_steps", 1) == 1 and not sc.get("nan_steps")
    blocks = [(layer_block(i),) for i in (2, 3, 4)] + [HEAD]
    order = block_order(blocks, lift["total_steps"], lift.get("schedule", "front2end"), lift.get("policy", "grouped"))
    rows = cfg["train_micro_batch_size_per_gpu"] * world
    batches = lm_batches(
        sc["steps"], batch=rows, seq=sc.get("seq", 16), vocab=sc.get("vocab", 128), seed=sc.get("data_seed", 1)
    )
    clip = cfg.get("gradient_clipping", 1.0)
    return plain_lift(
        [tuple(b) for b in order],
        optimizers[sc["optimizer"]],
        clip,
        batches,
        layers=sc.get("layers", 4),
        hidden=sc.get("hidden", 32),
        vocab=sc.get("vocab", 128),
        seed=sc.get("seed", 0),
    )
