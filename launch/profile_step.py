#!/usr/bin/env python3
"""Where a LIFT step's time goes: per phase of the step, on SmolLM2-135M, 1 and 2 ranks.

    python launch/profile_step.py --out docs/profile/step_profile.json                # every case below
    python launch/profile_step.py --cases text:2,text:1x2 --steps 12 --out /tmp/p.json

A case is ``WORKLOAD:RANKS``. Workloads: ``classification`` (the quickstart's shape:
ds_configs/quickstart_cpu.json, ZeRO-2 fp32, micro batch 8, movie reviews with the label word as the only
trained tokens, seq_len 128) and ``text`` (launch/benchmark.py's shape: ZeRO-2 bf16 with fp32 master,
micro batch 2 x 64 tokens of packed movie-review text). RANKS is ``1``, ``2`` (one torchrun job), or
``1x2`` (two independent one-rank jobs at the same time: the same per-core load as 2 ranks, without any
communication). Every case trains one fixed block (``--layer``, default the middle layer 15 of 30) so no
phase switch falls inside the measured steps; ``--switch`` instead switches at every step over all 30
layers (the benchmark's lift-zero2 schedule), each measured step the first of a fresh engine.

Per step and rank the worker splits the wall time (CPU work is synchronous, so timers are exact) into
exclusive parts: forward of the embedding, of the layers below the active one (prefix, no autograd),
of the active layer and those above (suffix), of the final norm, of the head (lm_head) and of the loss;
backward through the loss and head (until the gradient reaches the final hidden states) and through the
layers; the optimizer step; lift_ds's guards (the NaN/inf check: its per-step all-reduced flag) and
learning-rate bookkeeping; collectives (every torch.distributed call, waiting for the other rank
included), and what is left. Then a torch.profiler pass over a few steps gives the top operators.
Medians over the measured steps are written with the machine, date and commit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORKLOADS = ("classification", "text")
COLLECTIVES = (
    "all_reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_gather",
    "all_gather_into_tensor",
    "broadcast",
    "barrier",
    "reduce",
    "all_to_all_single",
)


class Spans:
    """Exclusive wall time per named part: a nested span's time is taken out of its parent's."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []  # [name, start, child seconds]
        self.enabled = True

    def push(self, name: str) -> None:
        if self.enabled:
            self._stack.append([name, time.perf_counter(), 0.0])

    def pop(self) -> None:
        if not self.enabled or not self._stack:
            return
        name, t0, child = self._stack.pop()
        dt = time.perf_counter() - t0
        self.total[name] += dt - child
        if self._stack:
            self._stack[-1][2] += dt

    def add(self, name: str, seconds: float) -> None:
        """Move ``seconds`` of the current span into ``name`` (a part measured inside it)."""
        self.total[name] += seconds
        if self._stack:
            self.total[self._stack[-1][0]] -= seconds

    @contextlib.contextmanager
    def span(self, name: str):
        self.push(name)
        try:
            yield
        finally:
            self.pop()

    def take(self) -> dict[str, float]:
        out, self.total = dict(self.total), defaultdict(float)
        return out


def wrap(obj, attr: str, spans: Spans, name: str) -> None:
    fn = getattr(obj, attr)

    def timed(*a, **k):
        with spans.span(name):
            return fn(*a, **k)

    setattr(obj, attr, timed)


def instrument(engine, model, spans: Spans, active: dict) -> None:
    """Hooks and wrappers that put every part of a step into ``spans`` (see the module docstring)."""
    import torch.distributed as dist

    from lift_ds.blocks import find_layer_stack

    for name in COLLECTIVES:
        if hasattr(dist, name):
            wrap(dist, name, spans, "collectives")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _, stack = find_layer_stack(base)
    parts = [(base.get_input_embeddings(), "fwd.embedding"), (base.get_output_embeddings(), "fwd.head")]
    # below the active layer: the prefix (no autograd); the active one and above: the suffix
    for i, layer in enumerate(stack):
        layer.register_forward_pre_hook(
            lambda m, a, i=i: spans.push("fwd.prefix_layers" if i < active["index"] else "fwd.suffix_layers")
        )
        layer.register_forward_hook(lambda m, a, o: spans.pop())
    norm = getattr(getattr(base, "model", base), "norm", None)
    if norm is not None:
        parts.append((norm, "fwd.final_norm"))
        state = {}

        def on_norm(_m, _i, out):
            if out.requires_grad:
                out.register_hook(lambda g: state.__setitem__("t", time.perf_counter()))

        norm.register_forward_hook(on_norm)
        engine._profile_norm_state = state
    for mod, name in parts:
        mod.register_forward_pre_hook(lambda m, i, n=name: spans.push(n))
        mod.register_forward_hook(lambda m, i, o: spans.pop())
    cls = type(base)
    if isinstance(getattr(cls, "loss_function", None), property):
        prop = cls.loss_function

        def timed_loss(self):
            fn = prop.fget(self)

            def run(*a, **k):
                with spans.span("fwd.loss"):
                    return fn(*a, **k)

            return run

        cls.loss_function = property(timed_loss)
    wrap(engine.guard, "poison", spans, "guards")
    wrap(engine.guard, "window_had_bad_loss", spans, "guards")
    wrap(engine.guard, "record", spans, "guards")
    wrap(engine.lr_scheduler, "apply", spans, "lr_schedule")
    wrap(engine.lr_scheduler, "step", spans, "lr_schedule")
    wrap(engine.backend, "step", spans, "optimizer_step")
    wrap(engine, "start_phase", spans, "phase_switch")


def active_layer_index(engine) -> int:
    """0-indexed decoder layer of the active block (a large number for the head, -1 for the embedding)."""
    block = engine.candidates[engine.active_block_index]
    if block.kind == "layer":
        return block.layer_number - 1
    return -1 if block.kind == "embedding" else 10**6


def load_workload(workload: str, tok, seq_len: int):
    from lift_ds import assets
    from lift_ds.data import load_examples, tokenize
    from lift_ds.recipe import load_task_data

    train, _ = assets.movie_review_sentiment()
    if workload == "classification":
        return load_task_data(str(train), None, "classification", tok, seq_len).train
    exs, _ = load_examples(train, "text")
    return tokenize(exs, tok, "text", seq_len)


def config_for(args, world: int) -> dict:
    if args.workload == "classification":
        cfg = json.loads((REPO / "ds_configs" / "quickstart_cpu.json").read_text())
        cfg.pop("scheduler")
    else:
        cfg = {
            "train_micro_batch_size_per_gpu": 2,
            "gradient_clipping": 1.0,
            "bf16": {"enabled": True},
            "zero_optimization": {"stage": 2},
            "lift": {},
        }
    cfg["train_batch_size"] = "auto"
    cfg["zero_optimization"] = {**cfg.get("zero_optimization", {}), "stage": args.zero}
    if args.zero == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 1e4  # as launch/benchmark.py
    cfg["lift"].update(
        backend="deepspeed",
        total_steps=args.warmup + args.steps + args.profile_steps,
        layer_range=None if args.switch else [args.layer, args.layer],
        policy="cyclic" if args.switch else "grouped",
    )
    if args.loss and args.loss != "ab":
        cfg["lift"]["loss"] = args.loss
    return cfg


def worker(args) -> None:
    import torch
    import torch._dynamo  # noqa: F401
    from transformers import AutoModelForCausalLM

    import lift_ds
    from lift_ds import assets
    from lift_ds.data import RankBatches
    from lift_ds.loss import install_loss
    from lift_ds.recipe import load_tokenizer

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    model_dir = str(assets.smollm2_135m())
    tok = load_tokenizer(model_dir)
    seq_len = 128 if args.workload == "classification" else 64
    data = load_workload(args.workload, tok, seq_len)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    cfg = config_for(args, world)
    engine, *_ = lift_ds.initialize(
        model=model, config=cfg, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.0)
    )
    batches = RankBatches(data, engine.train_micro_batch_size_per_gpu(), rank, world, seed=0, pad_id=tok.pad_token_id)
    spans = Spans()
    active = {"index": 0}
    instrument(engine, model, spans, active)
    steps, tokens = [], []
    n_timed = args.warmup + args.steps
    prof = None
    while not engine.done:
        i = engine.global_step
        if i == n_timed and args.profile_steps:
            from torch.profiler import ProfilerActivity, profile

            spans.enabled = False
            prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
            prof.__enter__()
        b = batches.batch(engine.micro_steps)
        active["index"] = active_layer_index(engine)
        mode = ("model", "chunked")[i % 2] if args.loss == "ab" else None
        if mode is not None:  # A/B in one process: the two losses alternate step by step
            install_loss(model, mode)
        sw = engine.phase_switch_seconds
        spans.take()
        c0 = time.process_time()
        t0 = time.perf_counter()
        with spans.span("fwd.other"):
            loss = engine(**b).loss
        t1 = time.perf_counter()
        with spans.span("bwd.layers"):
            engine.backward(loss)
        t2 = time.perf_counter()
        loss_value = loss.item()
        del loss
        with spans.span("step.other"):
            engine.step()
        t3 = time.perf_counter()
        cpu = time.process_time() - c0
        parts = spans.take()
        switch = engine.phase_switch_seconds - sw
        head_t = getattr(engine, "_profile_norm_state", {}).pop("t", None)
        if head_t is not None and parts.get("bwd.layers"):
            head = min(head_t - t1, parts["bwd.layers"])
            parts["bwd.loss_and_head"] = head
            parts["bwd.layers"] -= head
        if i >= args.warmup and i < n_timed:
            steps.append(
                {
                    "step_s": t3 - t0 - switch,
                    "cpu_s": cpu,
                    "forward_s": t1 - t0,
                    "backward_s": t2 - t1,
                    "step_call_s": t3 - t2 - switch,
                    "switch_s": switch,
                    "loss": loss_value,
                    "parts": parts,
                    "mode": mode,
                }
            )
            tokens.append(int(b["attention_mask"].sum()))
    top = []
    if prof is not None:
        prof.__exit__(None, None, None)
        for e in sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:25]:
            top.append(
                {
                    "op": e.key,
                    "self_cpu_ms_per_step": e.self_cpu_time_total / 1000 / args.profile_steps,
                    "calls_per_step": e.count / args.profile_steps,
                }
            )
    out = {"rank": rank, "world": world, "tokens_per_micro_batch": statistics.mean(tokens), "top_ops": top}
    if args.loss == "ab":
        out["ab"] = {m: summary([s for s in steps if s["mode"] == m]) for m in ("model", "chunked")}
    else:
        out.update(summary(steps))
    Path(f"{args.result}.rank{rank}.json").write_text(json.dumps(out))
    engine.close()


def summary(steps: list[dict]) -> dict:
    """Medians over measured steps: wall and CPU time of the step, its calls, and each part."""
    names = sorted({k for s in steps for k in s["parts"]})
    med = lambda key: statistics.median(s[key] for s in steps)  # noqa: E731
    return {
        "median_step_s": med("step_s"),
        "median_step_cpu_s": med("cpu_s"),
        "median_forward_s": med("forward_s"),
        "median_backward_s": med("backward_s"),
        "median_step_call_s": med("step_call_s"),
        "median_parts_s": {k: statistics.median(s["parts"].get(k, 0.0) for s in steps) for k in names},
        "losses": [s["loss"] for s in steps],
        "steps": len(steps),
    }


def launch(args, workload: str, ranks: int, result: Path) -> subprocess.Popen:
    cmd = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(ranks),
            __file__,
            "--worker",
            "--workload",
            workload,
            "--result",
            str(result),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--profile_steps",
            str(args.profile_steps),
            "--layer",
            str(args.layer),
            "--zero",
            str(args.zero),
        ]
        + (["--switch"] if args.switch else [])
        + (["--loss", args.loss] if args.loss else [])
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def orchestrate(args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="lift_profile_"))
    cases = {}
    for case in args.cases.split(","):
        workload, _, ranks = case.partition(":")
        if workload not in WORKLOADS or ranks not in ("1", "2", "1x2"):
            raise SystemExit(
                f"error: --cases: {case!r}; each case is WORKLOAD:RANKS with "
                f"WORKLOAD in {', '.join(WORKLOADS)} and RANKS 1, 2 or 1x2"
            )
        print(f"running {case} ...", flush=True)
        jobs = [
            (launch(args, workload, 1 if ranks == "1x2" else int(ranks), tmp / f"{case.replace(':', '_')}.{j}"), j)
            for j in range(2 if ranks == "1x2" else 1)
        ]
        per_rank = []
        for proc, j in jobs:
            _, err = proc.communicate()
            if proc.returncode:
                print(err[-3000:])
                raise SystemExit(f"{case} failed (exit {proc.returncode})")
            n = 1 if ranks == "1x2" else int(ranks)
            per_rank += [json.loads((tmp / f"{case.replace(':', '_')}.{j}.rank{r}.json").read_text()) for r in range(n)]
        if "ab" in per_rank[0]:  # one case per loss of the A/B run
            for m in ("model", "chunked"):
                ranks_m = [{**{k: v for k, v in r.items() if k != "ab"}, **r["ab"][m]} for r in per_rank]
                cases[f"{case} loss={m}"] = {
                    "per_rank": ranks_m,
                    "median_step_s": max(r["median_step_s"] for r in ranks_m),
                }
        else:
            cases[case] = {"per_rank": per_rank, "median_step_s": max(r["median_step_s"] for r in per_rank)}
    from lift_ds.provenance import write_json

    record = {
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "result")},
        "cases": cases,
        "note": args.note,
    }
    write_json(args.out, record)
    report(record)


def report(record: dict) -> None:
    cases = record["cases"]
    names = sorted({k for c in cases.values() for r in c["per_rank"] for k in r["median_parts_s"]})
    print("\n| part (ms, median, slowest rank) | " + " | ".join(cases) + " |")
    print("|---|" + "---|" * len(cases))
    for k in names + ["step", "step CPU time"]:
        vals = []
        for c in cases.values():
            v = max(
                {"step": r["median_step_s"], "step CPU time": r.get("median_step_cpu_s", 0.0)}.get(
                    k, r["median_parts_s"].get(k, 0.0)
                )
                for r in c["per_rank"]
            )
            vals.append(f"{1000 * v:.1f}")
        print(f"| {k} | " + " | ".join(vals) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="classification:1,classification:2,text:1,text:2,text:1x2")
    p.add_argument("--steps", type=int, default=12, help="measured steps per case")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--profile_steps", type=int, default=3, help="steps under torch.profiler after the measured ones (0: none)"
    )
    p.add_argument("--layer", type=int, default=15, help="the fixed active layer (1-indexed)")
    p.add_argument("--zero", type=int, default=2, choices=(1, 2, 3), help="ZeRO stage (default 2, as the quickstart)")
    p.add_argument("--switch", action="store_true", help="switch at every step over all layers instead (cyclic)")
    p.add_argument(
        "--loss",
        default=None,
        help=(
            "lift.loss for the run (default: the config's default); ab: the model's own loss "
            "and the chunked one alternating step by step in each job "
            "(a side-by-side comparison a loaded machine disturbs least)"
        ),
    )
    p.add_argument("--note", default="", help="a note stored with the data (e.g. that the machine was shared)")
    p.add_argument("--out", default="outputs/step_profile.json")
    p.add_argument("--report", default=None, metavar="JSON", help="print the table of a saved run; runs nothing")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.report:
        report(json.loads(Path(args.report).read_text()))
    elif args.worker:
        worker(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
