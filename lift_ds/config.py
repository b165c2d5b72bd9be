"""The run configuration: one typed object, built once from a DeepSpeed JSON plus overrides.

No torch import at module level. This module declares the sections (:class:`LiftConfig`,
:class:`TrainingConfig`) and checks them; :mod:`lift_ds.run_config` builds the whole
:class:`~lift_ds.run_config.RunConfig`. :func:`~lift_ds.run_config.load_run_config` reads a path or a dict, applies
command-line overrides (dotted JSON paths), checks every field of the ``"lift"`` section and the
top-level keys LIFT reads, chooses the backend, lets that backend check its own keys and the
hardware, and raises ONE :class:`ConfigError` listing every problem with its JSON path (and the flag
it came from), before anything heavy starts. The result, a frozen :class:`RunConfig`, is what the
launcher, :func:`lift_ds.initialize`, the engine, the backends, ``lift_ds.memory`` and the analyses
receive.

Each ``lift`` key is declared once, as a field of :class:`LiftConfig` with :func:`setting`
metadata: its type, default, allowed values and help text. The validator, the launcher's
command-line flags (``lift_ds.cli``), the configuration table in docs/configuration.md (checked by a test) all come
from these declarations.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError
from .schedule import DEFAULT_LISA_LAYERS, METHODS, POLICIES, SCHEDULES

OPTIMIZER_STATES = ("reset", "offload")
#: ``lift.frozen_weights``: full precision, or Q-LIFT's quantized frozen layers (lift_ds.quant)
FROZEN_WEIGHTS = ("full", "int8", "nf4")
BLOCK_STORES = ("memory", "disk")
#: ``lift.loss``: the causal-LM loss (lift_ds.loss)
LOSS_MODES = ("auto", "chunked", "model")
#: the backends, by ``lift.backend`` name (``lift_ds.backends.REGISTRY`` is keyed by exactly these)
BACKEND_NAMES = ("torch", "deepspeed", "fsdp")
#: ``lift.backend`` values: the backends, and ``auto``, which follows the config
#: (see :func:`lift_ds.backends.choose_backend`)
BACKEND_CHOICES = ("auto", *BACKEND_NAMES)
#: The one default for ``gradient_clipping`` on every backend: DeepSpeed's own default and the
#: Hugging Face Trainer's ``max_grad_norm``. ``0`` turns clipping off. It is always written into the
#: DeepSpeed config explicitly, so the meaning never depends on a library default.
DEFAULT_GRADIENT_CLIPPING = 1.0
#: the most optimizer steps a plan may have (every step's block is computed up front)
MAX_TOTAL_STEPS = 10_000_000


# --------------------------------------------------------------------------- declarations


def setting(
    default: Any,
    help: str,
    *,
    kind: str,
    choices: tuple[str, ...] = (),
    minimum: int | None = None,
    maximum: int | None = None,
    auto: bool = False,
    flag: bool = True,
) -> Any:
    """Declare one ``lift`` key: a dataclass field whose metadata drives validation, flags and docs.

    Args:
        default: the value when the key is absent.
        help: one sentence for ``--help`` and the table in docs/configuration.md.
        kind: ``choice``, ``bool``, ``int``, ``layer_range``, ``patterns`` or ``path`` (a string or null).
        choices: allowed values of a ``choice``.
        minimum: smallest allowed ``int``.
        maximum: largest allowed ``int``.
        auto: an ``int`` that may be ``"auto"`` / null (filled in by the caller, e.g. ``--max_steps``).
        flag: generate a ``--<name>`` launcher flag.
    """
    return field(
        default=default,
        metadata={
            "help": help,
            "kind": kind,
            "choices": choices,
            "minimum": minimum,
            "maximum": maximum,
            "auto": auto,
            "flag": flag,
        },
    )


@dataclass(frozen=True)
class LiftConfig:
    """The ``"lift"`` section of a DeepSpeed config (each field's help is in its declaration)."""

    backend: str = setting(
        "auto",
        "where training runs: deepspeed (ZeRO-1/2/3, offload), fsdp (FSDP2, launch with torchrun), "
        "torch (one process, the reference); auto follows the config: a zero_optimization section means "
        "deepspeed, an fsdp section fsdp, neither torch on one process and deepspeed on several",
        kind="choice",
        choices=BACKEND_CHOICES,
    )
    method: str = setting(
        "lift",
        "lift: LIFT's plan; badam: BAdam 1.4's BlockOptimizer (one block per switch_every steps, a fresh "
        "Adam state per switch); lisa: LISA (embedding and head always, lisa_layers layers drawn per period of "
        "switch_every steps); the launcher's --method sets it",
        kind="choice",
        choices=METHODS,
        flag=False,
    )
    schedule: str = setting(
        "front2end",
        "block order: front2end (embedding side first, the paper's default), end2front, or "
        "random (N uniform draws with replacement, seeded); for badam: ascending, descending, or a fresh "
        "permutation per pass",
        kind="choice",
        choices=SCHEDULES,
    )
    policy: str = setting(
        "grouped",
        "grouped: each slot's floor(t/N) steps contiguous (the first t mod N slots get one more); "
        "cyclic: round-robin, one step per block",
        kind="choice",
        choices=POLICIES,
    )
    total_steps: int | None = setting(
        None,
        'optimizer steps t in the whole run; "auto": taken from --max_steps / total_steps=',
        kind="int",
        minimum=1,
        maximum=MAX_TOTAL_STEPS,
        auto=True,
        flag=False,
    )
    switch_every: int | None = setting(
        None,
        "badam / lisa: optimizer steps per block (BAdam's switch_block_every; null: 50) or "
        "per draw of layers (LISA's interval; null: 20); LIFT's phase lengths come from total_steps "
        "and policy",
        kind="int",
        minimum=1,
        auto=True,
    )
    lisa_layers: int | None = setting(
        None,
        f"lisa: decoder layers trained together in each period (LISA's gamma; null: "
        f"{DEFAULT_LISA_LAYERS}), drawn from the layer range without replacement",
        kind="int",
        minimum=1,
        auto=True,
    )
    layer_range: tuple[int, int] | None = setting(
        None,
        "[first, last], 1-indexed inclusive over the layers ([6, 8] = the middle three of twelve); null: all layers",
        kind="layer_range",
    )
    include_embedding: bool = setting(
        False, "also train the input embedding block (with tied output embeddings)", kind="bool"
    )
    include_head: bool = setting(False, "also train the head block (final norm + lm_head / classifier)", kind="bool")
    always_trainable: tuple[str, ...] = setting(
        (),
        'module-name patterns (fnmatch) trained in every phase, e.g. ["score"] for a new classification head',
        kind="patterns",
    )
    seed: int = setting(
        0,
        "seed of the random schedule (every rank computes the same plan); the launcher's --seed fills it",
        kind="int",
        minimum=0,
        maximum=2**32 - 1,
        flag=False,
    )
    optimizer_state: str = setting(
        "reset",
        "reset: a fresh optimizer each phase; offload: a block's optimizer state (and fp32 "
        "master) waits on CPU and comes back when the block does",
        kind="choice",
        choices=OPTIMIZER_STATES,
    )
    gradient_checkpointing: bool = setting(
        False,
        "recompute each layer's activations during backward (non-reentrant, through "
        "transformers' own switch): less activation memory; blocks before the active one are "
        "neither recomputed nor back-propagated",
        kind="bool",
    )
    frozen_weights: str = setting(
        "full",
        "Q-LIFT: full keeps every frozen layer in the training dtype; int8 / nf4 hold the decoder "
        "layers' linear weights quantized (torchao) while they are frozen, their exact weights in the block "
        "store; the active layer trains from its exact weights (torch backend, or DeepSpeed ZeRO-1/2)",
        kind="choice",
        choices=FROZEN_WEIGHTS,
    )
    block_store: str = setting(
        "memory",
        "where Q-LIFT keeps the exact weights of quantized layers: memory (host RAM) or disk "
        "(a safetensors file per layer in block_store_dir, for models larger than host memory)",
        kind="choice",
        choices=BLOCK_STORES,
    )
    block_store_dir: str | None = setting(
        None,
        "directory of a disk block store (null: a temporary directory, removed at the end); one per rank",
        kind="path",
    )
    loss: str = setting(
        "auto",
        "causal-LM training loss: chunked computes logits only at positions whose next-token label counts, "
        "in chunks, with the fp32 cross-entropy and its gradient fused (no fp32 logits over the whole vocabulary); "
        "auto: that, or on CUDA Liger's / cut-cross-entropy's fused kernel when installed, and the model's own "
        "loss for models it does not cover; model: the model's own forward (logits at every position). "
        "The training forward then returns logits=None",
        kind="choice",
        choices=LOSS_MODES,
    )
    stream_frozen: bool = setting(
        False,
        "frozen decoder layers are not resident: their linear weights (quantized by frozen_weights, "
        "or in the training dtype) live in a file per layer (block_store_dir/stream, or a temporary "
        "directory), read ahead of the forward and again for the backward; 3 layers in memory at a time "
        "whatever the depth (torch backend, or DeepSpeed ZeRO-1/2)",
        kind="bool",
    )
    frozen_cache_mb: int = setting(
        0,
        "Q-LIFT speed for memory: MiB of dense (training-dtype) copies of quantized frozen weights kept "
        "between steps, so those layers skip dequantization (layers the backward passes through first); "
        "0: none, every pass dequantizes; not with stream_frozen",
        kind="int",
        minimum=0,
    )
    max_consecutive_skipped_steps: int = setting(
        5,
        "a step with a NaN/inf loss or gradient norm is skipped and counted; this many "
        "in a row stop the run (0: never)",
        kind="int",
        minimum=0,
    )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_range"] = list(self.layer_range) if self.layer_range else None
        d["always_trainable"] = list(self.always_trainable)
        return d

    def replace(self, **changes: Any) -> LiftConfig:
        """A copy with some fields changed (JSON-like values, checked as in the ``"lift"`` section)."""
        known = {f.name: f for f in lift_settings()}
        problems = [
            f"lift.{k}: unknown key; allowed keys are {', '.join(sorted(known))}" for k in changes if k not in known
        ]
        values = {k: getattr(self, k) for k in known}
        typed: dict[str, Any] = {}
        for name, f in known.items():
            if name in changes:
                value, problem = check_setting(f, changes[name], f"lift.{name}")
                if problem:
                    problems.append(problem)
                    values.pop(name)
                else:
                    values[name] = typed[name] = value
        problems += _method_problems({**values, **changes}, values, "lift")
        if problems:
            raise ConfigError(problems)
        return dataclasses.replace(self, **typed)

    def frozen_layers_setting(self) -> str | None:
        """The setting that keeps frozen layers outside the parameters (quantized or streamed), as
        ``lift.<key>: <value>`` for a backend's message (the backends that shard layers refuse it), or None."""
        if self.frozen_weights != "full":
            return f"lift.frozen_weights: {self.frozen_weights!r}"
        return "lift.stream_frozen: true" if self.stream_frozen else None


def lift_settings() -> list[dataclasses.Field]:
    """The declared ``lift`` keys, in declaration order."""
    return list(fields(LiftConfig))


def settings_table() -> str:
    """The ``lift`` table of docs/configuration.md, made from the declarations (a test keeps them equal)."""
    rows = ["| `lift` key | default | flag | meaning |", "|---|---|---|---|"]
    for f in lift_settings():
        m = f.metadata
        default = json.dumps(list(f.default) if isinstance(f.default, tuple) else f.default)
        flag = f"`--{f.name}`" if m["flag"] else "—"
        rows.append(f"| `{f.name}` | `{default}` | {flag} | {m['help']} |")
    return "\n".join(rows)


def is_comment_key(key: str) -> bool:
    """Keys named ``_comment...`` document a JSON config; they are ignored everywhere."""
    return isinstance(key, str) and key.startswith("_comment")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_setting(f: dataclasses.Field, value: Any, path: str) -> tuple[Any, str | None]:
    """``(typed value, None)`` or ``(None, problem)`` for one declared key, by its ``kind``."""
    m = f.metadata
    kind = m["kind"]
    if kind == "choice":
        if value not in m["choices"]:
            return None, f"{path}: got {value!r}; allowed: {', '.join(m['choices'])}"
        return value, None
    if kind == "bool":
        return (value, None) if isinstance(value, bool) else (None, f"{path}: must be true or false, got {value!r}")
    if kind == "int":
        if m["auto"] and value in (None, "auto"):
            return None, None
        lo, hi = m["minimum"], m.get("maximum")
        if not _is_int(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
            what = (
                "an integer"
                + (f" >= {lo}" if lo is not None else "")
                + (f" and <= {hi}" if hi is not None else "")
                + (' or "auto"' if m["auto"] else "")
            )
            extra = " (0: never stop)" if f.name == "max_consecutive_skipped_steps" else ""
            return None, f"{path}: must be {what}{extra}, got {value!r}"
        return value, None
    if kind == "layer_range":
        if value is None:
            return None, None
        ok = (
            isinstance(value, (list, tuple))
            and len(value) == 2
            and all(_is_int(x) for x in value)
            and 1 <= value[0] <= value[1]
        )
        if not ok:
            return None, (
                f"{path}: must be [first, last], 1-indexed integers "
                "with 1 <= first <= last (e.g. [6, 8] for the middle "
                f"three of twelve layers), or null for all layers; got {value!r}"
            )
        return (int(value[0]), int(value[1])), None
    if kind == "path":
        if value is None or (isinstance(value, str) and value):
            return value, None
        return None, f"{path}: must be a directory path (a string) or null, got {value!r}"
    if kind == "patterns":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) and x for x in items):
            return None, f"{path}: must be a list of module-name patterns (strings), got {value!r}"
        return tuple(items), None
    raise AssertionError(f"unknown setting kind {kind!r}")  # a declaration bug, not user input


def parse_lift_section(section: Any, path: str = "lift") -> LiftConfig:
    """Check a ``"lift"`` section and build a :class:`LiftConfig`; one error lists every problem."""
    if not isinstance(section, Mapping):
        raise ConfigError([f"{path}: must be a JSON object, got {type(section).__name__}"])
    known = {f.name for f in lift_settings()}
    problems = [
        f"{path}.{k}: unknown key; allowed keys are {', '.join(sorted(known))}"
        for k in section
        if k not in known and not is_comment_key(k)
    ]
    values: dict[str, Any] = {}
    for f in lift_settings():
        if f.name in section:
            value, problem = check_setting(f, section[f.name], f"{path}.{f.name}")
            if problem:
                problems.append(problem)
            else:
                values[f.name] = value
    problems += _method_problems(section, values, path)
    if problems:
        raise ConfigError(problems)
    return LiftConfig(**values)


def _method_problems(section: Mapping[str, Any], values: Mapping[str, Any], path: str) -> list[str]:
    """Keys that contradict ``method`` (a key given for another method is an error, not ignored)."""
    method = values.get("method", "lift")
    given = lambda key: key in section and section[key] is not None  # noqa: E731
    problems = []
    if method == "lift":
        for key in ("switch_every", "lisa_layers"):
            if given(key):
                problems.append(
                    f"{path}.{key}: applies to method badam or lisa, not lift (LIFT's phase lengths come from "
                    f"total_steps and policy); remove it or set {path}.method"
                )
        return problems
    if values.get("policy", "grouped") != "grouped":
        problems.append(
            f"{path}.policy: {values['policy']!r} is LIFT's; "
            f"method {method} switches every switch_every steps; remove it"
        )
    if values.get("optimizer_state", "reset") != "reset":
        problems.append(
            f"{path}.optimizer_state: {values['optimizer_state']!r} keeps a block's state across its phases; method "
            f"{method} starts a fresh optimizer state at every switch, as it is defined; remove it"
        )
    if method == "badam" and given("lisa_layers"):
        problems.append(f"{path}.lisa_layers: applies to method lisa, not badam; remove it")
    if method == "lisa":
        for key in ("include_embedding", "include_head"):
            if values.get(key):
                problems.append(
                    f"{path}.{key}: method lisa trains the embedding and the head in every period already; remove it"
                )
        if values.get("schedule", "front2end") != "front2end":
            problems.append(
                f"{path}.schedule: {values['schedule']!r} orders LIFT / BAdam blocks; lisa draws its layers at random "
                f"(lift.seed); remove it"
            )
    return problems


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
        problems.append(f'{key}: must be an integer >= 1 or "auto", got {d[key]!r}')
        return None
    return d[key]


def _batch_sizes(config: Mapping[str, Any], world_size: int, problems: list[str]) -> tuple[int, int]:
    """``(micro, accumulation)`` by the DeepSpeed rule train_batch_size = micro x accumulation x
    world size: any two determine the third; a missing micro batch size and accumulation default to 1."""
    micro = _positive_int_or_auto(config, "train_micro_batch_size_per_gpu", problems)
    gas = _positive_int_or_auto(config, "gradient_accumulation_steps", problems)
    total = _positive_int_or_auto(config, "train_batch_size", problems)
    if problems:
        return 1, 1
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
        gas = 1
        micro, rem = divmod(total, world_size)
        if rem or micro < 1:
            problems.append(f"train_batch_size: {total} is not a multiple of the world size ({world_size})")
    micro, gas = micro or 1, gas or 1
    if total is not None and not problems and total != micro * gas * world_size:
        problems.append(
            f"train_batch_size: {total} != train_micro_batch_size_per_gpu ({micro}) x gradient_accumulation_steps "
            f"({gas}) x world size ({world_size}) = {micro * gas * world_size}; "
            'fix one of the three or set it to "auto"'
        )
    return micro, gas


def resolve_training(config: Mapping[str, Any], world_size: int) -> TrainingConfig:
    """Check the top-level keys LIFT reads and fill ``"auto"`` batch sizes from the world size."""
    problems: list[str] = []
    micro, gas = _batch_sizes(config, world_size, problems)
    clip = config.get("gradient_clipping", DEFAULT_GRADIENT_CLIPPING)
    if clip == "auto":
        clip = DEFAULT_GRADIENT_CLIPPING
    if not _is_number(clip) or clip < 0:
        problems.append(f"gradient_clipping: must be a number >= 0 (0 turns clipping off), got {clip!r}")
    precision = "fp32"
    for key in ("bf16", "fp16"):
        sec = config.get(key, config.get("bfloat16") if key == "bf16" else None)  # "bfloat16": DeepSpeed's older name
        if sec is None:
            continue
        if not isinstance(sec, Mapping) or not isinstance(sec.get("enabled", False), (bool, str)):
            problems.append(f'{key}: must be an object like {{"enabled": true}}, got {sec!r}')
        elif sec.get("enabled") is True:
            if precision != "fp32":
                problems.append("bf16.enabled and fp16.enabled: only one of the two may be true")
            precision = key
    for key in ("optimizer", "scheduler"):
        sec = config.get(key)
        if sec is not None and (not isinstance(sec, Mapping) or not isinstance(sec.get("type"), str)):
            problems.append(f'{key}: must be an object with a string "type" and a "params" object, got {sec!r}')
        elif sec is not None and not isinstance(sec.get("params", {}), Mapping):
            problems.append(f"{key}.params: must be an object, got {sec.get('params')!r}")
    opt = config.get("optimizer")
    if isinstance(opt, Mapping) and isinstance(opt.get("params"), Mapping):
        lr = opt["params"].get("lr")
        if lr is not None and lr != "auto" and (not _is_number(lr) or not lr > 0):
            problems.append(f"optimizer.params.lr: must be a number > 0, got {lr!r}")
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
