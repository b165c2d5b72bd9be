#!/usr/bin/env python3
"""LIFT against full fine-tuning and LoRA (and BAdam when installed), side by side in one invocation.

    python launch/benchmark.py --steps 30 --out docs/benchmark.json          # SmolLM2-135M, 2 ranks
    python launch/benchmark.py --model DIR --methods lift-zero2,full-zero2    # any HF model

Each method runs in its own fresh 2-rank torchrun job (so peak RSS is its own) on the same model,
data (movie-review text packed to --seq_len), batch and precision (bf16, fp32 master weights).
Per method and rank it measures: model-state bytes (every live tensor after backward and after the
optimizer step, activations freed: parameters, gradients, optimizer state, DeepSpeed buffers; the
larger of the two), peak RSS, median step time, tokens/s, phase-switch time and its share, and the
mean loss of the last steps. It prints a markdown table and the ratios LIFT/other for every figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = ("lift-zero2", "lift-zero3", "lift-fsdp", "full-zero2", "full-zero3", "lora-zero2")


def live_tensor_bytes() -> int:
    """Bytes of all live tensor storages in this process (each storage counted once)."""
    import torch

    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if not torch.is_tensor(obj):
                continue
            t = obj.to_local() if hasattr(obj, "to_local") else obj
            if t.device.type == "meta":
                continue
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        except Exception:  # noqa: BLE001 - odd tensor subclasses
            continue
    return sum(seen.values())


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch._dynamo  # noqa: F401

    import lift_ds
    from lift_ds import assets
    from lift_ds.data import RankBatches, load_examples, tokenize
    from lift_ds.train import _load_tokenizer

    method, _, backend = args.method.partition("-")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    model_dir = args.model or str(assets.smollm2_135m())
    tok = _load_tokenizer(model_dir)
    train_file, _ = assets.movie_review_sentiment()
    exs, _ = load_examples(train_file, "text")
    data = tokenize(exs, tok, "text", args.seq_len)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    cfg = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_clipping": 1.0, "bf16": {"enabled": True},
           "lift": {"backend": "fsdp" if backend == "fsdp" else "deepspeed", "total_steps": args.steps}}
    if backend.startswith("zero"):
        cfg["zero_optimization"] = {"stage": int(backend[-1])}
        if backend == "zero3":
            cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 1e4
    fixed = None
    if method == "full":
        fixed = [n for n, _ in model.named_parameters()]
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0))
        fixed = [n for n, p in model.named_parameters() if p.requires_grad]
    engine, *_ = lift_ds.initialize(model=model, config=cfg, optimizer=lambda ps: torch.optim.AdamW(ps, lr=args.lr), fixed_trainable=fixed)
    batches = RankBatches(data, args.micro_batch, rank, world, seed=0, pad_id=tok.pad_token_id)
    times, losses, states = [], [], []
    while not engine.done:
        b = batches.batch(engine.micro_steps)
        sw = engine.phase_switch_seconds
        t0 = time.perf_counter()
        loss = engine(**b).loss
        engine.backward(loss)
        losses.append(loss.item())
        del loss
        if engine.global_step in (1, args.steps // 2):
            states.append(live_tensor_bytes())
        engine.step()
        times.append(time.perf_counter() - t0 - (engine.phase_switch_seconds - sw))
        if engine.global_step in (2, args.steps // 2 + 1):
            states.append(live_tensor_bytes())
    out = {
        "method": args.method, "rank": rank, "world": world,
        "model_state_bytes": max(states) if states else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "median_step_s": statistics.median(times[1:]),
        "tokens_per_s": args.micro_batch * args.seq_len * world / statistics.median(times[1:]),
        "switch_s": engine.phase_switch_seconds, "switches": engine.phase_switches - 1,
        "run_s": sum(times) + engine.phase_switch_seconds,
        "final_loss": statistics.mean(losses[-5:]),
    }
    Path(args.result).with_suffix(f".rank{rank}.json").write_text(json.dumps(out))
    engine.close()


def orchestrate(args: argparse.Namespace) -> None:
    results = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tmp = Path(args.out).with_suffix("")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    for m in args.methods.split(","):
        if m not in METHODS:
            raise SystemExit(f"error: --methods: {m!r} unknown; allowed: {', '.join(METHODS)}")
        res = Path(f"{tmp}.{m}")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.ranks), __file__, "--worker",
               "--method", m, "--result", str(res), "--steps", str(args.steps), "--seq_len", str(args.seq_len),
               "--micro_batch", str(args.micro_batch), "--lr", str(args.lr)] + (["--model", args.model] if args.model else [])
        print(f"running {m} ...", flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
        if proc.returncode:
            print(proc.stderr[-3000:])
            raise SystemExit(f"{m} failed (exit {proc.returncode})")
        ranks = [json.loads(res.with_suffix(f".rank{r}.json").read_text()) for r in range(args.ranks)]
        results[m] = {k: max(r[k] for r in ranks) if isinstance(ranks[0][k], (int, float)) else ranks[0][k] for k in ranks[0]}
        results[m]["wall_s"] = time.time() - t0
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    report(results, args)


def report(results: dict, args: argparse.Namespace) -> None:
    gib = 1024**3
    print(f"\n{args.ranks} ranks, bf16 (fp32 master), micro batch {args.micro_batch} x {args.seq_len}, {args.steps} steps, AdamW lr {args.lr}\n")
    print("| method | model states / rank (GiB) | peak RSS / rank (GiB) | median step (s) | tokens/s | phase switches (s, share) | loss, last 5 steps |")
    print("|---|---|---|---|---|---|---|")
    for m, r in results.items():
        share = r["switch_s"] / r["run_s"] if r["run_s"] else 0
        print(f"| {m} | {r['model_state_bytes'] / gib:.3f} | {r['peak_rss_bytes'] / gib:.2f} | {r['median_step_s']:.3f} | {r['tokens_per_s']:.0f} | "
              f"{r['switch_s']:.1f} ({100 * share:.1f}%) | {r['final_loss']:.3f} |")
    print()
    pairs = [("lift-zero2", "full-zero2"), ("lift-zero3", "full-zero3"), ("lift-zero2", "lora-zero2"), ("lift-fsdp", "full-zero3")]
    for a, b in pairs:
        if a in results and b in results:
            ra, rb = results[a], results[b]
            print(f"{b} / {a}: model states {rb['model_state_bytes'] / ra['model_state_bytes']:.2f}x, peak RSS {rb['peak_rss_bytes'] / ra['peak_rss_bytes']:.2f}x, "
                  f"step time {rb['median_step_s'] / ra['median_step_s']:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF directory (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--micro_batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--out", default="outputs/benchmark.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
