"""Command-line arguments of launch/train.py and their checks (run before any process group starts).

The ``lift`` flags (``--schedule``, ``--layer_range``, ...) are generated from the declarations in
:class:`lift_ds.config.LiftConfig`; every flag that sets a config key becomes an
:class:`~lift_ds.run_config.Override` of its JSON path, and :func:`lift_ds.run_config.load_run_config`
checks the merged result once, naming the flag of any bad value.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import preflight
from .config import lift_settings
from .data import FORMATS
from .errors import ConfigError
from .run_config import Override, RunConfig, load_run_config, read_config_file
from .utils import get_world_size

if TYPE_CHECKING:  # pragma: no cover
    from .plan import LiftPlan

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "ds_configs" / "zero2.json"
#: --method: the engine's layer-wise methods (lift.method)
METHODS = ("lift", "badam", "lisa")
#: --baseline: the baselines sharing the loop instead of a layer-wise method
BASELINES = ("full", "lora")


def _method(value: str) -> str:
    """``--method``'s type: the old spelling of a baseline (``--method full``) names its new flag."""
    if value in BASELINES:
        raise argparse.ArgumentTypeError(f"{value!r} is a baseline, not a lift.method; use --baseline {value}")
    return value


#: launcher flags that set a top-level config key: (flag, JSON path, type, help)
TRAINING_FLAGS = (
    ("max_steps", "lift.total_steps", int, "optimizer steps (overrides lift.total_steps)"),
    ("lr", "optimizer.params.lr", float, "learning rate (overrides optimizer.params.lr)"),
    ("micro_batch_size", "train_micro_batch_size_per_gpu", int, "overrides train_micro_batch_size_per_gpu"),
    ("gradient_accumulation_steps", "gradient_accumulation_steps", int, "overrides gradient_accumulation_steps"),
    ("gradient_clipping", "gradient_clipping", float, "overrides gradient_clipping (0: off)"),
)


def _add_lift_flags(p: argparse.ArgumentParser) -> None:
    """One flag per declared ``lift`` key (``flag=True``), help and allowed values from the declaration."""
    g = p.add_argument_group('lift section (override the config\'s "lift" keys; declared in lift_ds/config.py)')
    for f in lift_settings():
        m = f.metadata
        if not m["flag"]:
            continue
        default = f.default if f.default not in ((), None) else "none"
        help_ = (
            f"{m['help']} (lift.{f.name}; default {json.dumps(default) if not isinstance(default, str) else default})"
        )
        if m["kind"] == "bool":
            g.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif m["kind"] == "int":
            g.add_argument(f"--{f.name}", type=int, default=None, help=help_)
        elif m["kind"] == "choice":
            g.add_argument(f"--{f.name}", default=None, metavar="{" + ",".join(m["choices"]) + "}", help=help_)
        elif m["kind"] == "layer_range":
            g.add_argument(f"--{f.name}", default=None, metavar="FIRST,LAST", help=help_)
        elif m["kind"] == "path":
            g.add_argument(f"--{f.name}", default=None, metavar="DIR", help=help_)
        else:  # patterns
            g.add_argument(f"--{f.name}", default=None, metavar="PATTERN[,PATTERN...]", help=help_)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/train.py",
        description="LIFT fine-tuning (and full / LoRA baselines) under the deepspeed launcher or torchrun. "
        "With no --model and --data it runs the built-in quickstart: SmolLM2-135M-Instruct on movie-review sentiment.",
    )
    a = p.add_argument
    a(
        "--ds_config",
        "--deepspeed_config",
        dest="ds_config",
        default=str(DEFAULT_CONFIG),
        help='DeepSpeed JSON with a "lift" section (default: ds_configs/zero2.json)',
    )
    a(
        "--model",
        default=None,
        help="local Hugging Face directory or hub id (default: the built-in SmolLM2-135M-Instruct)",
    )
    a(
        "--random_init",
        action="store_true",
        help="build the model from --model's config with fresh weights (smoke runs)",
    )
    a(
        "--tokenizer",
        default=None,
        help="tokenizer directory or id (default: --model); SentencePiece tokenizer.model directories work",
    )
    a("--data", default=None, help="training file (default: the built-in movie-review sentiment set)")
    a("--eval_data", default=None, help="held-out file in the same format")
    a(
        "--format",
        default=None,
        choices=FORMATS,
        help="data format (default: classification for the built-in data, else text)",
    )
    a(
        "--labels",
        default=None,
        help="comma-separated label words for --format classification (default: those in the data)",
    )
    a(
        "--classifier_head",
        action="store_true",
        help="--format classification with a sequence-classification head (new, trained in every phase) "
        "instead of label-word likelihood",
    )
    a(
        "--method",
        default=None,
        type=_method,
        choices=METHODS,
        help="the layer-wise method (lift.method): lift "
        "(default; or the config's lift.method), or the BAdam / LISA presets on the same engine",
    )
    a(
        "--baseline",
        default=None,
        choices=BASELINES,
        help="train a baseline in the same harness instead: full "
        "fine-tuning or LoRA (peft, --lora_r); not with --method or a config's lift.method other than lift",
    )
    for flag, _, kind, help_ in TRAINING_FLAGS:
        a(f"--{flag}", type=kind, default=None, help=help_)
    a("--seq_len", type=int, default=128)
    a(
        "--seed",
        type=int,
        default=0,
        help="model init, data order and the random schedule (lift.seed unless the config sets it)",
    )
    a("--lora_r", type=int, default=8)
    a("--output_dir", default="outputs/run")
    a("--save_every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    a("--keep_checkpoints", type=int, default=2, help="keep the newest K checkpoints")
    a("--eval_every", type=int, default=0, help="evaluate every N steps (0: before and after only)")
    a("--eval_limit", type=int, default=0, help="evaluate on the first N held-out items (0: all)")
    a("--eval_batch_size", type=int, default=16)
    a(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint in --output_dir (any number of ranks, any backend)",
    )
    a(
        "--overwrite_output_dir",
        action="store_true",
        help=(
            "start a new run in a non-empty --output_dir, removing lift_ds's outputs there "
            "(checkpoints/, metrics.jsonl, final/, result.json, "
            "tensorboard/); without it a non-empty --output_dir needs --resume"
        ),
    )
    a(
        "--skip_memory_check",
        action="store_true",
        help="run even when the estimated peak memory exceeds what this machine has",
    )
    a(
        "--allow_batch_change",
        action="store_true",
        help=(
            "with --resume: accept a global batch size (micro batch x accumulation x ranks) "
            "other than the checkpoint's; the result then differs from an uninterrupted run"
        ),
    )
    a("--no_truncate", action="store_true", help="error on examples longer than --seq_len instead of truncating them")
    a("--no_final_model", action="store_true", help="skip writing output_dir/final")
    a(
        "--no_checkpoint",
        action="store_true",
        help=(
            "write no checkpoint, not even the last one (a run that only needs output_dir/final, "
            "e.g. one of a study); not with --save_every or --resume"
        ),
    )
    a(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=(
            "set any config key by its JSON path, e.g. "
            "--set lift.seed=3 --set zero_optimization.stage=3 (VALUE is JSON, else a string)"
        ),
    )
    a(
        "--local_rank",
        "--local-rank",
        type=int,
        default=int(os.environ.get("LOCAL_RANK", 0)),
        help="set by the deepspeed launcher",
    )
    _add_lift_flags(p)
    return p


@dataclass
class Launch:
    """What launch/train.py was asked to do, checked before the process group starts.

    Attributes:
        args: the parsed command line (launcher-only flags: data, output, evaluation, ...).
        config: the run configuration (config file + every flag that sets a config key).
        builtin: the built-in quickstart model and data.
    """

    args: argparse.Namespace
    config: RunConfig
    builtin: bool

    @property
    def fmt(self) -> str:
        return self.args.format or ("classification" if self.builtin else "text")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def overrides_from_args(args: argparse.Namespace, raw: dict[str, Any], problems: list[str]) -> list[Override]:
    """Every flag that sets a config key, as an override of its JSON path."""
    out: list[Override] = []
    for f in lift_settings():
        value = getattr(args, f.name, None) if f.metadata["flag"] else None
        if value is None:
            continue
        kind = f.metadata["kind"]
        if kind == "layer_range":
            try:
                value = [int(x) for x in value.split(",")]
            except ValueError:
                problems.append(f"--layer_range: expected two integers like 6,8, got {value!r}")
                continue
        elif kind == "patterns":
            value = [x for x in value.split(",") if x]
        out.append(Override(f"lift.{f.name}", value, f"--{f.name}"))
    for flag, path, _, _ in TRAINING_FLAGS:
        value = getattr(args, flag)
        if value is None:
            continue
        if flag == "lr" and not isinstance(raw.get("optimizer"), dict):
            out.append(Override("optimizer.type", "AdamW", "--lr"))
        out.append(Override(path, value, f"--{flag}"))
    if args.method is not None:
        out.append(Override("lift.method", args.method, "--method"))
    if not isinstance(raw.get("lift"), dict) or "seed" not in raw["lift"]:
        out.append(Override("lift.seed", args.seed, "--seed"))
    for item in args.overrides:
        key, eq, value = item.partition("=")
        if not eq or not key:
            problems.append(f"--set: {item!r} must be KEY=VALUE with KEY a dotted JSON path, e.g. lift.seed=3")
        else:
            out.append(Override(key, _parse_value(value), f"--set {key}"))
    return out


def resolve(args: argparse.Namespace) -> Launch:
    """Check the arguments and build the run configuration; one ConfigError lists every problem."""
    problems: list[str] = []
    builtin = args.model is None and args.data is None
    if args.model is None and args.data is not None:
        problems.append("--model: required when --data is given (the built-in model goes with the built-in data)")
    for flag in ("data", "eval_data"):
        path = getattr(args, flag)
        if path is not None and not Path(path).is_file():
            problems.append(
                f"--{flag}: {path!r} is a directory; give a file"
                if Path(path).is_dir()
                else f"--{flag}: file {path!r} does not exist"
            )
    problems += _model_and_tokenizer_problems(args)
    problems += preflight.output_dir_problems(args)
    # the flags that set a config key (TRAINING_FLAGS, the lift flags) are checked by its declaration, naming the flag
    for flag in ("seq_len", "lora_r", "eval_batch_size"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            problems.append(f"--{flag}: must be >= 1, got {v}")
    if not 0 <= args.seed < 2**32:
        problems.append(
            f"--seed: must be an integer in [0, 2**32), got {args.seed} (NumPy's and the data order's range)"
        )
    for flag in ("save_every", "eval_every", "eval_limit", "keep_checkpoints"):
        if getattr(args, flag) < 0:
            problems.append(f"--{flag}: must be >= 0, got {getattr(args, flag)}")
    if args.no_checkpoint and (args.save_every or args.resume):
        problems.append(
            "--no_checkpoint: "
            f"contradicts {'--save_every ' + str(args.save_every) if args.save_every else '--resume'}; "
            "drop one of the two (--no_checkpoint writes no checkpoint to save or to resume from)"
        )
    fmt = args.format or ("classification" if builtin else "text")
    if args.classifier_head and fmt != "classification":
        problems.append(f"--classifier_head: needs --format classification, got {args.format!r}")
    if args.classifier_head and args.baseline == "lora":
        problems.append("--classifier_head: not supported with --baseline lora; use LIFT or --baseline full")
    if args.baseline is not None and args.method is not None:
        problems.append(
            f"--baseline: {args.baseline} trains instead of a layer-wise method, but --method "
            f"{args.method} is given; use one or the other"
        )
    try:
        raw, source = read_config_file(args.ds_config)
    except ConfigError as e:
        raise ConfigError([f"--ds_config: {p}" for p in e.problems] + problems, source=e.source) from None
    overrides = overrides_from_args(args, raw, problems)
    try:
        config = load_run_config(
            raw,
            overrides,
            world_size=get_world_size(),
            method=args.baseline or "lift",
            source=source,
            total_steps_flag="--max_steps",
        )
    except ConfigError as e:
        problems += e.problems
    else:
        if args.baseline is not None and args.method is None and config.lift.method != "lift":
            problems.append(
                f"--baseline: {args.baseline} is a baseline, but the config's lift.method is "
                f"{config.lift.method!r}; use one or the other"
            )
        args.method = config.lift.method
        if config.lift.block_store == "disk" and config.lift.block_store_dir:
            problems += preflight.writable_dir_problems(config.lift.block_store_dir, "--block_store_dir")
    if problems:
        raise ConfigError(problems, source=args.ds_config)
    return Launch(args=args, config=config, builtin=builtin)


def _model_and_tokenizer_problems(args: argparse.Namespace) -> list[str]:
    """``--model`` / ``--tokenizer``: local directories checked, hub ids resolved to the local cache
    (``args.model`` / ``args.tokenizer`` become those directories)."""
    problems: list[str] = []
    if args.model is not None:
        args.model, found = preflight.resolve_dir(args.model, "--model")
        problems += found or preflight.model_dir_problems(args.model, args.random_init)
    if args.tokenizer is not None:
        args.tokenizer, found = preflight.resolve_dir(args.tokenizer, "--tokenizer", tokenizer_only=True)
        problems += found or preflight.tokenizer_dir_problems(args.tokenizer, "--tokenizer")
    elif args.model is not None and not problems:
        problems += preflight.tokenizer_dir_problems(args.model, "--model (its tokenizer; or give --tokenizer)")
    return problems


def check_model(launch: Launch, model_dir: str, data: Any, pad_id: int | None) -> tuple[RunConfig, LiftPlan | None]:
    """Check the model against the run before any weight is loaded, on a meta-device copy: it builds,
    its shapes make sense, the data's token ids and lengths fit it, the plan resolves (a layer range
    past the model, a pattern matching nothing, fewer steps than blocks), and the run fits in memory
    and on disk; each problem names its flag. Returns the config with a classification head added to
    ``always_trainable``, and the plan (None for the full / LoRA baselines), which ``lift_ds.initialize`` takes
    as is."""
    from .plan import resolve_plan
    from .recipe import build_model, head_module_names

    config, args, source = launch.config, launch.args, launch.args.ds_config
    try:
        model = build_model(model_dir, num_labels=data.num_labels, pad_id=pad_id, meta=True)
    except Exception as e:  # noqa: BLE001 - transformers' many ways of refusing a config
        text = " ".join(str(e).split())
        kind = (
            "a sequence-classification model (--classifier_head)"
            if data.num_labels is not None
            else "a causal language model"
        )
        if "Unrecognized configuration class" in text:
            text = f"{text[: text.find(' for this kind of AutoModel')]}: not {kind}, which LIFT trains"
        raise ConfigError(
            [f"--model: transformers cannot build a model from {model_dir!r}: {type(e).__name__}: {text[:300]}"],
            source=source,
        ) from None
    t = config.training
    batch = (t.micro_batch_size, t.gradient_accumulation_steps, config.world_size)
    problems = preflight.architecture_problems(model) + preflight.data_fit_problems(
        model, data, pad_id, args.seq_len, batch
    )
    if problems:
        raise ConfigError(problems, source=source)
    plan = None
    if args.baseline is None:
        if data.num_labels is not None:
            config = config.with_lift(
                always_trainable=list(dict.fromkeys(list(config.lift.always_trainable) + head_module_names(model)))
            )
        plan = resolve_plan(model, config.lift)
        problem = plan.never_trained_problem("--max_steps")
        if problem:
            raise ConfigError([problem], source=source)
    problems = preflight.resource_problems(args, config, model_dir, model)
    if problems:
        raise ConfigError(problems, source=source)
    return config, plan
