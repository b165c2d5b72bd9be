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

**zeroshot** scores the untrained model on each task's held-out items (the baseline of every table).

**curves** plots validation loss against step from launch/train.py ``metrics.jsonl`` files (figure 5).

Every run is single-process on the torch backend (the reference LIFT engine), seeded; ``--seeds``
averages over seeds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import ConfigError
from .ablation import ablation, markdown_table, settings
from .common import Setup, parse_task, zero_shot
from .contribution import contribution
from .curves import curves


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
    z = sub.add_parser("zeroshot", help="held-out scores of the untrained model (the baseline of every table); writes zeroshot.json")
    common(z)
    v = sub.add_parser("curves", help="validation loss against step from metrics.jsonl files, as a PNG")
    v.add_argument("--run", action="append", required=True, help="LABEL=path/to/metrics.jsonl; repeat for several")
    v.add_argument("--metric", default="eval_loss")
    v.add_argument("--title", default="validation loss")
    v.add_argument("--out", required=True, help="PNG path")
    return p


def main(argv: list[str] | None = None) -> int:
    from ..data import DataError

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
        from .. import assets

        setup = Setup(model=args.model or str(assets.smollm2_135m()), steps=args.steps, lr=args.lr, seq_len=args.seq_len,
                      micro_batch=args.micro_batch, eval_limit=args.eval_limit, classifier_head=args.classifier_head, random_init=args.random_init)
        tasks = [parse_task(t) for t in args.task]
        out = Path(args.out)
        if args.command == "zeroshot":
            res = zero_shot(setup, tasks, out)
            for name, r in res["tasks"].items():
                print(f"{name}: zero-shot score {r['score']:.4f}")
            print(f"wrote {out}/zeroshot.json")
        elif args.command == "contribution":
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
