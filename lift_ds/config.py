"""LIFT configuration: the ``"lift"`` section of a DeepSpeed JSON, and the top-level keys LIFT reads.

No torch import here. :func:`parse_config` reads a path or a dict, checks every field and raises one
:class:`ConfigError` listing every problem with its JSON path, before anything heavy starts.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from .schedule import POLICIES, SCHEDULES

BACKENDS = ("torch", "deepspeed", "fsdp")
OPTIMIZER_STATES = ("reset", "offload")
#: The one default for ``gradient_clipping`` on every backend: DeepSpeed's own default and the
#: Hugging Face Trainer's ``max_grad_norm``. ``0`` turns clipping off. It is always written into the
#: DeepSpeed config explicitly, so the meaning never depends on a library default.
DEFAULT_GRADIENT_CLIPPING = 1.0


class ConfigError(ValueError):
    """A configuration problem. ``problems`` holds one line per problem, each naming its JSON path."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid LIFT configuration ({source}), {len(self.problems)} problem(s):\n{lines}")


@dataclass(frozen=True)
class LiftConfig:
    """The ``"lift"`` section of a DeepSpeed config.

    Attributes:
        schedule: order of the candidate blocks: ``front2end`` (embedding side first, the paper's
            default), ``end2front``, or ``random`` (uniform draws with replacement).
        policy: ``grouped`` (each block's floor(t/N) steps contiguous, the paper's default) or
            ``cyclic`` (round-robin, one step per block).
        total_steps: optimizer steps in the whole run, t. ``None`` or ``"auto"`` means the caller
            (the launcher's ``--max_steps``) fills it in.
        layer_range: ``[first, last]``, 1-indexed and inclusive over the decoder/encoder layers, as
            in the paper's tables (``[6, 8]`` is the middle three of twelve). ``None``: all layers.
        include_embedding: also train the input embedding block (and tied output embeddings).
        include_head: also train the head block (final norm and lm_head / classifier).
        always_trainable: module-name patterns (``fnmatch`` style, e.g. ``"classifier"`` or
            ``"*.score"``) whose parameters train in every phase, e.g. a new classification head.
        seed: seed of the ``random`` schedule; every rank computes the same plan from it.
        optimizer_state: ``reset`` (a fresh optimizer each phase) or ``offload`` (a block's
            optimizer state is kept on CPU between its phases and restored when it returns).
        backend: ``torch`` (single process, the reference), ``deepspeed`` or ``fsdp``.
        max_consecutive_skipped_steps: an optimizer step whose loss (on any rank) or gradient norm
            is NaN/inf is skipped and counted; this many skipped in a row stop the run with a
            :class:`~lift_ds.engine.DivergenceError` (0: never stop). fp16 loss-scale overflows,
            which DeepSpeed's loss scaler handles, are counted but do not stop the run.
    """

    schedule: str = "front2end"
    policy: str = "grouped"
    total_steps: int | None = None
    layer_range: tuple[int, int] | None = None
    include_embedding: bool = False
    include_head: bool = False
    always_trainable: tuple[str, ...] = ()
    seed: int = 0
    optimizer_state: str = "reset"
    backend: str = "torch"
    max_consecutive_skipped_steps: int = 5

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layer_range"] = list(self.layer_range) if self.layer_range else None
        d["always_trainable"] = list(self.always_trainable)
        return d

    def replace(self, **changes: Any) -> "LiftConfig":
        """A copy with some fields changed (validated again)."""
        merged = {**self.to_dict(), **changes}
        return parse_lift_section(merged)


_LIFT_KEYS = {f.name for f in fields(LiftConfig)}


def is_comment_key(key: str) -> bool:
    """Keys named ``_comment...`` document a JSON config; they are ignored everywhere."""
    return isinstance(key, str) and key.startswith("_comment")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_lift_section(section: Mapping[str, Any], path: str = "lift") -> LiftConfig:
    """Check a ``"lift"`` section and build a :class:`LiftConfig`; raise one error for all problems."""
    problems: list[str] = []
    if not isinstance(section, Mapping):
        raise ConfigError([f"{path}: must be a JSON object, got {type(section).__name__}"])
    for key in section:
        if key not in _LIFT_KEYS and not is_comment_key(key):
            problems.append(f"{path}.{key}: unknown key; allowed keys are {', '.join(sorted(_LIFT_KEYS))}")
    v = dict(section)
    out: dict[str, Any] = {}

    def choice(key: str, allowed: tuple[str, ...]) -> None:
        if key in v:
            if v[key] not in allowed:
                problems.append(f"{path}.{key}: got {v[key]!r}; allowed: {', '.join(allowed)}")
            else:
                out[key] = v[key]

    def boolean(key: str) -> None:
        if key in v:
            if not isinstance(v[key], bool):
                problems.append(f"{path}.{key}: must be true or false, got {v[key]!r}")
            else:
                out[key] = v[key]

    choice("schedule", SCHEDULES)
    choice("policy", POLICIES)
    choice("optimizer_state", OPTIMIZER_STATES)
    choice("backend", BACKENDS)
    boolean("include_embedding")
    boolean("include_head")
    if "total_steps" in v and v["total_steps"] not in (None, "auto"):
        if not _is_int(v["total_steps"]) or v["total_steps"] < 1:
            problems.append(f"{path}.total_steps: must be an integer >= 1 or \"auto\", got {v['total_steps']!r}")
        else:
            out["total_steps"] = v["total_steps"]
    if "seed" in v:
        if not _is_int(v["seed"]):
            problems.append(f"{path}.seed: must be an integer, got {v['seed']!r}")
        else:
            out["seed"] = v["seed"]
    if "max_consecutive_skipped_steps" in v:
        m = v["max_consecutive_skipped_steps"]
        if not _is_int(m) or m < 0:
            problems.append(f"{path}.max_consecutive_skipped_steps: must be an integer >= 0 (0: never stop), got {m!r}")
        else:
            out["max_consecutive_skipped_steps"] = m
    if "layer_range" in v and v["layer_range"] is not None:
        lr = v["layer_range"]
        if (
            not isinstance(lr, (list, tuple))
            or len(lr) != 2
            or not all(_is_int(x) for x in lr)
            or lr[0] < 1
            or lr[1] < lr[0]
        ):
            problems.append(
                f"{path}.layer_range: must be [first, last], 1-indexed integers with 1 <= first <= last "
                f"(e.g. [6, 8] for the middle three of twelve layers), or null for all layers; got {lr!r}"
            )
        else:
            out["layer_range"] = (int(lr[0]), int(lr[1]))
    if "always_trainable" in v:
        at = v["always_trainable"]
        if isinstance(at, str):
            at = [at]
        if not isinstance(at, (list, tuple)) or not all(isinstance(x, str) and x for x in at):
            problems.append(
                f"{path}.always_trainable: must be a list of module-name patterns (strings), got {v['always_trainable']!r}"
            )
        else:
            out["always_trainable"] = tuple(at)
    if problems:
        raise ConfigError(problems)
    return LiftConfig(**out)


@dataclass(frozen=True)
class TrainingConfig:
    """The top-level DeepSpeed keys that LIFT itself reads (every backend gives them one meaning).

    Attributes:
        micro_batch_size: ``train_micro_batch_size_per_gpu``.
        gradient_accumulation_steps: micro-steps per optimizer step; a phase boundary falls only
            after the last of them.
        train_batch_size: micro_batch_size x gradient_accumulation_steps x world size.
        gradient_clipping: global gradient-norm clip over the trained parameters; 0 is off.
        precision: ``fp32``, ``bf16`` or ``fp16``.
        optimizer: the ``optimizer`` section (``{"type": ..., "params": {...}}``) or None.
        scheduler: the ``scheduler`` section or None; it runs over the whole run across phases.
    """

    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    train_batch_size: int = 1
    gradient_clipping: float = DEFAULT_GRADIENT_CLIPPING
    precision: str = "fp32"
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None


def _positive_int_or_auto(d: Mapping[str, Any], key: str, problems: list[str]) -> int | None:
    if key not in d or d[key] in (None, "auto"):
        return None
    if not _is_int(d[key]) or d[key] < 1:
        problems.append(f"{key}: must be an integer >= 1 or \"auto\", got {d[key]!r}")
        return None
    return d[key]


def resolve_training(config: Mapping[str, Any], world_size: int) -> TrainingConfig:
    """Check the top-level keys LIFT reads and fill ``"auto"`` batch sizes from the world size.

    The DeepSpeed rule holds: train_batch_size = micro x accumulation x world size. Any two of the
    three determine the third; a missing micro batch size defaults to 1 and accumulation to 1.
    """
    problems: list[str] = []
    micro = _positive_int_or_auto(config, "train_micro_batch_size_per_gpu", problems)
    gas = _positive_int_or_auto(config, "gradient_accumulation_steps", problems)
    total = _positive_int_or_auto(config, "train_batch_size", problems)
    if not problems:
        if total is not None and micro is not None and gas is None:
            gas, rem = divmod(total, micro * world_size)
            if rem or gas < 1:
                problems.append(
                    f"train_batch_size: {total} is not a multiple of train_micro_batch_size_per_gpu ({micro}) "
                    f"x world size ({world_size}); set train_batch_size to a multiple of {micro * world_size}"
                )
        elif total is not None and gas is not None and micro is None:
            micro, rem = divmod(total, gas * world_size)
            if rem or micro < 1:
                problems.append(
                    f"train_batch_size: {total} is not a multiple of gradient_accumulation_steps ({gas}) "
                    f"x world size ({world_size}); set train_batch_size to a multiple of {gas * world_size}"
                )
        elif total is not None and micro is None and gas is None:
            micro, gas = None, 1
            micro, rem = divmod(total, world_size)
            if rem or micro < 1:
                problems.append(
                    f"train_batch_size: {total} is not a multiple of the world size ({world_size})"
                )
        micro = micro or 1
        gas = gas or 1
        if total is not None and not problems and total != micro * gas * world_size:
            problems.append(
                f"train_batch_size: {total} != train_micro_batch_size_per_gpu ({micro}) x "
                f"gradient_accumulation_steps ({gas}) x world size ({world_size}) = {micro * gas * world_size}; "
                "fix one of the three or set it to \"auto\""
            )
    clip = config.get("gradient_clipping", DEFAULT_GRADIENT_CLIPPING)
    if clip == "auto":
        clip = DEFAULT_GRADIENT_CLIPPING
    if not _is_number(clip) or clip < 0:
        problems.append(f"gradient_clipping: must be a number >= 0 (0 turns clipping off), got {clip!r}")
    precision = "fp32"
    for key in ("bf16", "fp16"):
        sec = config.get(key)
        if sec is None:
            continue
        if not isinstance(sec, Mapping) or not isinstance(sec.get("enabled", False), (bool, str)):
            problems.append(f"{key}: must be an object like {{\"enabled\": true}}, got {sec!r}")
        elif sec.get("enabled") is True:
            if precision != "fp32":
                problems.append("bf16.enabled and fp16.enabled: only one of the two may be true")
            precision = key
    for key in ("optimizer", "scheduler"):
        sec = config.get(key)
        if sec is not None and (not isinstance(sec, Mapping) or not isinstance(sec.get("type"), str)):
            problems.append(f"{key}: must be an object with a string \"type\" and a \"params\" object, got {sec!r}")
        elif sec is not None and not isinstance(sec.get("params", {}), Mapping):
            problems.append(f"{key}.params: must be an object, got {sec.get('params')!r}")
    if problems:
        raise ConfigError(problems)
    return TrainingConfig(
        micro_batch_size=micro,
        gradient_accumulation_steps=gas,
        train_batch_size=micro * gas * world_size,
        gradient_clipping=float(clip),
        precision=precision,
        optimizer=dict(config["optimizer"]) if config.get("optimizer") else None,
        scheduler=dict(config["scheduler"]) if config.get("scheduler") else None,
    )


OFFLOAD_DEVICES = ("none", "cpu", "nvme")
#: optimizer types DeepSpeed can run offloaded (DeepSpeedCPUAdam, DeepSpeedCPUAdagrad, DeepSpeedCPULion)
OFFLOADABLE_OPTIMIZERS = ("adam", "adamw", "adagrad", "lion")


def deepspeed_problems(raw: Mapping[str, Any]) -> list[str]:
    """The ``zero_optimization`` keys backend ``deepspeed`` would only reject after its process
    group started (or silently mis-handle), checked up front."""
    zero = raw.get("zero_optimization")
    if zero is None:
        return []
    if not isinstance(zero, Mapping):
        return [f"zero_optimization: must be an object like {{\"stage\": 2}}, got {zero!r}"]
    problems = []
    stage = zero.get("stage", 0)
    if not _is_int(stage) or stage not in (0, 1, 2, 3):
        problems.append(f"zero_optimization.stage: got {stage!r}; allowed: 0, 1, 2, 3")
    for key in ("offload_optimizer", "offload_param"):
        sec = zero.get(key)
        if sec is None:
            continue
        if not isinstance(sec, Mapping):
            problems.append(f"zero_optimization.{key}: must be an object like {{\"device\": \"cpu\"}}, got {sec!r}")
            continue
        dev = sec.get("device", "none") or "none"
        if dev not in OFFLOAD_DEVICES:
            problems.append(f"zero_optimization.{key}.device: got {dev!r}; allowed: {', '.join(OFFLOAD_DEVICES)}")
            continue
        if dev == "none":
            continue
        if dev == "nvme" and not sec.get("nvme_path"):
            problems.append(f"zero_optimization.{key}.nvme_path: required with device \"nvme\" (a directory on a local NVMe drive)")
        if key == "offload_param" and stage != 3:
            problems.append(f"zero_optimization.offload_param: only ZeRO stage 3 offloads parameters (stage is {stage!r}); use offload_optimizer, or stage 3")
        if key == "offload_optimizer":
            if stage not in (1, 2, 3):
                problems.append(f"zero_optimization.offload_optimizer: needs ZeRO stage 1, 2 or 3 (stage is {stage!r})")
            opt = raw.get("optimizer")
            kind = opt.get("type") if isinstance(opt, Mapping) else None
            if not isinstance(kind, str) or kind.lower() not in OFFLOADABLE_OPTIMIZERS:
                problems.append(
                    f"zero_optimization.offload_optimizer: DeepSpeed runs an offloaded optimizer with its CPU ops "
                    f"(DeepSpeedCPUAdam, -Adagrad, -Lion); optimizer.type {kind!r} has none. Use Adam, AdamW, Adagrad or Lion, "
                    "or remove the offload"
                )
    return problems


FSDP_KEYS = ("cpu_offload", "reshard_after_forward")


def fsdp_problems(raw: Mapping[str, Any]) -> list[str]:
    """Config keys backend ``fsdp`` cannot honour, and a check of its ``"fsdp"`` section."""
    problems = []
    zero = raw.get("zero_optimization") or {}
    if isinstance(zero, Mapping) and zero.get("stage", 0) not in (0, None):
        problems.append(
            f"zero_optimization.stage: {zero.get('stage')} is a DeepSpeed ZeRO stage; backend \"fsdp\" always shards "
            "parameters, gradients and optimizer state (like ZeRO-3). Remove zero_optimization or use backend \"deepspeed\""
        )
    if isinstance(zero, Mapping) and (zero.get("offload_optimizer") or zero.get("offload_param")):
        problems.append("zero_optimization.offload_*: DeepSpeed offload does not apply to backend \"fsdp\"; use \"fsdp\": {\"cpu_offload\": true}")
    if isinstance(raw.get("fp16"), Mapping) and raw["fp16"].get("enabled") is True:
        problems.append("fp16.enabled: backend \"fsdp\" has no loss scaler here; use bf16")
    sec = raw.get("fsdp", {})
    if not isinstance(sec, Mapping):
        problems.append(f"fsdp: must be an object, got {sec!r}")
        return problems
    for k, v in sec.items():
        if is_comment_key(k):
            continue
        if k not in FSDP_KEYS:
            problems.append(f"fsdp.{k}: unknown key; allowed: {', '.join(FSDP_KEYS)}")
        elif not isinstance(v, bool):
            problems.append(f"fsdp.{k}: must be true or false, got {v!r}")
    return problems


def load_config(config: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """Read a DeepSpeed JSON file (or take a dict) and return a copy of it as a dict."""
    if isinstance(config, Mapping):
        return json.loads(json.dumps(config))
    p = Path(config)
    if not p.is_file():
        raise ConfigError([f"config file {str(p)!r} does not exist"], source=str(p))
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError([f"not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}"], source=str(p)) from None
    if not isinstance(data, dict):
        raise ConfigError([f"top level must be a JSON object, got {type(data).__name__}"], source=str(p))
    return data


def parse_config(config: str | Path | Mapping[str, Any], world_size: int = 1) -> tuple[LiftConfig, TrainingConfig, dict[str, Any]]:
    """Read and check a whole DeepSpeed config with a ``"lift"`` section.

    Returns:
        ``(lift, training, raw)``: the lift section, the top-level keys LIFT reads, and the raw dict.

    Raises:
        ConfigError: listing every problem (lift section and top level together).
    """
    source = str(config) if not isinstance(config, Mapping) else "config"
    raw = load_config(config)
    problems: list[str] = []
    lift = training = None
    try:
        lift = parse_lift_section(raw.get("lift", {}))
    except ConfigError as e:
        problems += e.problems
    try:
        training = resolve_training(raw, world_size)
    except ConfigError as e:
        problems += e.problems
    if lift is not None and lift.backend == "fsdp":
        problems += fsdp_problems(raw)
    elif "fsdp" in raw:
        problems.append(f"fsdp: this section only applies to lift.backend \"fsdp\" (the backend is {lift.backend!r})" if lift else "fsdp: unexpected")
    if lift is not None and lift.backend == "deepspeed":
        problems += deepspeed_problems(raw)
    if lift is not None and lift.backend == "torch" and training is not None and training.precision == "fp16":
        problems.append("fp16.enabled: the torch reference backend has no loss scaler; use bf16 or backend \"deepspeed\"")
    if problems:
        raise ConfigError(problems, source=source)
    assert lift is not None and training is not None
    return lift, training, raw
