"""The paper's analyses as tools (appendix B-D): which blocks matter, which LIFT settings win.

    python -m lift_ds.analysis contribution --model DIR --task sentiment --task bigbench:strategyqa \\
        --steps 40 --out outputs/contribution [--sublayers] [--classifier_head]
    python -m lift_ds.analysis ablation --model DIR --task sentiment --steps 90 --out outputs/ablation \\
        [--ranges all,first,middle,last,6-8] [--schedules front2end,end2front,random] \
        [--policies grouped,cyclic] [--grid oat|full]
    python -m lift_ds.analysis curves --run LIFT=outputs/lift/metrics.jsonl \
        --run FT-Full=outputs/full/metrics.jsonl --out curves.png

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

**compare** runs methods (LIFT front2end and random, FT-Full, LoRA, BAdam, LISA) x learning rates x
tasks x seeds through launch/train.py, picks each method's best learning rate on a validation split of
the training file, and reports test accuracy (mean and std over seeds) at that rate, with validation
curves (see :mod:`lift_ds.analysis.compare`)::

    python -m lift_ds.analysis compare --task sentiment --task trec --seeds 0,1,2 --steps 60 --out outputs/compare \
        [--methods lift,lift-random,full,lora,badam,lisa] [--lrs full=1e-5,3e-5 --lrs lift=1e-4,3e-4]

**curves** plots validation loss against step from launch/train.py ``metrics.jsonl`` files (figure 5).

Every run is single-process on the torch backend (the reference LIFT engine), seeded; ``--seeds``
averages over seeds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import BAD_INPUT, ConfigError, LiftError
from .ablation import ablation, markdown_table, settings
from .common import Setup, parse_task, zero_shot
from .compare import DEFAULT_LRS, METHOD_FLAGS, compare
from .contribution import contribution
from .curves import curves


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lift_ds.analysis", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--model", default=None, help="HF directory (default: the built-in SmolLM2-135M-Instruct)")
        q.add_argument(
            "--task",
            action="append",
            required=True,
            help="sentiment, trec, bigbench:<task> or NAME=FORMAT:TRAIN[:EVAL]; repeat for several",
        )
        q.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
        q.add_argument("--lr", type=float, default=1e-4)
        q.add_argument("--seq_len", type=int, default=64)
        q.add_argument("--micro_batch", type=int, default=8)
        q.add_argument("--eval_limit", type=int, default=200, help="held-out items scored per task (0: all)")
        q.add_argument("--seeds", default="0", help="comma-separated seeds; scores are averaged")
        q.add_argument(
            "--classifier_head",
            action="store_true",
            help="classification tasks through a new sequence-classification head",
        )
        q.add_argument("--random_init", action="store_true", help="fresh weights from --model's config (smoke tests)")
        q.add_argument("--out", required=True, help="output directory")

    c = sub.add_parser(
        "contribution",
        help="fine-tune each block alone with the head; relative scores, heatmap, recommended layer_range",
    )
    common(c)
    c.add_argument("--sublayers", action="store_true", help="also each linear and norm module of every layer")
    c.add_argument(
        "--window", type=int, default=0, help="width of the recommended layer_range (default: a third of the layers)"
    )
    c.add_argument(
        "--only", default=None, help="comma-separated block names (or prefixes) to run, e.g. model.layers.0,embedding"
    )
    a = sub.add_parser(
        "ablation", help="LIFT over layer ranges, schedules and policies, with FT-Full; the paper's table layout"
    )
    common(a)
    a.add_argument(
        "--ranges",
        default="all,first,middle,last",
        help="comma-separated: all, first, middle, last (thirds) or A-B (e.g. 6-8)",
    )
    a.add_argument("--schedules", default="front2end,end2front,random")
    a.add_argument("--policies", default="grouped,cyclic")
    a.add_argument(
        "--grid",
        default="oat",
        help="oat: one factor at a time from all/front2end/grouped (default); full: every combination",
    )
    a.add_argument("--no_full_ft", action="store_true", help="skip the FT-Full reference row")
    z = sub.add_parser(
        "zeroshot", help="held-out scores of the untrained model (the baseline of every table); writes zeroshot.json"
    )
    common(z)
    m = sub.add_parser(
        "compare",
        help="methods x learning rates x tasks x seeds through the launcher; test mean +- std at each method's best lr",
    )
    m.add_argument("--model", default=None, help="HF directory (default: the built-in SmolLM2-135M-Instruct)")
    m.add_argument(
        "--task",
        action="append",
        required=True,
        help="sentiment, trec, bigbench:<task> or NAME=FORMAT:TRAIN[:EVAL]; repeat for several",
    )
    m.add_argument("--methods", default=",".join(METHOD_FLAGS), help=f"comma-separated, of {', '.join(METHOD_FLAGS)}")
    m.add_argument(
        "--lrs",
        action="append",
        default=[],
        metavar="METHOD=LR[,LR...]",
        help="a method's learning-rate grid (default: "
        + "; ".join(f"{k} {','.join(f'{x:g}' for x in v)}" for k, v in DEFAULT_LRS.items())
        + ")",
    )
    m.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (at least 3 for a std worth reading)")
    m.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    m.add_argument("--seq_len", type=int, default=64)
    m.add_argument("--micro_batch", type=int, default=8)
    m.add_argument(
        "--val_items",
        type=int,
        default=100,
        help="validation items drawn (seed 0) from each training file, never trained on",
    )
    m.add_argument("--test_limit", type=int, default=0, help="test items scored per task (0: all of the held-out file)")
    m.add_argument(
        "--eval_every",
        type=int,
        default=0,
        help=(
            "validation every N steps for the curves, runs of the first seed (default: "
            "steps / 5); the other seeds validate at the end only"
        ),
    )
    m.add_argument(
        "--switch_every",
        type=int,
        default=0,
        help="badam / lisa: steps per switch (default: the methods' own, 50 / 20)",
    )
    m.add_argument("--out", required=True, help="output directory (a stopped study continues there)")
    m.add_argument(
        "--lm_eval",
        action="store_true",
        help=(
            "also score each method's best-lr model (first seed) with lm-eval and "
            "report its agreement with lift_ds's evaluator (pip install 'lift_ds[eval]')"
        ),
    )
    m.add_argument(
        "--report_only",
        action="store_true",
        help="launch nothing: summarize the finished runs in --out (a study in progress or cut short)",
    )
    m.add_argument(
        "--keep_models",
        action="store_true",
        help="keep every run's exported model and checkpoint (default: removed once scored)",
    )
    e = sub.add_parser(
        "lmeval", help="accuracy of a model by lift_ds's evaluator and by EleutherAI's lm-eval, item by item"
    )
    e.add_argument("--model", required=True, help="HF directory (e.g. an exported output_dir/final)")
    e.add_argument(
        "--task", action="append", required=True, help="sentiment, trec, bigbench:<task> or NAME=FORMAT:TRAIN[:EVAL]"
    )
    e.add_argument("--limit", type=int, default=200, help="held-out items (0: all)")
    e.add_argument("--seq_len", type=int, default=64)
    e.add_argument("--out", required=True, help="directory for the lm-eval task YAMLs and lmeval.json")
    v = sub.add_parser("curves", help="validation loss against step from metrics.jsonl files, as a PNG")
    v.add_argument("--run", action="append", required=True, help="LABEL=path/to/metrics.jsonl; repeat for several")
    v.add_argument("--metric", default="eval_loss")
    v.add_argument("--title", default="validation loss")
    v.add_argument("--out", required=True, help="PNG path")
    return p


def main(argv: list[str] | None = None) -> int:
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
        if args.command == "compare":
            return _compare(args)
        if args.command == "lmeval":
            return _lmeval(args)
        problems = [
            f"--{k}: must be >= 1, got {getattr(args, k)}"
            for k in ("steps", "seq_len", "micro_batch")
            if getattr(args, k) < 1
        ]
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

        setup = Setup(
            model=args.model or str(assets.smollm2_135m()),
            steps=args.steps,
            lr=args.lr,
            seq_len=args.seq_len,
            micro_batch=args.micro_batch,
            eval_limit=args.eval_limit,
            classifier_head=args.classifier_head,
            random_init=args.random_init,
        )
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
                print(
                    f"recommended layer_range: {res['recommended_layer_range']} "
                    f"(mean relative score {res['recommended_mean_relative']:.3f}; "
                    f"all layers {res['all_layers_mean_relative']:.3f})"
                )
        else:
            from transformers import AutoConfig

            layers = AutoConfig.from_pretrained(setup.model).num_hidden_layers
            rows = settings(
                layers, args.ranges.split(","), args.schedules.split(","), args.policies.split(","), args.grid
            )
            res = ablation(setup, tasks, seeds, rows, out, full_ft=not args.no_full_ft)
            print(markdown_table(res["rows"], res["tasks"]))
            print(f"\nwrote {out}/ablation.md, .csv, .json")
        return 0
    except LiftError as e:  # bad input (a ConfigError, DataError, ...): its exit status and message, no traceback
        if e.exit_code != BAD_INPUT:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


def _compare(args: argparse.Namespace) -> int:
    problems = [
        f"--{k}: must be >= 1, got {getattr(args, k)}"
        for k in ("steps", "seq_len", "micro_batch", "val_items")
        if getattr(args, k) < 1
    ]
    problems += [
        f"--{k}: must be >= 0, got {getattr(args, k)}"
        for k in ("test_limit", "eval_every", "switch_every")
        if getattr(args, k) < 0
    ]
    methods = [m for m in args.methods.split(",") if m]
    problems += [
        f"--methods: {m!r} unknown; allowed: {', '.join(METHOD_FLAGS)}" for m in methods if m not in METHOD_FLAGS
    ]
    lrs = {m: list(DEFAULT_LRS[m]) for m in methods if m in DEFAULT_LRS}
    for spec in args.lrs:
        name, eq, values = spec.partition("=")
        try:
            grid = [float(x) for x in values.split(",") if x]
        except ValueError:
            grid = []
        if not eq or name not in methods or not grid or not all(x > 0 for x in grid):
            problems.append(
                f"--lrs: {spec!r} must be METHOD=LR[,LR...] with METHOD "
                f"one of --methods ({', '.join(methods)}) and rates > 0"
            )
        else:
            lrs[name] = grid
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        seeds = []
        problems.append(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if args.model is not None and not Path(args.model).is_dir():
        problems.append(f"--model: directory {args.model!r} does not exist")
    if problems:
        raise ConfigError(problems)
    from .. import assets

    args.eval_every = args.eval_every or max(1, args.steps // 5)
    model = args.model or str(assets.smollm2_135m())
    res = compare(model, [parse_task(t) for t in args.task], methods, lrs, seeds, args, Path(args.out))
    print((Path(args.out) / "compare.md").read_text())
    print(f"wrote {args.out}/compare.json, .csv, .md, curves_<task>.png ({len(res['runs'])} runs)")
    return 0


def _lmeval(args: argparse.Namespace) -> int:
    from .lmeval import agreement

    problems = [f"--{k}: must be >= 0, got {getattr(args, k)}" for k in ("limit",) if getattr(args, k) < 0]
    if not Path(args.model).is_dir():
        problems.append(f"--model: directory {args.model!r} does not exist")
    if problems:
        raise ConfigError(problems)
    rows = [agreement(args.model, parse_task(t), args.seq_len, args.limit, Path(args.out) / "tasks") for t in args.task]
    for r in rows:
        print(
            f"{r['task']}: {r['items']} items, lift_ds accuracy {r['lift_ds_accuracy']:.4f}, "
            f"lm-eval acc {r['lm_eval_accuracy']:.4f}, "
            f"{r['items_choosing_differently']} items chosen differently, "
            f"largest log-likelihood gap {r['max_loglikelihood_gap']:.2e}"
        )
    from ..provenance import write_json

    write_json(Path(args.out, "lmeval.json"), {"rows": rows})
    return 0
