"""Command-line arguments of launch/train.py and their checks (run before any process group starts)."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, parse_config
from .data import FORMATS

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "ds_configs" / "zero2.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/train.py",
        description="LIFT fine-tuning (and full / LoRA baselines) under the deepspeed launcher or torchrun. "
        "With no --model and --data it runs the built-in quickstart: SmolLM2-135M-Instruct on movie-review sentiment.",
    )
    a = p.add_argument
    a("--ds_config", "--deepspeed_config", dest="ds_config", default=str(DEFAULT_CONFIG), help="DeepSpeed JSON with a \"lift\" section (default: ds_configs/zero2.json)")
    a("--model", default=None, help="local Hugging Face directory or hub id (default: the built-in SmolLM2-135M-Instruct)")
    a("--random_init", action="store_true", help="build the model from --model's config with fresh weights (smoke runs)")
    a("--tokenizer", default=None, help="tokenizer directory or id (default: --model); SentencePiece tokenizer.model directories work")
    a("--data", default=None, help="training file (default: the built-in movie-review sentiment set)")
    a("--eval_data", default=None, help="held-out file in the same format")
    a("--format", default=None, choices=FORMATS, help="data format (default: classification for the built-in data, else text)")
    a("--labels", default=None, help="comma-separated label words for --format classification (default: those in the data)")
    a("--classifier_head", action="store_true", help="--format classification with a sequence-classification head (new, trained in every phase) instead of label-word likelihood")
    a("--method", default="lift", choices=("lift", "full", "lora"), help="lift, or a baseline: full fine-tuning or LoRA (peft)")
    a("--max_steps", type=int, default=None, help="optimizer steps (overrides lift.total_steps)")
    a("--seq_len", type=int, default=128)
    a("--seed", type=int, default=0, help="model init, data order and the random schedule")
    a("--lr", type=float, default=None, help="learning rate (overrides optimizer.params.lr)")
    a("--micro_batch_size", type=int, default=None, help="overrides train_micro_batch_size_per_gpu")
    a("--gradient_accumulation_steps", type=int, default=None)
    a("--schedule", default=None, help="overrides lift.schedule")
    a("--policy", default=None, help="overrides lift.policy")
    a("--layer_range", default=None, help="overrides lift.layer_range, e.g. 6,8")
    a("--include_embedding", action="store_true", default=None)
    a("--include_head", action="store_true", default=None)
    a("--backend", default=None, help="overrides lift.backend")
    a("--lora_r", type=int, default=8)
    a("--output_dir", default="outputs/run")
    a("--save_every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    a("--keep_checkpoints", type=int, default=2, help="keep the newest K checkpoints")
    a("--eval_every", type=int, default=0, help="evaluate every N steps (0: before and after only)")
    a("--eval_limit", type=int, default=0, help="evaluate on the first N held-out items (0: all)")
    a("--eval_batch_size", type=int, default=16)
    a("--resume", action="store_true", help="continue from the newest checkpoint in --output_dir")
    a("--no_truncate", action="store_true", help="error on examples longer than --seq_len instead of truncating them")
    a("--no_final_model", action="store_true", help="skip writing output_dir/final")
    a("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help="set by the deepspeed launcher")
    return p


@dataclass
class Plan:
    """Everything checked and resolved before the process group starts."""

    args: argparse.Namespace
    config: dict[str, Any]
    builtin: bool


def resolve(args: argparse.Namespace) -> Plan:
    """Check the arguments and merge them into the config; raise one ConfigError with every problem."""
    problems: list[str] = []
    builtin = args.model is None and args.data is None
    if args.model is None and args.data is not None:
        problems.append("--model: required when --data is given (the built-in model goes with the built-in data)")
    if args.data is not None and not Path(args.data).is_file():
        problems.append(f"--data: file {args.data!r} does not exist")
    if args.eval_data is not None and not Path(args.eval_data).is_file():
        problems.append(f"--eval_data: file {args.eval_data!r} does not exist")
    if args.model is not None and os.path.sep in args.model and not Path(args.model).is_dir():
        problems.append(f"--model: directory {args.model!r} does not exist (give a local Hugging Face directory or a hub id)")
    for flag in ("max_steps", "seq_len", "micro_batch_size", "gradient_accumulation_steps", "lora_r"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            problems.append(f"--{flag}: must be >= 1, got {v}")
    for flag in ("save_every", "eval_every", "eval_limit", "keep_checkpoints"):
        if getattr(args, flag) < 0:
            problems.append(f"--{flag}: must be >= 0, got {getattr(args, flag)}")
    if args.lr is not None and not args.lr > 0:
        problems.append(f"--lr: must be > 0, got {args.lr}")
    try:
        cfg = json.loads(Path(args.ds_config).read_text())
    except FileNotFoundError:
        raise ConfigError([f"--ds_config: file {args.ds_config!r} does not exist"] + problems) from None
    except json.JSONDecodeError as e:
        raise ConfigError([f"--ds_config {args.ds_config}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}"] + problems) from None
    if not isinstance(cfg, dict):
        raise ConfigError([f"--ds_config {args.ds_config}: top level must be a JSON object, got {type(cfg).__name__}"] + problems)
    if not isinstance(cfg.get("lift", {}), dict):
        raise ConfigError([f"lift: must be a JSON object, got {type(cfg['lift']).__name__}"] + problems, source=args.ds_config)
    lift = dict(cfg.get("lift", {}))
    for flag, key in (("max_steps", "total_steps"), ("schedule", "schedule"), ("policy", "policy"), ("backend", "backend"),
                      ("include_embedding", "include_embedding"), ("include_head", "include_head")):
        if getattr(args, flag) is not None:
            lift[key] = getattr(args, flag)
    if args.layer_range is not None:
        try:
            lift["layer_range"] = [int(x) for x in args.layer_range.split(",")]
        except ValueError:
            problems.append(f"--layer_range: expected two integers like 6,8, got {args.layer_range!r}")
    if "seed" not in lift:
        lift["seed"] = args.seed
    cfg["lift"] = lift
    if args.micro_batch_size is not None:
        cfg["train_micro_batch_size_per_gpu"] = args.micro_batch_size
    if args.gradient_accumulation_steps is not None:
        cfg["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    if args.max_steps is None and lift.get("total_steps") in (None, "auto"):
        problems.append("--max_steps: required (the config's lift.total_steps is \"auto\")")
    if args.lr is not None:
        cfg.setdefault("optimizer", {"type": "AdamW", "params": {}}).setdefault("params", {})["lr"] = args.lr
    if args.classifier_head and (args.format or ("classification" if builtin else "text")) != "classification":
        problems.append(f"--classifier_head: needs --format classification, got {args.format!r}")
    if args.classifier_head and args.method == "lora":
        problems.append("--classifier_head: not supported with --method lora; use lift or full")
    zero = cfg.get("zero_optimization") if isinstance(cfg.get("zero_optimization"), dict) else {}
    if args.method == "lora" and zero.get("stage") == 3:
        problems.append("--method lora: use a ZeRO-1/2 config (ZeRO-3 with peft adapters is not supported here)")
    try:
        parse_config(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as e:
        problems += e.problems
    if not problems:
        problems += optimizer_problems(cfg)
    if problems:
        raise ConfigError(problems, source=args.ds_config)
    return Plan(args=args, config=cfg, builtin=builtin)


def cpu_op_problem() -> str | None:
    """None when DeepSpeed's CPU optimizer ops are pre-built or can be compiled here (ninja and a C++ compiler)."""
    import shutil

    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        return "zero_optimization.offload_optimizer: needs DeepSpeed (pip install deepspeed)"
    if installed_ops.get("cpu_adam"):
        return None
    from torch.utils.cpp_extension import is_ninja_available

    missing = [name for name, ok in (("ninja", is_ninja_available()), ("a C++ compiler", shutil.which(os.environ.get("CXX", "c++")) is not None)) if not ok]
    if not missing:
        return None
    return (
        f"zero_optimization.offload_optimizer: DeepSpeed's CPU optimizer op (cpu_adam) is not pre-built and cannot be compiled "
        f"here: {' and '.join(missing)} not found. Install them (pip install ninja; apt-get install g++), or install DeepSpeed "
        "with DS_BUILD_CPU_ADAM=1, or remove the offload"
    )


def optimizer_problems(cfg: dict[str, Any]) -> list[str]:
    """The optimizer and scheduler sections, checked by building nothing: parameters and names."""
    import inspect

    from .optim import optimizer_factory_from_section

    problems: list[str] = []
    backend = cfg["lift"].get("backend", "torch")
    opt = cfg.get("optimizer")
    if isinstance(opt, dict):
        lr = opt.get("params", {}).get("lr")
        if lr is not None and lr != "auto" and (not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0):
            problems.append(f"optimizer.params.lr: must be a number > 0, got {lr!r}")
        elif str(opt["type"]).lower() in ("adam", "adamw", "sgd") or backend != "deepspeed":
            try:
                optimizer_factory_from_section(opt)
            except ConfigError as e:
                problems += e.problems
    zero = cfg.get("zero_optimization") or {}
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    if backend == "deepspeed" and offload:
        p = cpu_op_problem()
        if p:
            problems.append(p)
    sched = cfg.get("scheduler")
    if isinstance(sched, dict):
        from deepspeed.runtime import lr_schedules

        kind = sched["type"]
        if kind not in lr_schedules.VALID_LR_SCHEDULES:
            problems.append(f"scheduler.type: {kind!r} unknown; allowed: {', '.join(lr_schedules.VALID_LR_SCHEDULES)}")
        else:
            allowed = set(inspect.signature(getattr(lr_schedules, kind).__init__).parameters) - {"self", "optimizer"}
            for k in sorted(set(sched.get("params", {})) - allowed):
                problems.append(f"scheduler.params.{k}: not a parameter of {kind}; allowed: {', '.join(sorted(allowed))}")
    return problems


def check_plan_fits_model(num_layers: int, cfg: dict[str, Any], method: str) -> None:
    """Under the grouped policy every candidate block needs a step: say what would happen otherwise."""
    if method != "lift":
        return
    lift = cfg["lift"]
    first, last = lift.get("layer_range") or (1, num_layers)
    if last > num_layers:
        raise ConfigError([f"lift.layer_range: {[first, last]} reaches past the model's {num_layers} layers; allowed 1 <= first <= last <= {num_layers}"])
    n = last - first + 1 + bool(lift.get("include_embedding")) + bool(lift.get("include_head"))
    steps = lift["total_steps"]
    if steps < n:
        raise ConfigError([
            f"--max_steps: {steps} is below the {n} candidate blocks, so {n - steps} blocks would never train "
            f"(each block gets floor({steps}/{n}) = 0 steps, the first {steps} one extra). Use --max_steps >= {n}, or fewer blocks "
            f"(e.g. --layer_range {max(1, last - steps + 1)},{last})"
        ])
