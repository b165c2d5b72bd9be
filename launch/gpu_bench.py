#!/usr/bin/env python3
"""LIFT against LoRA and full fine-tuning on one GPU, each method in its own process.

    python launch/gpu_bench.py --out OUT/gpu_bench.json --md OUT/gpu_bench.md              # on the GPU machine
    python launch/gpu_bench.py --cpu-smoke --out /tmp/b.json --md /tmp/b.md                # tiny shapes on CPU (CI)

Shapes: Llama-3-8B (hidden 4096, 32 layers, vocab 128256; random init, bf16) at sequence 2048, micro
batch 1, gradient checkpointing; and SmolLM2-135M shapes at micro batch 16 (sequence 512). Methods:
LIFT on the torch backend, LIFT on one DeepSpeed ZeRO-2 rank (bf16 weights, fp32 master and AdamW for
the active block), LoRA r=16 on q/k/v/o (peft), full fine-tuning (bf16 weights, fp32 master and AdamW,
through lift_ds's torch backend with every parameter trainable). LIFT trains layers 1, 2, ... one step
each (cyclic over all layers): a phase switch at every step, and the first step back-propagates through
the whole network. Per method: peak device memory (``torch.cuda.max_memory_allocated`` / ``reserved``;
peak RSS on CPU), median step time and tokens/s after two warm-up steps, phase-switch time; an
out-of-memory error is a result ("oom"), not a crash. Q-LIFT (NF4) rows are added once that issue lands.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, max_position_embeddings=8192),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=2048),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=128),
}
METHODS = ("lift-torch", "lift-zero2", "lora-r16", "full")
#: (shape, micro batch, sequence, steps) per mode
PLANS = {
    "gpu": [("llama-3-8b", 1, 2048, 8), ("smollm2-135m", 16, 512, 8)],
    "cpu-smoke": [("tiny", 2, 32, 4)],
}


def build_model(shape: str, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape]))
    model.config.use_cache = False
    return model.to(torch.bfloat16)


def worker(args: argparse.Namespace) -> dict:
    import torch

    import lift_ds
    from lift_ds.api import enable_gradient_checkpointing
    from lift_ds.memory import peak_memory

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(args.shape, device)
    enable_gradient_checkpointing(model)
    model.train()
    layers = model.config.num_hidden_layers
    cfg = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_clipping": 1.0, "bf16": {"enabled": True},
           "lift": {"backend": "torch", "total_steps": args.steps, "policy": "cyclic", "layer_range": [1, layers]}}
    fixed = None
    if args.method == "lift-zero2":
        cfg["zero_optimization"] = {"stage": 2}
        cfg["lift"]["backend"] = "deepspeed"
    elif args.method == "full":
        fixed = [n for n, _ in model.named_parameters()]
    elif args.method == "lora-r16":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0))
        fixed = [n for n, p in model.named_parameters() if p.requires_grad]
    engine, *_ = lift_ds.initialize(model=model, config=cfg, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-5), fixed_trainable=fixed)
    build_s = engine.phase_switch_seconds
    g = torch.Generator().manual_seed(1)
    times, losses = [], []
    for _ in range(args.steps):
        ids = torch.randint(0, model.config.vocab_size, (args.micro_batch, args.seq_len), generator=g)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        del loss
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    measured = times[2:] if len(times) > 2 else times
    switches = max(engine.phase_switches - 1, 0)
    out = {"status": "ok", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", **peak_memory(),
           "median_step_s": statistics.median(measured), "tokens_per_s": args.micro_batch * args.seq_len / statistics.median(measured),
           "phase_switch_s_per_switch": (engine.phase_switch_seconds - build_s) / switches if switches else 0.0,
           "trainable_params": sum(p.numel() for n, p in model.named_parameters() if fixed is None or n in set(fixed)) if fixed else None,
           "first_loss": losses[0], "last_loss": losses[-1], "steps": args.steps}
    engine.close()
    return out


def run_method(args: argparse.Namespace, shape: str, method: str, micro_batch: int, seq_len: int, steps: int) -> dict:
    import tempfile

    result = Path(tempfile.gettempdir()) / f"lift_ds_gpu_bench.{os.getpid()}.{shape}.{method}.json"  # not next to --out: few files come back
    cmd = [sys.executable, __file__, "--worker", "--method", method, "--shape", shape, "--micro_batch", str(micro_batch),
           "--seq_len", str(seq_len), "--steps", str(steps), "--result", str(result)]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {args.timeout} s"}
    if result.is_file():
        out = json.loads(result.read_text())
    else:
        tail = (proc.stderr or "")[-1500:]
        out = {"status": "oom" if "out of memory" in tail.lower() else f"error (exit {proc.returncode})", "stderr_tail": tail}
    out["wall_s"] = time.time() - t0
    return out


def markdown(results: dict) -> str:
    lines = []
    for shape, rows in results.items():
        lines += [f"### {shape}", "", "| method | status | peak memory (GiB) | median step (s) | tokens/s | phase switch (s) | loss first -> last |", "|---|---|---|---|---|---|---|"]
        for m, r in rows.items():
            mem = r.get("peak_cuda_allocated_gib", r.get("peak_rss_gib"))
            kind = "allocated" if "peak_cuda_allocated_gib" in r else "RSS"
            cells = [m, r["status"], f"{mem:.2f} ({kind})" if mem is not None else "-", f"{r['median_step_s']:.3f}" if "median_step_s" in r else "-",
                     f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "-",
                     f"{r['phase_switch_s_per_switch']:.3f}" if "phase_switch_s_per_switch" in r else "-",
                     f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}" if "first_loss" in r else "-"]
            lines.append("| " + " | ".join(cells) + " |")
        ok = {m: r for m, r in rows.items() if r["status"] == "ok"}
        for other in ("full", "lora-r16"):
            for lift in ("lift-torch", "lift-zero2"):
                if other in ok and lift in ok:
                    lines.append(f"\ntokens/s {lift} / {other}: {ok[lift]['tokens_per_s'] / ok[other]['tokens_per_s']:.2f}x")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, every code path (CI runs this)")
    p.add_argument("--out", default="outputs/gpu_bench.json")
    p.add_argument("--md", default=None, help="also write the markdown table here")
    p.add_argument("--timeout", type=int, default=240, help="seconds per method")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for a in ("--method", "--shape", "--result"):
        p.add_argument(a, help=argparse.SUPPRESS)
    for a in ("--micro_batch", "--seq_len", "--steps"):
        p.add_argument(a, type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        try:
            out = worker(args)
        except Exception as e:  # noqa: BLE001 - recorded as the method's result
            import torch

            oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
            out = {"status": "oom" if oom else f"error: {type(e).__name__}: {str(e)[:300]}", "traceback": traceback.format_exc()[-1500:]}
            if torch.cuda.is_available():
                from lift_ds.memory import peak_memory

                out.update(peak_memory())
        Path(args.result).write_text(json.dumps(out, indent=1))
        return 0
    mode = "cpu-smoke" if args.cpu_smoke else "gpu"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    for shape, mb, seq, steps in PLANS[mode]:
        results[shape] = {}
        for m in METHODS:
            print(f"{shape} {m} ...", flush=True)
            results[shape][m] = run_method(args, shape, m, mb, seq, steps)
            print(f"  {results[shape][m]['status']}", flush=True)
    Path(args.out).write_text(json.dumps({"mode": mode, "results": results}, indent=1))
    table = markdown(results)
    print(table)
    if args.md:
        Path(args.md).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
