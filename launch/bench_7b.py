#!/usr/bin/env python3
"""LIFT with ZeRO-3 under zero.Init on a random-init model with LLaMA-2-7B's shapes, 2 CPU ranks.

    python launch/bench_7b.py --out docs/bench_7b.json            # about 6 minutes, ~21 GiB of RAM

The model is built partitioned (bf16, each rank holds half of every parameter) and never exists
whole in one process. LIFT trains the last two layers for two steps each (the plan
front2end/grouped over layer_range [31, 32]), so four real AdamW steps and one phase rebuild run,
with the fp32 master weights and Adam moments of one layer (202M parameters) per phase. Rank 0
prints and writes: build time, per-step time and loss, phase-switch time, peak RSS per rank, and
lift_ds.memory's estimate for the same model, ranks and precision (LIFT vs full fine-tuning).

A watchdog stops the job if the machine's available memory falls under --min_free_gib (the kernel's
OOM killer would otherwise pick its own victim).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# buffer sizes measured to fit a 7B model over 2 ranks in 24 GiB (shared/CPU-DISTRIBUTED.md)
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
ZERO3 = {
    "stage": 3,
    "stage3_max_live_parameters": 3e8,
    "stage3_prefetch_bucket_size": 5e7,
    "stage3_param_persistence_threshold": 1e4,
    "reduce_bucket_size": 5e7,
    "sub_group_size": 1e8,
}


def available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024**2
    return float("inf")


def watchdog(min_free: float, peak: dict) -> None:
    while True:
        free = available_gib()
        peak["min_available_gib"] = min(peak.get("min_available_gib", free), free)
        if free < min_free:
            print(
                f"watchdog: only {free:.1f} GiB available (< {min_free}); stopping the job", file=sys.stderr, flush=True
            )
            os.killpg(os.getpgid(0), signal.SIGKILL)
        time.sleep(0.5)


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    import torch._dynamo  # noqa: F401  (must precede zero.Init)
    from transformers import LlamaConfig, LlamaForCausalLM

    import lift_ds
    from lift_ds.memory import GIB, PRESETS, estimate, model_shape

    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    mem: dict = {}
    if rank == 0:
        threading.Thread(target=watchdog, args=(args.min_free_gib, mem), daemon=True).start()
    shape = TINY if args.tiny else {**PRESETS["llama-2-7b"], "max_position_embeddings": 4096}
    layers = shape["num_hidden_layers"]
    zero = {**ZERO3, "stage3_param_persistence_threshold": 0} if args.tiny else ZERO3
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "zero_optimization": zero,
        "lift": {"backend": "deepspeed", "total_steps": args.steps, "layer_range": [layers - 1, layers]},
    }
    deepspeed.init_distributed(dist_backend="gloo")
    t0 = time.perf_counter()
    llama = LlamaConfig(**shape)
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=cfg, dtype=torch.bfloat16):
        model = LlamaForCausalLM(llama)
    model.config.use_cache = False
    n_params = sum(p.ds_numel for p in model.parameters())
    built_s = time.perf_counter() - t0
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    engine, *_ = lift_ds.initialize(model=model, config=cfg, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-4))
    g = torch.Generator().manual_seed(1)
    steps = []
    while not engine.done:
        ids = torch.randint(0, llama.vocab_size, (1, args.seq_len), generator=g)
        block = engine.active_block
        sw = engine.phase_switch_seconds
        t = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        value = loss.item()
        del loss
        engine.step()
        steps.append(
            {
                "step": engine.global_step,
                "block": block,
                "loss": value,
                "seconds": time.perf_counter() - t - (engine.phase_switch_seconds - sw),
            }
        )
        if rank == 0:
            print(f"step {engine.global_step}: {block} loss {value:.3f} ({steps[-1]['seconds']:.1f} s)", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    peaks = [torch.tensor([peak])]
    if torch.distributed.is_initialized():
        out = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
        torch.distributed.all_gather(out, torch.tensor([peak], dtype=torch.float64))
        peaks = out
    engine.close()
    if rank == 0:
        est = {}
        if not args.tiny:
            shape = model_shape("llama-2-7b")
            est = {
                m: estimate(shape, m, world, 3, "bf16", seq_len=args.seq_len, micro_batch=1) for m in ("lift", "full")
            }
        result = {
            "model": "tiny (a check of the script)" if args.tiny else "LLaMA-2-7B shapes, random init",
            "parameters": n_params,
            "ranks": world,
            "seq_len": args.seq_len,
            "build_s": built_s,
            "rss_after_build_gib": rss_built,
            "steps": steps,
            "phase_switches": engine.phase_switches - 1,
            "phase_switch_s": engine.phase_switch_seconds,
            "peak_rss_gib_per_rank": [float(p.item()) for p in peaks],
            "min_available_gib": mem.get("min_available_gib"),
            "estimate_model_states_gib_per_rank": {m: e.model_states / GIB for m, e in est.items()},
            "estimate_model_states_gib_all_ranks": {m: e.model_states * world / GIB for m, e in est.items()},
        }
        from lift_ds.provenance import write_json

        write_json(args.out, result)
        print(json.dumps(result, indent=1))
        if args.tiny:
            return
        print(
            f"\n{n_params / 1e9:.2f}B parameters on {world} ranks: {len(steps)} steps done, peak RSS "
            f"{', '.join(f'{p.item():.1f}' for p in peaks)} GiB per rank; lift_ds.memory: LIFT model states "
            f"{result['estimate_model_states_gib_all_ranks']['lift']:.1f} GiB over all ranks, full fine-tuning "
            f"{result['estimate_model_states_gib_all_ranks']['full']:.1f} GiB "
            f"({result['estimate_model_states_gib_all_ranks']['full'] * GIB / 1e9:.0f} GB)"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=32)
    p.add_argument("--min_free_gib", type=float, default=1.0)
    p.add_argument("--out", default="outputs/bench_7b.json")
    p.add_argument(
        "--tiny", action="store_true", help="a 4-layer, hidden-64 model: a check of the script, not a measurement"
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(args.ranks),
        __file__,
        "--worker",
        "--steps",
        str(args.steps),
        "--seq_len",
        str(args.seq_len),
        "--min_free_gib",
        str(args.min_free_gib),
        "--out",
        args.out,
    ]
    cmd += ["--tiny"] if args.tiny else []
    raise SystemExit(subprocess.call(cmd, env=env, cwd=REPO))


if __name__ == "__main__":
    main()
