#!/usr/bin/env python3
"""LIFT against full fine-tuning and LoRA on one GPU: one row per method, each in its own process.

    python launch/gpu_bench.py --out OUT/gpu_bench.json --md OUT/gpu_bench.md --budget 400   # GPU machine
    python launch/gpu_bench.py --cpu-smoke --out /tmp/b.json --md /tmp/b.md                # CI: tiny shapes, CPU
    python launch/gpu_bench.py --list                                                        # the rows, in order

What a row measures (every row: bf16 weights, random init, random tokens, sequence 2048 and micro batch 1
on the GPU, non-reentrant gradient checkpointing, AdamW lr 1e-5, gradient clipping 1.0):

- The model is built directly in bf16 on the device (never an fp32 copy), then the engine; the build's
  own peak memory is reported apart (``build_*``), the allocator is emptied and its peak statistics reset,
  and ``step_peak_*`` is the peak of the timed steps alone (``torch.cuda.max_memory_allocated`` /
  ``max_memory_reserved``; on CPU the peak RSS, reset through ``/proc/self/clear_refs``).
- ``lift-steady``: LIFT in a grouped plan over three middle layers, several steps each; the median of the
  steps that neither start a phase nor contain a switch, the first phase excluded (warm-up). ``lift-average``:
  every layer of the stack (front2end, grouped, ``--average_steps`` each), wall time of all steps and all
  switches divided by the steps: the run average a user sees at that phase length (the per-switch time is
  reported too, so other phase lengths follow).
- ``full-bf16``: full fine-tuning the way one GPU fits an 8B model: a plain PyTorch loop, bf16 weights and
  gradients and torch's AdamW with its states in bf16 (no fp32 master; cf. torchtune's single-device
  recipe, which fits it with bf16 and a low-memory optimizer). ``full-exact``: the same recipe as LIFT
  (bf16 weights, fp32 master and AdamW for everything) at Llama-3.2-3B shapes, where it fits, beside
  ``lift-*-3b`` at the same shape: those ratios are like for like.
- ``lora``: LoRA r=16 on q/k/v/o (peft) through lift_ds; ``qlift-nf4`` / ``qlift-int8``: LIFT steady with
  the frozen layers quantized (``lift.frozen_weights``; torchao).

Rows run in priority order while the budget (``--budget``) lasts, each capped at ``--row_timeout``; each row
is appended to the JSON as soon as it ends (an out-of-memory error is a result, ``oom``). A row that needs
a lift key this commit lacks (``requires``) is recorded ``unavailable`` on the GPU and, so its code path
runs, run without that key in the CPU smoke mode. To add a row (e.g. a new loss, issue 27), append a
:class:`Row` to :data:`ROWS` with its lift keys and ``requires``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    "llama-3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
    "llama-3.2-3b": dict(
        vocab_size=128256,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    "llama-3-70b": dict(
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
    # the CPU smoke mode's stand-ins: the same code paths (tied embeddings where the real shape has them)
    "tiny": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    ),
    "tiny-tied": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    ),
}
SMOKE_SHAPE = {"llama-3-8b": "tiny", "llama-3.2-3b": "tiny-tied", "llama-3-70b": "tiny"}
#: (micro batch, sequence, steps per block in a steady phase, steps per layer in the average, steps of a fixed row)
SIZES = {"gpu": (1, 2048, 4, 2, 6), "cpu-smoke": (1, 32, 3, 1, 3)}


@dataclass(frozen=True)
class Row:
    """One measurement, one process. ``kind``: lift | lora | full-exact (lift_ds, every parameter, fp32
    master) | full-bf16 (a plain loop, bf16 AdamW states). ``timing``: steady | average | fixed."""

    name: str
    shape: str
    kind: str
    timing: str
    what: str
    lift: dict = field(default_factory=dict)
    backend: str = "torch"
    requires: tuple[str, ...] = ()
    build: str = (
        "device"  # device: bf16 straight on the device; layerwise: Q-LIFT's layer-by-layer build (lift_ds.quant_load)
    )


ROWS = (
    Row(
        "lift-steady",
        "llama-3-8b",
        "lift",
        "steady",
        "LIFT, steady state in a grouped phase (middle layers; switches excluded)",
    ),
    Row(
        "full-bf16",
        "llama-3-8b",
        "full-bf16",
        "fixed",
        "full FT as one GPU runs it: plain loop, bf16 weights/grads/AdamW states, no fp32 master",
    ),
    Row("lora", "llama-3-8b", "lora", "fixed", "LoRA r=16 on q/k/v/o (peft), bf16 base, fp32 master for the adapters"),
    Row(
        "qlift-nf4",
        "llama-3-8b",
        "lift",
        "steady",
        "Q-LIFT: frozen layers NF4 (torchao), steady state",
        lift={"frozen_weights": "nf4"},
    ),
    Row("lift-average", "llama-3-8b", "lift", "average", "LIFT run average: every layer, switches included"),
    Row(
        "full-exact-3b",
        "llama-3.2-3b",
        "full-exact",
        "fixed",
        "full FT, LIFT's recipe (bf16 + fp32 master + AdamW), where it fits",
    ),
    Row(
        "lift-steady-3b",
        "llama-3.2-3b",
        "lift",
        "steady",
        "LIFT steady state at the 3B shape (like for like with full-exact-3b)",
    ),
    Row("lift-average-3b", "llama-3.2-3b", "lift", "average", "LIFT run average at the 3B shape, switches included"),
    Row(
        "qlift-int8",
        "llama-3-8b",
        "lift",
        "steady",
        "Q-LIFT: frozen layers int8 (torchao), steady state",
        lift={"frozen_weights": "int8"},
    ),
    Row(
        "lift-zero2-steady",
        "llama-3-8b",
        "lift",
        "steady",
        "LIFT steady state on one DeepSpeed ZeRO-2 rank",
        backend="deepspeed",
    ),
    # issue 29: a Llama-3-70B-shaped model, NF4, frozen layers streamed, built layer by layer
    Row(
        "qlift-nf4-stream-70b",
        "llama-3-70b",
        "lift",
        "steady",
        "Q-LIFT NF4 with streamed frozen layers at Llama-3-70B shapes",
        lift={"frozen_weights": "nf4", "stream_frozen": True},
        requires=("stream_frozen",),
        build="layerwise",
    ),
)
ROW_BY_NAME = {r.name: r for r in ROWS}


# --------------------------------------------------------------------------- the device


class Device:
    """Synchronisation and peak memory on CUDA, or their CPU stand-ins (peak RSS via clear_refs)."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.cuda = torch.cuda.is_available()
        self.name = "cuda" if self.cuda else "cpu"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def peak(self, prefix: str) -> dict[str, float]:
        gib = 2**30
        if self.cuda:
            return {
                f"{prefix}_peak_allocated_gib": self.torch.cuda.max_memory_allocated() / gib,
                f"{prefix}_peak_reserved_gib": self.torch.cuda.max_memory_reserved() / gib,
            }
        hwm = next(
            (int(x.split()[1]) for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:")), 0
        )
        return {f"{prefix}_peak_rss_gib": hwm / 2**20}

    def reset_peak(self) -> bool:
        """Forget the peak so far (the build's); True where the platform allows it."""
        import gc

        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()
            return True
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            return True
        except OSError:
            return False


def build_model(shape: str, device: str, build: str, stream: bool = False):
    """A random-init LLaMA of ``shape`` in bf16, created on ``device`` directly (``layerwise``: on the
    host, layer by layer, frozen layers NF4, through lift_ds.quant_load; ``stream``: their weights in
    per-layer files, streamed, as ``lift.stream_frozen`` needs)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape])
    torch.manual_seed(0)
    if build == "layerwise":
        from lift_ds.quant import BlockStore, make_streamer
        from lift_ds.quant_load import build_quantized_model

        store = BlockStore("disk", tempfile.mkdtemp(prefix="lift_gpu_bench_store_"))
        model = build_quantized_model(
            "unused",
            "nf4",
            store,
            random_init=True,
            config=config,
            dtype=torch.bfloat16,
            streamer=make_streamer(None) if stream else None,
        )
    else:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(device):
                model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
    model.config.use_cache = False
    return model


def make_engine(row: Row, model, steps: int, device: str):
    """(engine or None, plain optimizer or None, trainable parameter count) for ``row``."""
    import torch

    import lift_ds
    from lift_ds.blocks import enable_gradient_checkpointing

    layers = model.config.num_hidden_layers
    adamw = lambda ps: torch.optim.AdamW(ps, lr=1e-5, fused=device == "cuda")  # noqa: E731  (no DeepSpeed op: nothing compiles)
    if row.kind == "full-bf16":
        enable_gradient_checkpointing(model)
        params = list(model.parameters())
        return None, adamw(params), sum(p.numel() for p in params)
    lift = {"backend": row.backend, "total_steps": steps, "gradient_checkpointing": True, **row.lift}
    if row.timing == "steady":
        mid = layers // 2
        lift.update(layer_range=[mid - 1, mid + 1], policy="grouped")
    elif row.timing == "average":
        lift.update(layer_range=[1, layers], policy="grouped", schedule="front2end")
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 1.0, "bf16": {"enabled": True}, "lift": lift}
    if row.backend == "deepspeed":
        cfg["zero_optimization"] = {"stage": 2}
    fixed = None
    if row.kind == "full-exact":
        fixed = [n for n, _ in model.named_parameters()]
    elif row.kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0),
        )
        fixed = [n for n, p in model.named_parameters() if p.requires_grad]
    engine, *_ = lift_ds.initialize(model=model, config=cfg, optimizer=adamw, fixed_trainable=fixed)
    # what trains in the first phase (every phase of these plans trains a block of the same shape)
    return engine, None, sum(p.numel() for p in model.parameters() if p.requires_grad)


def worker(args: argparse.Namespace) -> dict:
    """Build, reset the peak, run the row's steps; what the row reports."""
    import torch

    row = ROW_BY_NAME[args.row]
    if args.drop_requires:
        row = replace(row, lift={k: v for k, v in row.lift.items() if k not in row.requires})
    dev = Device()
    mb, seq = args.micro_batch, args.seq_len
    t0 = time.perf_counter()
    model = build_model(args.shape, dev.name, row.build, stream=bool(row.lift.get("stream_frozen")))
    built_dtypes = sorted({str(p.dtype) for p in model.parameters()})  # bf16 from the start, never an fp32 copy
    layers = model.config.num_hidden_layers
    steps = {"steady": 3 * args.block_steps, "average": layers * args.average_steps, "fixed": args.fixed_steps}[
        row.timing
    ]
    engine, plain_opt, trained = make_engine(row, model, steps, dev.name)
    model = engine.module if engine is not None else model
    model.train()
    dev.sync()
    out: dict = {
        "status": "ok",
        "device": torch.cuda.get_device_name() if dev.cuda else "cpu",
        "shape": args.shape,
        "micro_batch": mb,
        "seq_len": seq,
        "steps": steps,
        "trainable_params": trained,
        # Q-LIFT's quantized weights are buffers: counted by their shapes
        "total_params": sum(p.numel() for p in model.parameters())
        + sum(m.in_features * m.out_features for m in model.modules() if hasattr(m, "qweight")),
        "built_dtypes": built_dtypes,
        "build_s": time.perf_counter() - t0,
        **dev.peak("build"),
    }
    out["step_peak_reset"] = dev.reset_peak()
    g = torch.Generator(device=dev.name).manual_seed(1)
    batch = lambda: torch.randint(0, model.config.vocab_size, (mb, seq), generator=g, device=dev.name)  # noqa: E731
    with torch.no_grad():  # warm-up: kernels and allocator, outside the timed steps
        model(input_ids=batch(), labels=None)
    records = []
    dev.sync()
    t_run = time.perf_counter()
    for _ in range(steps):
        ids = batch()
        first = engine is not None and engine.cursor.phase.start == engine.global_step
        phase = engine.cursor.phase.index if engine is not None else 0
        switches, switch_s = (engine.phase_switches, engine.phase_switch_seconds) if engine is not None else (0, 0.0)
        t = time.perf_counter()
        if engine is not None:
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
        else:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            plain_opt.step()
            plain_opt.zero_grad(set_to_none=True)
        value = loss.item()
        del loss
        dev.sync()
        seconds = time.perf_counter() - t
        switched = engine is not None and engine.phase_switches > switches
        records.append(
            {
                "seconds": seconds,
                "first_of_phase": first,
                "phase": phase,
                "switched": switched,
                "loss": value,
                "switch_s": (engine.phase_switch_seconds - switch_s) if engine is not None else 0.0,
            }
        )
    run_s = time.perf_counter() - t_run
    out.update(dev.peak("step"))
    out.update(summarize(row, records, run_s, mb * seq))
    if engine is not None:
        engine.close()
    return out


def summarize(row: Row, records: list[dict], run_s: float, tokens: int) -> dict:
    """The row's step time by its timing mode, tokens/s, the switches, the losses."""
    if row.timing == "steady":
        clean = [r["seconds"] for r in records if r["phase"] > 0 and not r["first_of_phase"] and not r["switched"]]
        step = statistics.median(clean)
        extra = {
            "timed_steps": len(clean),
            "first_of_phase_s": statistics.median([r["seconds"] for r in records if r["first_of_phase"]]),
        }
    elif row.timing == "average":
        step = run_s / len(records)
        extra = {
            "mean_step_excl_switch_s": statistics.mean(r["seconds"] - r["switch_s"] for r in records),
            "phase_length": sum(1 for r in records if r["phase"] == 0),
        }
    else:
        step = statistics.median(r["seconds"] for r in records[1:])
        extra = {"timed_steps": len(records) - 1}
    switches = [r["switch_s"] for r in records if r["switched"]]
    return {
        "step_s": step,
        "tokens_per_s": tokens / step,
        "run_s": run_s,
        "switches": len(switches),
        "switch_s_per_switch": statistics.mean(switches) if switches else None,
        "first_loss": records[0]["loss"],
        "last_loss": records[-1]["loss"],
        **extra,
    }


# --------------------------------------------------------------------------- the orchestrator


def missing_requirements(row: Row) -> list[str]:
    """Lift keys ``row`` needs that this commit's LiftConfig does not declare."""
    from lift_ds.config import lift_settings

    declared = {f.name for f in lift_settings()}
    return [k for k in row.requires if k not in declared]


def run_row(row: Row, mode: str, timeout: float, drop_requires: bool) -> dict:
    mb, seq, block_steps, average_steps, fixed_steps = SIZES[mode]
    shape = SMOKE_SHAPE[row.shape] if mode == "cpu-smoke" else row.shape
    # not in OUT: few files come back
    result = Path(tempfile.gettempdir()) / f"lift_ds_gpu_bench.{os.getpid()}.{row.name}.json"
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--row",
        row.name,
        "--shape",
        shape,
        "--micro_batch",
        str(mb),
        "--seq_len",
        str(seq),
        "--block_steps",
        str(block_steps),
        "--average_steps",
        str(average_steps),
        "--fixed_steps",
        str(fixed_steps),
        "--result",
        str(result),
    ] + (["--drop_requires"] if drop_requires else [])
    t0 = time.time()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or "")[-1500:]
        return {"status": f"timeout after {timeout:.0f} s", "stderr_tail": tail, "wall_s": time.time() - t0}
    if result.is_file():
        out = json.loads(result.read_text())
        result.unlink()
    else:
        tail = (proc.stderr or "")[-1500:]
        out = {
            "status": "oom" if "out of memory" in tail.lower() else f"error (exit {proc.returncode})",
            "stderr_tail": tail,
        }
    out["wall_s"] = time.time() - t0
    return out


def environment(mode: str) -> dict:
    """Provenance (machine, date, commit, versions) plus the CUDA build torch reports."""
    import torch

    from lift_ds.provenance import provenance

    return {**provenance(), "mode": mode, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}


def markdown(record: dict) -> str:
    env = record["environment"]
    gpus = ", ".join(f"{g['name']} (driver {g['driver']})" for g in env["machine"]["gpus"]) or "no GPU"
    lines = [
        f"{record['mode']} run, {env['date']}, commit {env['commit']}{' (dirty)' if env.get('dirty') else ''}, {gpus}, "
        f"torch {env['versions']['torch']} (CUDA {env['torch_cuda']}), deepspeed {env['versions']['deepspeed']}",
        "",
        (
            "| row | shape | status | step peak alloc / reserved (GiB) "
            "| build peak (GiB) | step (s) | tokens/s | switch (s) | loss first -> last |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    f = lambda r, k, fmt: format(r[k], fmt) if r.get(k) is not None else "-"  # noqa: E731
    for name, r in record["rows"].items():
        mem = (
            f"{f(r, 'step_peak_allocated_gib', '.2f')} / {f(r, 'step_peak_reserved_gib', '.2f')}"
            if "step_peak_allocated_gib" in r
            else f"{f(r, 'step_peak_rss_gib', '.2f')} (RSS)"
        )
        build = (
            f(r, "build_peak_allocated_gib", ".2f")
            if "build_peak_allocated_gib" in r
            else f(r, "build_peak_rss_gib", ".2f")
        )
        loss = f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}" if "first_loss" in r else "-"
        lines.append(
            f"| {name} | {r.get('shape', '-')} | {r['status']} | {mem} | {build} | {f(r, 'step_s', '.3f')} | "
            f"{f(r, 'tokens_per_s', '.0f')} | {f(r, 'switch_s_per_switch', '.3f')} | {loss} |"
        )
    lines.append("")
    for a, b in RATIOS:
        ra, rb = record["rows"].get(a, {}), record["rows"].get(b, {})
        if ra.get("status") == "ok" and rb.get("status") == "ok":
            lines.append(f"- tokens/s {a} / {b}: {ra['tokens_per_s'] / rb['tokens_per_s']:.2f}x")
    return "\n".join(lines) + "\n"


#: (numerator, denominator) of the tokens/s ratios printed under the table
RATIOS = (
    ("lift-steady", "full-bf16"),
    ("lift-average", "full-bf16"),
    ("lift-steady", "lora"),
    ("lift-average", "lora"),
    ("lift-steady-3b", "full-exact-3b"),
    ("lift-average-3b", "full-exact-3b"),
    ("qlift-nf4", "lift-steady"),
    ("qlift-int8", "lift-steady"),
)


def orchestrate(args: argparse.Namespace) -> int:
    import torch

    mode = "cpu-smoke" if args.cpu_smoke else "gpu"
    if mode == "gpu" and not torch.cuda.is_available():
        print("error: no CUDA device; use --cpu-smoke for the CPU run of the same code paths", file=sys.stderr)
        return 2
    rows = [ROW_BY_NAME[n] for n in args.rows.split(",")] if args.rows else list(ROWS)
    t_end = time.time() + args.budget
    record = {
        "mode": mode,
        "budget_s": args.budget,
        "row_timeout_s": args.row_timeout,
        "complete": False,
        "environment": environment(mode),
        "rows": {},
    }
    from lift_ds.provenance import write_json

    for row in rows:
        left = t_end - time.time()
        missing = missing_requirements(row)
        if missing and mode == "gpu":
            r = {
                "status": f"unavailable: needs lift.{', lift.'.join(missing)} (not declared at this commit)",
                "what": row.what,
            }
        elif left < args.min_row_s:
            r = {
                "status": f"not run: {left:.0f} s of the budget left (a row needs {args.min_row_s} s)",
                "what": row.what,
            }
        else:
            print(f"{row.name} ({row.shape}) ...", flush=True)
            r = {"what": row.what, **run_row(row, mode, min(args.row_timeout, left), bool(missing))}
            if missing:
                r["note"] = (
                    f"run without lift.{', lift.'.join(missing)} (not declared at this commit): the code path only"
                )
        r.update(kind=row.kind, timing=row.timing, backend=row.backend)
        record["rows"][row.name] = r
        print(
            f"  {r['status']}"
            + (
                f": {r.get('step_s', 0):.3f} s/step, {r.get('tokens_per_s', 0):.0f} tokens/s"
                if r["status"] == "ok"
                else ""
            ),
            flush=True,
        )
        write_json(args.out, record)  # each row as soon as it ends: a cut run keeps the rows done
        if args.md:
            Path(args.md).write_text(markdown(record))
    record["complete"] = True
    write_json(args.out, record)
    print(markdown(record))
    if args.md:
        Path(args.md).write_text(markdown(record))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, every code path (CI runs this)")
    p.add_argument("--out", default="outputs/gpu_bench.json")
    p.add_argument("--md", default=None, help="also write the markdown table here")
    p.add_argument("--budget", type=float, default=400, help="seconds for all rows together")
    p.add_argument("--row_timeout", type=float, default=150, help="seconds per row at most")
    p.add_argument("--min_row_s", type=float, default=40, help="do not start a row with less budget left than this")
    p.add_argument("--rows", default=None, help="comma-separated row names (default: all, in priority order)")
    p.add_argument("--list", action="store_true", help="print the rows and exit")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--drop_requires", action="store_true", help=argparse.SUPPRESS)
    for a in ("--row", "--shape", "--result"):
        p.add_argument(a, help=argparse.SUPPRESS)
    for a in ("--micro_batch", "--seq_len", "--block_steps", "--average_steps", "--fixed_steps"):
        p.add_argument(a, type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.list:
        for r in ROWS:
            print(
                f"{r.name:24s} {r.shape:14s} {r.kind:10s} {r.timing:8s} {r.what}"
                + (f"  [needs lift.{', '.join(r.requires)}]" if r.requires else "")
            )
        return 0
    if not args.worker:
        return orchestrate(args)
    try:
        out = worker(args)
    except Exception as e:  # noqa: BLE001 - recorded as the row's result
        import torch

        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
        out = {
            "status": "oom" if oom else f"error: {type(e).__name__}: {str(e)[:300]}",
            "traceback": traceback.format_exc()[-1500:],
        }
        if torch.cuda.is_available():
            out.update(Device().peak("at_failure"))
    Path(args.result).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
