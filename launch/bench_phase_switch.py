#!/usr/bin/env python3
"""Phase-switch cost, side by side in one run: optimizer_state reset vs offload, per backend.

    torchrun --standalone --nproc_per_node 2 launch/bench_phase_switch.py [--hidden 512 --layers 8 --steps 32]

Trains a random-init LLaMA with the cyclic policy (a switch after every step, the worst case) and
reports, per backend and optimizer_state, the median step time, the median phase-switch time and
the switches' share of the run, then the offload/reset ratios. Rank 0 prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch._dynamo  # noqa: E402,F401


def run(backend: str, stage: int, state: str, args) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    import lift_ds

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=4 * args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=8,
            num_key_value_heads=8,
        )
    )
    cfg = {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_clipping": 1.0,
        "lift": {"backend": backend, "total_steps": args.steps, "policy": "cyclic", "optimizer_state": state},
    }
    if backend == "deepspeed":
        cfg["zero_optimization"] = (
            {"stage": stage, "stage3_param_persistence_threshold": 0} if stage == 3 else {"stage": stage}
        )
    engine, *_ = lift_ds.initialize(model=model, config=cfg, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-4))
    g = torch.Generator().manual_seed(1)
    steps, t_all = [], time.perf_counter()
    switch_before = engine.phase_switch_seconds
    while not engine.done:
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
        t0 = time.perf_counter()
        sw0 = engine.phase_switch_seconds
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        del loss
        engine.step()
        steps.append((time.perf_counter() - t0) - (engine.phase_switch_seconds - sw0))
    total = time.perf_counter() - t_all
    switches = engine.phase_switches - 1
    switch_s = engine.phase_switch_seconds - switch_before
    engine.close()
    del engine, model
    gc.collect()
    return {
        "step_s": statistics.median(steps),
        "switch_s": switch_s / max(switches, 1),
        "switch_share": switch_s / total,
        "switches": switches,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    rows = []
    for backend, stage in (("deepspeed", 2), ("deepspeed", 3), ("fsdp", 0)):
        if backend == "fsdp" and int(os.environ.get("WORLD_SIZE", 1)) < 1:
            continue
        for state in ("reset", "offload"):
            r = run(backend, stage, state, args)
            rows.append({"backend": backend if backend == "fsdp" else f"zero{stage}", "optimizer_state": state, **r})
    if int(os.environ.get("RANK", 0)) == 0:
        print(
            f"\nmodel: hidden {args.hidden}, {args.layers} layers, "
            f"vocab {args.vocab}; batch {args.batch}x{args.seq} per rank; "
            f"{os.environ.get('WORLD_SIZE', 1)} ranks; cyclic policy, {args.steps} steps\n"
        )
        print("| backend | optimizer_state | median step (s) | median switch (s) | switches' share of run |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['backend']} | {r['optimizer_state']} | {r['step_s']:.3f} "
                f"| {r['switch_s']:.3f} | {100 * r['switch_share']:.1f}% |"
            )
        print()
        for b in dict.fromkeys(r["backend"] for r in rows):
            reset, off = (
                next(r for r in rows if r["backend"] == b and r["optimizer_state"] == s) for s in ("reset", "offload")
            )
            print(
                f"{b}: offload/reset switch time {off['switch_s'] / reset['switch_s']:.2f}x, "
                f"step time {off['step_s'] / reset['step_s']:.2f}x"
            )
        if args.out:
            from lift_ds.provenance import write_json

            write_json(args.out, {"args": vars(args), "world_size": int(os.environ.get("WORLD_SIZE", 1)), "rows": rows})


if __name__ == "__main__":
    main()
