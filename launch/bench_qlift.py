"""Q-LIFT on the quickstart's task, side by side: frozen weights full / int8 / nf4, one process.

    python launch/bench_qlift.py --out docs/qlift/quickstart_qlift.json [--max_steps 150] \
        [--modes full,int8,nf4,nf4_cached] [--interleave] [--cache_mb 4096]

Each mode runs the quickstart (SmolLM2-135M-Instruct, movie-review sentiment, ds_configs/quickstart_cpu.json:
AdamW 1e-4, WarmupDecayLR, clipping 1.0, front2end, grouped) on the single-process torch backend with the
quickstart's global batch (16), the same seed and the same steps. Per mode it reports: held-out accuracy
before training (full-precision model, and through the quantized layers), after training (through the
quantized layers: what the run sees) and of the exported model (full precision, loaded with
from_pretrained), mean step time after the first phase, and the census of the frozen layers' live bytes
(quantized against the same weights in bf16).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def start_mode(mode: str, args, tok, data, model_dir: str) -> tuple:
    """An engine for one mode, and its evaluation through the quantized layers before training."""
    import lift_ds
    from lift_ds.data import RankBatches
    from lift_ds.memory import live_tensor_bytes
    from lift_ds.recipe import build_model, held_out_metrics

    cfg = json.loads((REPO / "ds_configs" / "quickstart_cpu.json").read_text())
    cfg.pop("zero_optimization")
    cfg["train_micro_batch_size_per_gpu"] = 16  # the quickstart's global batch: 8 per rank x 2 ranks
    quant, _, cached = mode.partition("_")  # "nf4_cached": NF4 with dense copies of every frozen layer
    if cached not in ("", "cached"):
        raise SystemExit(f"--modes: {mode!r}; allowed: full, int8, nf4, int8_cached, nf4_cached")
    cfg["lift"].update(backend="torch", total_steps=args.max_steps, frozen_weights=quant)
    if cached:
        cfg["lift"]["frozen_cache_mb"] = args.cache_mb
    model = build_model(model_dir, seed=0)
    engine, _, _, _ = lift_ds.initialize(model=model, config=cfg)
    batches = RankBatches(data.train, 16, 0, 1, seed=0, pad_id=tok.pad_token_id)
    out: dict = {"mode": mode, "steps_log": []}
    # before training, every layer quantized (the first active one too)
    if engine.quant is not None and not args.skip_eval:
        first = engine.active_block
        engine.quant.deactivate(first)
        out["before_quantized"] = held_out_metrics(engine.module, data, tok, args.seq_len, 16)
        out["census"] = {**engine.quant.bytes(), "live_tensor_bytes": live_tensor_bytes()}
        engine.quant.activate(first)
    engine.train()
    return engine, batches, out


def one_step(engine, batches, out: dict) -> None:
    from lift_ds.recipe import optimizer_step

    t = time.perf_counter()
    phase = engine.cursor.phase.index
    loss, _ = optimizer_step(engine, batches)
    out["steps_log"].append((phase, time.perf_counter() - t, loss))


def finish_mode(engine, out: dict, args, data, tok) -> dict:
    from lift_ds.memory import peak_memory
    from lift_ds.recipe import evaluate, held_out_metrics

    steps = out.pop("steps_log")
    if not args.skip_eval:
        out["after_through_engine"] = evaluate(engine, data, tok, args.seq_len, 16)
    later = [dt for ph, dt, _ in steps if ph > 0]
    out.update(
        step_seconds_mean=statistics.mean(later),
        step_seconds_median=statistics.median(later),
        phase_switch_seconds=engine.phase_switch_seconds,
        first_losses=[s[2] for s in steps[:5]],
        last_losses=[s[2] for s in steps[-5:]],
        **peak_memory(),
    )
    from transformers import AutoModelForCausalLM

    from lift_ds.export import save_hf_checkpoint

    with tempfile.TemporaryDirectory() as d:
        save_hf_checkpoint(engine, d)
        engine.close()
        if not args.skip_eval:
            exported = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
            exported.eval()
            out["after_exported"] = held_out_metrics(exported, data, tok, args.seq_len, 16)
    return out


def run_mode(mode: str, args, tok, data, model_dir: str) -> dict:
    engine, batches, out = start_mode(mode, args, tok, data, model_dir)
    while not engine.done:
        one_step(engine, batches, out)
    return finish_mode(engine, out, args, data, tok)


def run_interleaved(modes: list[str], args, tok, data, model_dir: str) -> dict:
    """Every mode's engine at once, stepped in turn (one optimizer step each): a machine shared with
    other work slows every mode alike, so the step-time ratios hold."""
    runs = {m: start_mode(m, args, tok, data, model_dir) for m in modes}
    while not all(e.done for e, _, _ in runs.values()):
        for engine, batches, out in runs.values():
            if not engine.done:
                one_step(engine, batches, out)
    return {m: finish_mode(e, out, args, data, tok) for m, (e, _, out) in runs.items()}


def _commit() -> str:
    import subprocess

    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--max_steps", type=int, default=150)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--modes", default="full,int8,nf4")
    p.add_argument(
        "--interleave", action="store_true", help="step every mode's engine in turn (ratios robust to a shared machine)"
    )
    p.add_argument("--skip_eval", action="store_true", help="time only: no held-out evaluation")
    p.add_argument(
        "--cache_mb", type=int, default=4096, help="lift.frozen_cache_mb of the *_cached modes (default: all layers)"
    )
    args = p.parse_args()
    from lift_ds import assets
    from lift_ds.backends.hardware import cpu_model
    from lift_ds.recipe import build_model, held_out_metrics, load_task_data, load_tokenizer

    model_dir = str(assets.smollm2_135m())
    train_path, eval_path = (str(x) for x in assets.movie_review_sentiment())
    tok = load_tokenizer(model_dir)
    data = load_task_data(train_path, eval_path, "classification", tok, args.seq_len)
    base = build_model(model_dir, seed=0).eval()
    record = {
        "before_full_precision": {} if args.skip_eval else held_out_metrics(base, data, tok, args.seq_len, 16),
        "modes": {},
        "interleaved": args.interleave,
    }
    del base
    if args.interleave:
        record["modes"] = run_interleaved(args.modes.split(","), args, tok, data, model_dir)
    for mode in [] if args.interleave else args.modes.split(","):
        t0 = time.perf_counter()
        record["modes"][mode] = run_mode(mode, args, tok, data, model_dir)
        record["modes"][mode]["wall_seconds"] = time.perf_counter() - t0
        print(json.dumps({mode: record["modes"][mode]}, default=str), flush=True)
    record.update(
        steps=args.max_steps,
        load_average_at_end=os.getloadavg(),
        commit=_commit(),
        eval_items=len(data.held_examples or []),
        torch_threads=torch.get_num_threads(),
        machine={"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
        finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command="python " + " ".join(sys.argv),
    )
    from lift_ds.provenance import write_json

    write_json(args.out, record)
    full = record["modes"].get("full")
    print(f"{'mode':6} {'before(q)':>9} {'after(q)':>9} {'exported':>9} {'step s':>7} {'frozen bytes vs bf16':>20}")
    for mode, r in record["modes"].items():
        c = r.get("census")
        ratio = f"{c['quantized_bytes'] / c['bf16_bytes']:.3f}x" if c else "-"
        acc = lambda d: d.get("eval_accuracy", float("nan"))  # noqa: E731
        print(
            f"{mode:6} {acc(r.get('before_quantized', record['before_full_precision'])):9.3f} "
            f"{acc(r.get('after_through_engine', {})):9.3f} {acc(r.get('after_exported', {})):9.3f} "
            f"{r['step_seconds_mean']:7.2f} {ratio:>20}"
            + (f"  step time {r['step_seconds_mean'] / full['step_seconds_mean']:.2f}x full" if full else "")
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
