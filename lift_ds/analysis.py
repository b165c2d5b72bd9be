"""The paper's analyses as tools (appendix B-D): which blocks matter, which LIFT settings win.

    python -m lift_ds.analysis contribution --model DIR --task sentiment --task bigbench:strategyqa \\
        --steps 40 --out outputs/contribution [--sublayers] [--classifier_head]
    python -m lift_ds.analysis ablation --model DIR --task sentiment --steps 90 --out outputs/ablation \\
        [--ranges all,first,middle,last,6-8] [--schedules front2end,end2front,random] [--policies grouped,cyclic] [--grid oat|full]
    python -m lift_ds.analysis curves --run LIFT=outputs/lift/metrics.jsonl --run FT-Full=outputs/full/metrics.jsonl --out curves.png

Tasks: ``sentiment`` (movie reviews), ``trec`` (TREC question classes), ``bigbench:<task>`` (a BIG-bench
multiple-choice task), or ``NAME=FORMAT:TRAIN[:EVAL]`` for your own files in a launch/train.py format.

**contribution** fine-tunes each candidate block alone (the embedding, each layer, and with
``--sublayers`` each of a layer's linear and norm modules), always together with the head block, for
the same number of steps, and scores it on the held-out set (accuracy; for text, minus the loss). Each
score is reported relative to the average over the candidates of that task (the paper's "relative
numbers", figure 4). Writes ``contribution.csv``/``.json``, ``contribution.png`` (a heatmap, blocks x
tasks) and prints the recommended ``layer_range``: the contiguous window of ``--window`` layers with
the highest mean relative score.

**ablation** runs LIFT over layer ranges, schedules and policies (``oat``: one factor at a time from
all layers / front2end / grouped, the paper's tables 5-10; ``full``: every combination) plus FT-Full,
and prints a table in the paper's layout (rows = settings, columns = tasks, an average column).

**curves** plots validation loss against step from launch/train.py ``metrics.jsonl`` files (figure 5).

Every run is single-process on the torch backend (the reference LIFT engine), seeded; ``--seeds``
averages over seeds.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError

BUILTIN_TASKS = ("sentiment", "trec")
RANGE_NAMES = ("all", "first", "middle", "last")


@dataclass
class Task:
    name: str
    fmt: str
    train: str
    eval: str
    labels: list[str] | None = None


def parse_task(spec: str) -> Task:
    """``sentiment``, ``trec``, ``bigbench:<name>`` or ``NAME=FORMAT:TRAIN[:EVAL]`` (files are fetched or checked)."""
    from . import assets
    from .data import FORMATS

    if spec == "sentiment":
        train, held = assets.movie_review_sentiment()
        return Task("sentiment", "classification", str(train), str(held))
    if spec == "trec":
        train, held = assets.trec_questions()
        return Task("trec", "classification", str(train), str(held))
    if spec.startswith("bigbench:"):
        name = spec.split(":", 1)[1]
        train, held = assets.bigbench_task(name)
        return Task(name, "multiple_choice", str(train), str(held))
    name, eq, rest = spec.partition("=")
    parts = rest.split(":") if eq else []
    if not eq or len(parts) not in (2, 3) or parts[0] not in FORMATS:
        raise ConfigError([f"--task: {spec!r} is not a task; give sentiment, trec, bigbench:<task> or NAME=FORMAT:TRAIN[:EVAL] "
                           f"with FORMAT one of {', '.join(FORMATS)}"])
    for path in parts[1:]:
        if not Path(path).is_file():
            raise ConfigError([f"--task {name}: file {path!r} does not exist"])
    return Task(name, parts[0], parts[1], parts[2] if len(parts) == 3 else parts[1])


# ----------------------------------------------------------------------------- one fine-tuning run


@dataclass
class Setup:
    """What every run of a study shares."""

    model: str
    steps: int
    lr: float
    seq_len: int = 64
    micro_batch: int = 8
    eval_limit: int = 200
    classifier_head: bool = False
    random_init: bool = False
    _cache: dict = field(default_factory=dict, repr=False)

    def tokenizer(self) -> Any:
        if "tok" not in self._cache:
            from .train import _load_tokenizer

            self._cache["tok"] = _load_tokenizer(self.model)
        return self._cache["tok"]

    def data(self, task: Task) -> tuple[Any, Any, Any, int | None]:
        """(train, held-out tokenized, held-out examples for choice scoring, number of labels)."""
        key = ("data", task.name)
        if key not in self._cache:
            from .data import load_examples, tokenize, tokenize_for_head

            tok = self.tokenizer()
            train_ex, labels = load_examples(task.train, task.fmt, task.labels)
            held_ex, _ = load_examples(task.eval, task.fmt, labels)
            held_ex = held_ex[: self.eval_limit] if self.eval_limit else held_ex
            head = self.classifier_head and task.fmt == "classification"
            enc = (lambda exs: tokenize_for_head(exs, tok, self.seq_len)) if head else (lambda exs: tokenize(exs, tok, task.fmt, self.seq_len))
            self._cache[key] = (enc(train_ex), enc(held_ex), None if head or task.fmt == "text" else held_ex,
                                len(labels) if head and labels else None)
        return self._cache[key]

    def model_for(self, num_labels: int | None, seed: int) -> Any:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

        cfg = AutoConfig.from_pretrained(self.model)
        cls = AutoModelForCausalLM
        if num_labels is not None:
            cls = AutoModelForSequenceClassification
            cfg.num_labels, cfg.pad_token_id = num_labels, self.tokenizer().pad_token_id
        torch.manual_seed(seed)  # a new classification head starts from the same values for every block
        model = cls.from_config(cfg, dtype=torch.float32) if self.random_init else cls.from_pretrained(self.model, config=cfg, dtype=torch.float32)
        model.config.use_cache = False
        return model


def run_once(setup: Setup, task: Task, seed: int, trainable: list[str] | None = None, lift: dict | None = None) -> dict[str, float]:
    """Fine-tune (``trainable`` parameter names for the whole run, or LIFT with ``lift``) and score."""
    import torch

    from .api import initialize
    from .data import RankBatches
    from .evaluate import choice_accuracy, eval_loss, head_metrics

    train, held, held_ex, n_labels = setup.data(task)
    model = setup.model_for(n_labels, seed)
    names = [n for n, _ in model.named_parameters()]
    if trainable is not None:
        unknown = [n for n in trainable if n not in names]
        if unknown:
            raise ConfigError([f"trainable: {unknown[:3]} are not parameters of the model"])
    cfg = {"train_micro_batch_size_per_gpu": setup.micro_batch, "gradient_clipping": 1.0,
           "optimizer": {"type": "AdamW", "params": {"lr": setup.lr, "weight_decay": 0.0}},
           "lift": {"backend": "torch", "total_steps": setup.steps, "seed": seed, **(lift or {})}}
    if n_labels is not None and trainable is None:
        cfg["lift"]["always_trainable"] = [n for n, _ in model.named_children() if n in ("score", "classifier")]
    t0 = time.perf_counter()
    engine, *_ = initialize(model=model, config=cfg, fixed_trainable=trainable)
    pad = setup.tokenizer().pad_token_id
    batches = RankBatches(train, setup.micro_batch, 0, 1, seed, pad)
    losses = []
    torch.manual_seed(seed)
    while not engine.done:
        loss = engine(**batches.batch(engine.micro_steps)).loss
        engine.backward(loss)
        losses.append(loss.item())
        del loss
        engine.step()
    engine.eval()
    with torch.no_grad():
        if held.class_labels:
            metrics = head_metrics(engine.forward, held, 32, 0, 1, pad)
        elif held_ex is not None:
            metrics = choice_accuracy(engine.forward, held_ex, setup.tokenizer(), setup.seq_len, 32, 0, 1)
        else:
            metrics = eval_loss(engine.forward, held, 32, 0, 1, pad)
    engine.close()
    score = metrics.get("eval_accuracy", -metrics.get("eval_loss", float("nan")))
    return {"score": score, "train_loss": statistics.mean(losses[-5:]), "seconds": time.perf_counter() - t0, **metrics}


def _mean_over_seeds(setup: Setup, task: Task, seeds: list[int], **kw: Any) -> dict[str, float]:
    runs = [run_once(setup, task, s, **kw) for s in seeds]
    out = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
    out["score_std"] = statistics.pstdev(r["score"] for r in runs) if len(runs) > 1 else 0.0
    return out


# ----------------------------------------------------------------------------- contribution


def candidates(model: Any, sublayers: bool) -> list[tuple[str, list[str], int | None]]:
    """``(name, parameter names, layer number)`` for each candidate; the head block is left out
    (it trains with every candidate)."""
    from torch import nn

    from .blocks import find_blocks

    out = []
    for b in find_blocks(model):
        if b.kind == "head":
            continue
        if b.kind == "layer" and sublayers:
            layer = model.get_submodule(b.name)
            for sub_name, sub in layer.named_modules():
                own = [f"{b.name}.{sub_name}.{n}" for n, _ in sub.named_parameters(recurse=False)]
                if own and (isinstance(sub, nn.Linear) or "norm" in type(sub).__name__.lower()):
                    out.append((f"{b.name}.{sub_name}", own, b.layer_number))
        else:
            out.append((b.name, list(b.param_names), b.layer_number))
    return out


def head_params(model: Any) -> list[str]:
    from .blocks import find_blocks

    return [n for b in find_blocks(model) if b.kind == "head" for n in b.param_names]


def recommend_range(rows: list[dict], tasks: list[str], window: int) -> tuple[list[int], float, float]:
    """The contiguous ``window`` of layers with the highest mean relative score (sub-layer scores
    averaged per layer). Returns ``([first, last], its mean, the mean over all layers)``."""
    per_layer: dict[int, list[float]] = {}
    for r in rows:
        if r["layer"] is not None:
            per_layer.setdefault(r["layer"], []).extend(r[f"rel_{t}"] for t in tasks)
    layers = sorted(per_layer)
    means = [statistics.mean(per_layer[k]) for k in layers]
    window = max(1, min(window, len(layers)))
    best = max(range(len(layers) - window + 1), key=lambda i: sum(means[i : i + window]))
    return [layers[best], layers[best + window - 1]], statistics.mean(means[best : best + window]), statistics.mean(means)


def contribution(setup: Setup, tasks: list[Task], seeds: list[int], sublayers: bool, window: int, out: Path, only: list[str] | None = None) -> dict:
    model = setup.model_for(setup.data(tasks[0])[3], seeds[0])
    cands = candidates(model, sublayers)
    if only:
        cands = [c for c in cands if any(c[0] == o or c[0].startswith(o + ".") for o in only)]
        if not cands:
            raise ConfigError([f"--only: {only} matches no candidate block"])
    head = head_params(model)
    del model
    rows = [{"block": name, "layer": layer, "parameters": len(params)} for name, params, layer in cands]
    for task in tasks:
        for row, (name, params, _) in zip(rows, cands):
            r = _mean_over_seeds(setup, task, seeds, trainable=list(dict.fromkeys(params + head)))
            row[f"score_{task.name}"] = r["score"]
            print(f"[contribution] {task.name} {name}: score {r['score']:.4f} ({r['seconds']:.0f} s)", file=sys.stderr, flush=True)
        avg = statistics.mean(r[f"score_{task.name}"] for r in rows)
        for row in rows:
            row[f"rel_{task.name}"] = row[f"score_{task.name}"] / avg if avg else float("nan")
    names = [t.name for t in tasks]
    rec, rec_mean, all_mean = recommend_range(rows, names, window) if any(r["layer"] for r in rows) else ([], float("nan"), float("nan"))
    result = {"tasks": names, "seeds": seeds, "steps": setup.steps, "lr": setup.lr, "model": setup.model, "rows": rows,
              "recommended_layer_range": rec, "recommended_mean_relative": rec_mean, "all_layers_mean_relative": all_mean}
    _write_tables(out, "contribution", result, rows)
    heatmap(rows, names, out / "contribution.png", f"relative contribution ({Path(setup.model).name}, {setup.steps} steps, {len(seeds)} seed(s))")
    return result


def _write_tables(out: Path, stem: str, result: dict, rows: list[dict]) -> None:
    """``out/<stem>.json`` (the whole result) and ``out/<stem>.csv`` (its rows)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def heatmap(rows: list[dict], tasks: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array([[r[f"rel_{t}"] for t in tasks] for r in rows])
    fig, ax = plt.subplots(figsize=(2.2 + 1.3 * len(tasks), 1.2 + 0.22 * len(rows)))
    im = ax.imshow(values, aspect="auto", cmap="RdYlGn")
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r["block"] for r in rows], fontsize=7)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax, label="score / mean over blocks")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- ablation


def named_range(name: str, num_layers: int) -> tuple[str, list[int] | None]:
    """``all``, ``first``/``middle``/``last`` third, or ``A-B`` (1-indexed, inclusive)."""
    third = max(1, num_layers // 3)
    if name == "all":
        return "all", None
    if name == "first":
        return f"first [1, {third}]", [1, third]
    if name == "middle":
        start = (num_layers - third) // 2 + 1
        return f"middle [{start}, {start + third - 1}]", [start, start + third - 1]
    if name == "last":
        return f"last [{num_layers - third + 1}, {num_layers}]", [num_layers - third + 1, num_layers]
    try:
        a, b = (int(x) for x in name.split("-"))
    except ValueError:
        raise ConfigError([f"--ranges: {name!r} is not all, first, middle, last or A-B (e.g. 6-8)"]) from None
    if not 1 <= a <= b <= num_layers:
        raise ConfigError([f"--ranges: {name!r} must satisfy 1 <= A <= B <= {num_layers}"])
    return f"[{a}, {b}]", [a, b]


def settings(num_layers: int, ranges: list[str], schedules: list[str], policies: list[str], grid: str) -> list[tuple[str, dict]]:
    """(row label, lift section) for each LIFT row of the table."""
    from .schedule import POLICIES, SCHEDULES

    for s in schedules:
        if s not in SCHEDULES:
            raise ConfigError([f"--schedules: {s!r} unknown; allowed: {', '.join(SCHEDULES)}"])
    for p in policies:
        if p not in POLICIES:
            raise ConfigError([f"--policies: {p!r} unknown; allowed: {', '.join(POLICIES)}"])
    if grid not in ("oat", "full"):
        raise ConfigError([f"--grid: {grid!r} unknown; allowed: oat, full"])
    named = [named_range(r, num_layers) for r in ranges]
    combos: list[tuple[tuple[str, list[int] | None], str, str]] = []
    if grid == "full":
        combos = [(r, s, p) for r in named for s in schedules for p in policies]
    else:  # one factor at a time around the paper's default: all layers, front2end, grouped
        base_r, base_s, base_p = named_range("all", num_layers), "front2end", "grouped"
        combos = [(r, base_s, base_p) for r in named] + [(base_r, s, base_p) for s in schedules] + [(base_r, base_s, p) for p in policies]
    rows, seen = [], set()
    for (label, lr), s, p in combos:
        key = (label, s, p)
        if key in seen:
            continue
        seen.add(key)
        rows.append((f"LIFT {label} {s} {p}", {"layer_range": lr, "schedule": s, "policy": p}))
    return rows


def ablation(setup: Setup, tasks: list[Task], seeds: list[int], rows: list[tuple[str, dict]], out: Path, full_ft: bool = True) -> dict:
    table: list[dict] = []
    plan = ([("FT-Full", None)] if full_ft else []) + rows
    for label, lift in plan:
        row: dict[str, Any] = {"setting": label}
        for task in tasks:
            if lift is None:
                model = setup.model_for(setup.data(task)[3], seeds[0])
                every = [n for n, _ in model.named_parameters()]
                del model
                r = _mean_over_seeds(setup, task, seeds, trainable=every)
            else:
                r = _mean_over_seeds(setup, task, seeds, lift=lift)
            row[task.name] = r["score"]
            row[f"{task.name}_std"] = r["score_std"]
            print(f"[ablation] {task.name} {label}: {r['score']:.4f} ({r['seconds']:.0f} s)", file=sys.stderr, flush=True)
        row["average"] = statistics.mean(row[t.name] for t in tasks)
        table.append(row)
    names = [t.name for t in tasks]
    result = {"tasks": names, "seeds": seeds, "steps": setup.steps, "lr": setup.lr, "model": setup.model, "rows": table}
    _write_tables(out, "ablation", result, table)
    md = markdown_table(table, names)
    (out / "ablation.md").write_text(md + "\n")
    return result


def markdown_table(rows: list[dict], tasks: list[str]) -> str:
    """Rows = settings, columns = tasks and their average (accuracy in %; for text tasks, -loss)."""
    acc = lambda v: f"{100 * v:.1f}" if 0 <= v <= 1 else f"{v:.3f}"  # noqa: E731
    lines = ["| setting | " + " | ".join(tasks) + " | average |", "|---|" + "---|" * (len(tasks) + 1)]
    for r in rows:
        lines.append(f"| {r['setting']} | " + " | ".join(acc(r[t]) for t in tasks) + f" | {acc(r['average'])} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- curves


def read_curve(path: Path, metric: str) -> list[tuple[int, float]]:
    """``(step, value)`` of ``metric`` in a metrics.jsonl file (bad lines named by file and line)."""
    from .data import DataError, read_jsonl

    if not path.is_file():
        raise DataError(f"--run: file {str(path)!r} does not exist")
    points = [(int(rec["step"]), float(rec[metric])) for rec in read_jsonl(path) if metric in rec and "step" in rec]
    if not points:
        raise DataError(f"{path}: no records with {metric!r} (train with --eval_every N to log it)")
    return sorted(points)


def curves(runs: list[tuple[str, Path]], metric: str, out: Path, title: str) -> dict[str, list[tuple[int, float]]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {label: read_curve(path, metric) for label, path in runs}
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in data.items():
        ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return data


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lift_ds.analysis", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--model", default=None, help="HF directory (default: the built-in SmolLM2-135M-Instruct)")
        q.add_argument("--task", action="append", required=True, help="sentiment, trec, bigbench:<task> or NAME=FORMAT:TRAIN[:EVAL]; repeat for several")
        q.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
        q.add_argument("--lr", type=float, default=1e-4)
        q.add_argument("--seq_len", type=int, default=64)
        q.add_argument("--micro_batch", type=int, default=8)
        q.add_argument("--eval_limit", type=int, default=200, help="held-out items scored per task (0: all)")
        q.add_argument("--seeds", default="0", help="comma-separated seeds; scores are averaged")
        q.add_argument("--classifier_head", action="store_true", help="classification tasks through a new sequence-classification head")
        q.add_argument("--random_init", action="store_true", help="fresh weights from --model's config (smoke tests)")
        q.add_argument("--out", required=True, help="output directory")

    c = sub.add_parser("contribution", help="fine-tune each block alone with the head; relative scores, heatmap, recommended layer_range")
    common(c)
    c.add_argument("--sublayers", action="store_true", help="also each linear and norm module of every layer")
    c.add_argument("--window", type=int, default=0, help="width of the recommended layer_range (default: a third of the layers)")
    c.add_argument("--only", default=None, help="comma-separated block names (or prefixes) to run, e.g. model.layers.0,embedding")
    a = sub.add_parser("ablation", help="LIFT over layer ranges, schedules and policies, with FT-Full; the paper's table layout")
    common(a)
    a.add_argument("--ranges", default="all,first,middle,last", help="comma-separated: all, first, middle, last (thirds) or A-B (e.g. 6-8)")
    a.add_argument("--schedules", default="front2end,end2front,random")
    a.add_argument("--policies", default="grouped,cyclic")
    a.add_argument("--grid", default="oat", help="oat: one factor at a time from all/front2end/grouped (default); full: every combination")
    a.add_argument("--no_full_ft", action="store_true", help="skip the FT-Full reference row")
    v = sub.add_parser("curves", help="validation loss against step from metrics.jsonl files, as a PNG")
    v.add_argument("--run", action="append", required=True, help="LABEL=path/to/metrics.jsonl; repeat for several")
    v.add_argument("--metric", default="eval_loss")
    v.add_argument("--title", default="validation loss")
    v.add_argument("--out", required=True, help="PNG path")
    return p


def main(argv: list[str] | None = None) -> int:
    from .data import DataError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "curves":
            runs = []
            for spec in args.run:
                label, eq, path = spec.partition("=")
                if not eq or not label or not path:
                    raise ConfigError([f"--run: {spec!r} must be LABEL=path/to/metrics.jsonl"])
                runs.append((label, Path(path)))
            curves(runs, args.metric, Path(args.out), args.title)
            print(f"wrote {args.out}")
            return 0
        problems = [f"--{k}: must be >= 1, got {getattr(args, k)}" for k in ("steps", "seq_len", "micro_batch") if getattr(args, k) < 1]
        if not args.lr > 0:
            problems.append(f"--lr: must be > 0, got {args.lr}")
        try:
            seeds = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            problems.append(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
        if args.model is not None and not Path(args.model).is_dir():
            problems.append(f"--model: directory {args.model!r} does not exist")
        if problems:
            raise ConfigError(problems)
        from . import assets

        setup = Setup(model=args.model or str(assets.smollm2_135m()), steps=args.steps, lr=args.lr, seq_len=args.seq_len,
                      micro_batch=args.micro_batch, eval_limit=args.eval_limit, classifier_head=args.classifier_head, random_init=args.random_init)
        tasks = [parse_task(t) for t in args.task]
        out = Path(args.out)
        if args.command == "contribution":
            from transformers import AutoConfig

            layers = AutoConfig.from_pretrained(setup.model).num_hidden_layers
            only = args.only.split(",") if args.only else None
            res = contribution(setup, tasks, seeds, args.sublayers, args.window or max(1, layers // 3), out, only)
            print(f"wrote {out}/contribution.csv, .json, .png")
            if res["recommended_layer_range"]:
                print(f"recommended layer_range: {res['recommended_layer_range']} (mean relative score {res['recommended_mean_relative']:.3f}; "
                      f"all layers {res['all_layers_mean_relative']:.3f})")
        else:
            from transformers import AutoConfig

            layers = AutoConfig.from_pretrained(setup.model).num_hidden_layers
            rows = settings(layers, args.ranges.split(","), args.schedules.split(","), args.policies.split(","), args.grid)
            res = ablation(setup, tasks, seeds, rows, out, full_ft=not args.no_full_ft)
            print(markdown_table(res["rows"], res["tasks"]))
            print(f"\nwrote {out}/ablation.md, .csv, .json")
        return 0
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
