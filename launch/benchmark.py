#!/usr/bin/env python3
"""LIFT against full fine-tuning and LoRA (and BAdam when installed), side by side in one invocation.

    python launch/benchmark.py --steps 30 --out docs/benchmark.json          # SmolLM2-135M, 2 ranks
    python launch/benchmark.py --model DIR --methods lift-zero2,full-zero2    # any HF model
    python launch/benchmark.py --workload classification --methods lift-zero2:model,lift-zero2   # the loss, old vs new

Each method runs in its own fresh 2-rank torchrun job (so peak RSS is its own) on the same model,
data (movie-review text packed to --seq_len), batch and precision (bf16, fp32 master weights).
Per method and rank it measures: model-state bytes (every live tensor after backward and after the
optimizer step, activations freed: parameters, gradients, optimizer state, DeepSpeed buffers; the
larger of the two), peak RSS, median step time, tokens/s, phase-switch time and its share, and the
mean loss of the last steps. It prints a markdown table and the ratios LIFT/other for every figure.

A method name may end in ``:model``: the same run with ``lift.loss: "model"`` (the model's own loss, logits
at every position) instead of the default (lift_ds's chunked loss); the report then gives old / new step
time and the largest difference of their per-step losses. ``--workload classification`` runs the
quickstart's shape instead of packed text: ds_configs/quickstart_cpu.json's fp32 and micro batch 8,
movie reviews with the label word as the only trained tokens, --seq_len 128.
"""

from __future__ import annotations

import argparse
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

from lift_ds.memory import live_tensor_bytes  # noqa: E402

METHODS = ("lift-zero2", "lift-zero3", "lift-fsdp", "full-zero2", "full-zero3", "lora-zero2")
#: single-process comparisons at one fixed block (--fixed_layer) or switching every step over the
#: top half of the layers: the plain PyTorch loop, lift_ds on the torch backend (both fp32), and
#: BAdam 1.4 against lift_ds on one DeepSpeed rank (both bf16 weights, fp32 master and AdamW)
SINGLE = ("plain-fixed", "lift-torch-fixed", "badam-fixed", "lift-bf16-fixed", "badam-switch", "lift-bf16-switch")


def single_worker(args: argparse.Namespace, model, data, tok) -> dict:
    """One process: a fixed block, or a switch at every step over layers top-half..top."""
    import torch

    import lift_ds
    from lift_ds.data import RankBatches

    kind, _, mode = args.method.partition(":")[0].rpartition("-")
    n_layers = model.config.num_hidden_layers
    k = args.fixed_layer or n_layers // 2
    switch_layers = list(range(n_layers // 2 + 1, n_layers + 1))
    prefix = lambda i: f"model.layers.{i - 1}."  # noqa: E731  (1-indexed layer -> parameter prefix)
    batches = RankBatches(data, args.micro_batch, 0, 1, seed=0, pad_id=tok.pad_token_id)
    adamw = dict(lr=args.lr, weight_decay=0.0)
    engine = opt = None
    switch_s, switches = 0.0, 0
    if kind == "plain":
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith(prefix(k)))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, **adamw)
    elif kind == "badam":
        from badam import BlockOptimizer

        model.to(torch.bfloat16)  # BAdam's intended set-up: 16-bit weights, fp32 copies of the active block
        blocks = [[prefix(k)]] if mode == "fixed" else [[prefix(i)] for i in switch_layers]
        base = torch.optim.AdamW(model.parameters(), **adamw)
        opt = BlockOptimizer(
            base,
            list(model.named_parameters()),
            block_prefix_list=blocks,
            switch_block_every=1 if mode == "switch" else 10**9,
            switch_mode="fixed" if mode == "fixed" else "ascending",
            start_block=0,
            verbose=0,
        )
    else:
        layer_range = [k, k] if mode == "fixed" else [switch_layers[0], switch_layers[-1]]
        cfg = {
            "train_micro_batch_size_per_gpu": args.micro_batch,
            "gradient_clipping": 1.0,
            "lift": {
                "backend": "torch" if kind == "lift-torch" else "deepspeed",
                "total_steps": args.steps,
                "layer_range": layer_range,
                "policy": "cyclic",
                "loss": loss_mode(args.method),
            },
        }
        if kind == "lift-bf16":
            cfg.update({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}})
        engine, *_ = lift_ds.initialize(model=model, config=cfg, optimizer=lambda ps: torch.optim.AdamW(ps, **adamw))
    build_s = engine.phase_switch_seconds if engine is not None else 0.0
    times, losses, states = [], [], []
    for step in range(1, args.steps + 1):
        b = batches.batch(step - 1)
        t0 = time.perf_counter()
        if engine is not None:
            loss = engine(**b).loss
            engine.backward(loss)
        else:
            loss = model(**b).loss
            loss.backward()
        losses.append(loss.item())
        del loss
        if step in (2, args.steps // 2):
            states.append(live_tensor_bytes())
        if engine is not None:
            engine.step()
            switch_s, switches = engine.phase_switch_seconds - build_s, engine.phase_switches - 1
            times.append(time.perf_counter() - t0)
        else:
            if kind == "plain":
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            else:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
            opt.step()  # BAdam switches blocks inside step(): its switch time is part of the step, as LIFT's is
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        if step in (2, args.steps // 2):
            states.append(live_tensor_bytes())
    if kind == "badam" and mode == "switch":
        switches = args.steps - 1
        switch_s = time_badam_switch(opt, len(switch_layers)) * switches
    out = {
        "model_state_bytes": max(states),
        "median_step_s": statistics.median(times[1:]),
        "switch_s": switch_s,
        "switches": switches,
        "run_s": sum(times),
        "final_loss": statistics.mean(losses[-5:]),
        "losses": losses,
    }
    if engine is not None:
        engine.close()
    return out


def time_badam_switch(opt, n_blocks: int) -> float:
    """Seconds per call of BAdam's switch_trainable_params, averaged over one cycle of its blocks."""
    t0 = time.perf_counter()
    for _ in range(n_blocks):
        opt.switch_trainable_params(verbose=0)
    return (time.perf_counter() - t0) / n_blocks


def count_switch_cpu(engine) -> list[float]:
    """A one-element list that accumulates the process CPU seconds of the engine's phase switches."""
    spent = [0.0]
    start_phase = engine.start_phase

    def timed(*a, **k):
        c = time.process_time()
        try:
            return start_phase(*a, **k)
        finally:
            spent[0] += time.process_time() - c

    engine.start_phase = timed
    return spent


def loss_mode(method: str) -> str:
    """``lift.loss`` of a method name (``NAME:model`` is the model's own loss)."""
    return "model" if method.endswith(":model") else "auto"


def load_data(args: argparse.Namespace, tok):
    from lift_ds import assets
    from lift_ds.data import load_examples, tokenize
    from lift_ds.recipe import load_task_data

    train_file, _ = assets.movie_review_sentiment()
    if args.workload == "classification":
        return load_task_data(str(train_file), None, "classification", tok, args.seq_len).train
    exs, _ = load_examples(train_file, "text")
    return tokenize(exs, tok, "text", args.seq_len)


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch._dynamo  # noqa: F401

    import lift_ds
    from lift_ds import assets
    from lift_ds.data import RankBatches
    from lift_ds.recipe import load_tokenizer

    method, _, backend = args.method.partition(":")[0].partition("-")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    model_dir = args.model or str(assets.smollm2_135m())
    tok = load_tokenizer(model_dir)
    data = load_data(args, tok)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    if args.method.partition(":")[0] in SINGLE:
        out = single_worker(args, model, data, tok)
        out.update(
            {
                "method": args.method,
                "rank": 0,
                "world": 1,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "tokens_per_s": args.micro_batch * args.seq_len / out["median_step_s"],
            }
        )
        Path(args.result).with_suffix(".rank0.json").write_text(json.dumps(out))
        return
    cfg = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": args.workload == "text"},
        "lift": {
            "backend": "fsdp" if backend == "fsdp" else "deepspeed",
            "total_steps": args.steps,
            "loss": loss_mode(args.method),
        },
    }
    if backend.startswith("zero"):
        cfg["zero_optimization"] = {"stage": int(backend[-1])}
        if backend == "zero3":
            cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 1e4
    fixed = None
    if method == "full":
        fixed = [n for n, _ in model.named_parameters()]
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0),
        )
        fixed = [n for n, p in model.named_parameters() if p.requires_grad]
    engine, *_ = lift_ds.initialize(
        model=model, config=cfg, optimizer=lambda ps: torch.optim.AdamW(ps, lr=args.lr), fixed_trainable=fixed
    )
    batches = RankBatches(data, args.micro_batch, rank, world, seed=0, pad_id=tok.pad_token_id)
    build_s = engine.phase_switch_seconds  # the first phase's build: not a switch
    switch_cpu = count_switch_cpu(engine)
    times, cpu_times, losses, states = [], [], [], []
    while not engine.done:
        b = batches.batch(engine.micro_steps)
        sw, sw_cpu = engine.phase_switch_seconds, switch_cpu[0]
        t0, c0 = time.perf_counter(), time.process_time()
        loss = engine(**b).loss
        engine.backward(loss)
        losses.append(loss.item())
        del loss
        census = 0.0
        if engine.global_step in (1, args.steps // 2):
            t_census = time.perf_counter()
            states.append(live_tensor_bytes())
            census = time.perf_counter() - t_census
        engine.step()
        times.append(time.perf_counter() - t0 - (engine.phase_switch_seconds - sw) - census)
        cpu_times.append(time.process_time() - c0 - (switch_cpu[0] - sw_cpu) - census)
        if engine.global_step in (2, args.steps // 2 + 1):
            states.append(live_tensor_bytes())
    out = {
        "method": args.method,
        "rank": rank,
        "world": world,
        "model_state_bytes": max(states) if states else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "median_step_s": statistics.median(times[1:]),
        "median_step_cpu_s": statistics.median(cpu_times[1:]),
        "tokens_per_s": args.micro_batch * args.seq_len * world / statistics.median(times[1:]),
        "switch_s": engine.phase_switch_seconds - build_s,
        "switches": engine.phase_switches - 1,
        "run_s": sum(times) + engine.phase_switch_seconds - build_s,
        "final_loss": statistics.mean(losses[-5:]),
        "losses": losses,
    }
    Path(args.result).with_suffix(f".rank{rank}.json").write_text(json.dumps(out))
    engine.close()


def orchestrate(args: argparse.Namespace) -> None:
    results = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="lift_bench_")) / "result"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for m in args.methods.split(","):
        base, _, suffix = m.partition(":")
        if base not in METHODS + SINGLE or suffix not in ("", "model"):
            raise SystemExit(
                f"error: --methods: {m!r} unknown; allowed: {', '.join(METHODS + SINGLE)}, each optionally with :model"
            )
        res = Path(f"{tmp}.{m.replace(':', '_')}")
        ranks = 1 if base in SINGLE else args.ranks
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(ranks),
            __file__,
            "--worker",
            "--method",
            m,
            "--result",
            str(res),
            "--steps",
            str(args.steps),
            "--seq_len",
            str(args.seq_len),
            "--micro_batch",
            str(args.micro_batch),
            "--lr",
            str(args.lr),
            "--fixed_layer",
            str(args.fixed_layer),
            "--workload",
            args.workload,
        ] + (["--model", args.model] if args.model else [])
        print(f"running {m} ...", flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
        if proc.returncode:
            print(proc.stderr[-3000:])
            raise SystemExit(f"{m} failed (exit {proc.returncode})")
        per_rank = [json.loads(res.with_suffix(f".rank{r}.json").read_text()) for r in range(ranks)]
        results[m] = {
            k: max(r[k] for r in per_rank) if isinstance(per_rank[0][k], (int, float)) else per_rank[0][k]
            for k in per_rank[0]
        }
        results[m]["wall_s"] = time.time() - t0
    from lift_ds.provenance import write_json

    write_json(args.out, {"args": vars(args), "results": results, "note": args.note})
    report(results, args)


def report(results: dict, args: argparse.Namespace) -> None:
    gib = 1024**3
    text = getattr(args, "workload", "text") == "text"
    print(
        f"\n{args.ranks} ranks, {'bf16 (fp32 master)' if text else 'fp32'}, "
        f"{'packed text' if text else 'classification'}, "
        f"micro batch {args.micro_batch} x {args.seq_len}, {args.steps} steps, AdamW lr {args.lr}\n"
    )
    print(
        "| method | model states / rank (GiB) | peak RSS / rank (GiB) | median step (s) "
        "| median step CPU (s) | tokens/s | phase switches (s, share) | loss, last 5 steps |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for m, r in results.items():
        share = r["switch_s"] / r["run_s"] if r["run_s"] else 0
        cpu = f"{r['median_step_cpu_s']:.3f}" if r.get("median_step_cpu_s") else "-"
        print(
            f"| {m} | {r['model_state_bytes'] / gib:.3f} | {r['peak_rss_bytes'] / gib:.2f} "
            f"| {r['median_step_s']:.3f} | {cpu} | {r['tokens_per_s']:.0f} | "
            f"{r['switch_s']:.1f} ({100 * share:.1f}%) | {r['final_loss']:.3f} |"
        )
    print()
    pairs = [
        ("lift-zero2", "full-zero2"),
        ("lift-zero3", "full-zero3"),
        ("lift-zero2", "lora-zero2"),
        ("lift-fsdp", "full-zero3"),
        ("lift-torch-fixed", "plain-fixed"),
        ("lift-bf16-fixed", "badam-fixed"),
        ("lift-bf16-switch", "badam-switch"),
        ("lift-zero2", "badam-switch"),
        ("lift-zero3", "badam-switch"),
    ]
    for a, b in pairs:
        if a in results and b in results:
            ra, rb = results[a], results[b]
            print(
                f"{b} / {a}: model states {rb['model_state_bytes'] / ra['model_state_bytes']:.2f}x, "
                f"peak RSS {rb['peak_rss_bytes'] / ra['peak_rss_bytes']:.2f}x, "
                f"step time {rb['median_step_s'] / ra['median_step_s']:.2f}x (median step, "
                f"switches excluded{_cpu_ratio(rb, ra)}), "
                f"whole run {rb['run_s'] / ra['run_s']:.2f}x (steps and phase switches)"
            )
    z2, z3 = results.get("lift-zero2"), results.get("lift-zero3")
    if z2 and z3 and z2["switches"] and z3["switches"]:
        a, b = 1000 * z3["switch_s"] / z3["switches"], 1000 * z2["switch_s"] / z2["switches"]
        print(f"per phase switch: lift-zero3 {a:.1f} ms, lift-zero2 {b:.1f} ms ({a / b:.2f}x)")
    for m in results:
        old = results.get(f"{m}:model")
        if old is None or ":" in m:
            continue
        new = results[m]
        diff = (
            max(abs(a - b) for a, b in zip(old["losses"], new["losses"]))
            if old.get("losses") and new.get("losses")
            else float("nan")
        )
        print(
            f"{m}, loss model / chunked: "
            f"step time {old['median_step_s'] / new['median_step_s']:.2f}x (median step), whole run "
            f"{old['run_s'] / new['run_s']:.2f}x{_cpu_ratio(old, new)}; "
            f"per-step losses differ by at most {diff:.2e} over "
            f"{len(new.get('losses', []))} steps"
        )
    for m in ("lift-bf16-switch", "badam-switch"):
        if m in results and results[m]["switches"]:
            print(f"{m}: {1000 * results[m]['switch_s'] / results[m]['switches']:.1f} ms per block switch")


def _cpu_ratio(a: dict, b: dict) -> str:
    """ ", CPU time X.XXx" of two results' median step CPU time (process time: what a loaded machine
    disturbs least), when both have it."""
    if a.get("median_step_cpu_s") and b.get("median_step_cpu_s"):
        return f"; CPU time {a['median_step_cpu_s'] / b['median_step_cpu_s']:.2f}x"
    return ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF directory (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seq_len", type=int, default=None, help="default: 64 (text), 128 (classification)")
    p.add_argument("--micro_batch", type=int, default=None, help="default: 2 (text), 8 (classification)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument(
        "--fixed_layer", type=int, default=0, help="the block of the *-fixed methods (default: the middle layer)"
    )
    p.add_argument(
        "--workload",
        default="text",
        choices=("text", "classification"),
        help="text: packed movie-review text, bf16 (the default); classification: the quickstart's shape, fp32",
    )
    p.add_argument("--note", default="", help="stored with the data (e.g. that the machine was shared)")
    p.add_argument("--out", default="outputs/benchmark.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument(
        "--report",
        default=None,
        metavar="JSON",
        help="print the table and ratios of a saved run (e.g. docs/benchmark.json); runs nothing",
    )
    args = p.parse_args()
    classification = args.workload == "classification"
    args.seq_len = args.seq_len or (128 if classification else 64)
    args.micro_batch = args.micro_batch or (8 if classification else 2)
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        prov = saved.get("provenance") or {}
        cpu = (prov.get("machine") or {}).get("cpu") or {}
        print(
            f"measured {prov.get('date', 'at an unrecorded date')}, commit {prov.get('commit', 'unrecorded')}, on "
            f"{cpu.get('model', 'an unrecorded CPU')} ({cpu.get('cores', '?')} cores, "
            f"flags {', '.join(cpu.get('flags') or []) or '-'})"
        )
        report(saved["results"], argparse.Namespace(**{**vars(args), **saved["args"]}))
    elif args.worker:
        worker(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
