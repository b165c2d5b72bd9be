"""The whole run configuration, built once: a DeepSpeed JSON, command-line overrides, the sections
of :mod:`lift_ds.config`, the chosen backend and its own checks (see :func:`load_run_config`)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import LiftConfig, TrainingConfig, parse_lift_section, resolve_training
from .config_scan import MAX_DEPTH, misspelled_top_level, parse_json, plain, scan
from .errors import ConfigError


@dataclass(frozen=True)
class RunConfig:
    """Everything a run is configured with, checked once.

    Attributes:
        lift: the ``"lift"`` section; its ``backend`` is the resolved one (``torch``, ``deepspeed`` or ``fsdp``,
            never ``auto``).
        training: the top-level keys LIFT reads, batch sizes resolved for ``world_size``.
        backend_reason: why that backend (``lift.backend``, or the config section ``auto`` followed).
        backend_options: the backend's own typed options from its ``check_config`` (None for the torch backend).
        raw: the whole JSON with overrides applied (DeepSpeed's own keys pass through to it).
        source: the file the config came from, or ``"config"``.
        world_size: the number of ranks the batch sizes were resolved for.
    """

    lift: LiftConfig
    training: TrainingConfig
    backend_reason: str
    backend_options: Any = None
    raw: Mapping[str, Any] = field(default_factory=dict)
    source: str = "config"
    world_size: int = 1

    @property
    def backend(self) -> str:
        """The backend that runs it (``lift.backend``, resolved)."""
        return self.lift.backend

    def with_lift(self, **changes: Any) -> RunConfig:
        """A copy with ``lift`` keys changed (validated again), e.g. ``total_steps`` from ``--max_steps``.

        Not ``backend``: it is resolved and checked once, with its options, by :func:`load_run_config`.
        """
        if changes.get("backend", self.lift.backend) != self.lift.backend:
            raise ValueError(
                "with_lift(backend=...): the backend is resolved once, by load_run_config; load the config again"
            )
        try:
            lift = self.lift.replace(**changes)
        except ConfigError as e:
            raise ConfigError(e.problems, self.source) from None
        return dataclasses.replace(self, lift=lift)

    def to_dict(self) -> dict[str, Any]:
        """The merged configuration as JSON-ready data (for the log and checkpoints)."""
        raw = {k: v for k, v in self.raw.items() if k != "lift"}
        return {**raw, "lift": self.lift.to_dict()}


def read_config_file(config: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """``(a copy of the config as a dict, its source name)``; file problems are a ConfigError."""
    if isinstance(config, Mapping):
        try:
            return json.loads(json.dumps(config)), "config"
        except RecursionError:
            raise ConfigError(
                [f"nested more than {MAX_DEPTH} levels deep; a DeepSpeed config is a few levels deep"]
            ) from None
        except (TypeError, ValueError) as e:
            raise ConfigError(
                [f"not a JSON-like config (dicts, lists, strings, numbers, booleans, null): {e}"]
            ) from None
    if not isinstance(config, (str, os.PathLike)):
        raise ConfigError(
            [f"config: must be a DeepSpeed JSON path, a dict or a RunConfig, got {type(config).__name__}"]
        )
    p = Path(config)
    if p.is_dir():
        raise ConfigError(
            [f"{str(p)!r} is a directory; give the path of a DeepSpeed JSON file (e.g. ds_configs/zero2.json)"],
            source=str(p),
        )
    if not p.is_file():
        raise ConfigError([f"file {str(p)!r} does not exist"], source=str(p))
    try:
        data = parse_json(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError([f"not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}"], source=str(p)) from None
    except RecursionError:
        raise ConfigError(
            [
                f"nested more than {MAX_DEPTH} levels deep (deeper than "
                "Python's JSON reader goes); a DeepSpeed config is a "
                "few levels deep"
            ],
            source=str(p),
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"cannot read {str(p)!r}: {e}"], source=str(p)) from None
    if not isinstance(data, dict):
        raise ConfigError([f"top level must be a JSON object, got {type(data).__name__}"], source=str(p))
    problems = scan(data, check_enabled=False)
    if problems:
        raise ConfigError(problems, source=str(p))
    return plain(data), str(p)


@dataclass(frozen=True)
class Override:
    """One command-line override: a dotted JSON path, its value, and the flag it came from."""

    path: str
    value: Any
    origin: str = ""


def apply_overrides(raw: dict[str, Any], overrides: Iterable[Override]) -> list[str]:
    """Set each override's dotted path in ``raw`` (creating objects on the way); returns problems."""
    problems = []
    for o in overrides:
        keys = o.path.split(".")
        node: Any = raw
        for k in keys[:-1]:
            if node.get(k) is None:
                node[k] = {}
            if not isinstance(node[k], dict):
                problems.append(
                    f"{o.path}: cannot set it{_origin(o)}: {k} is a {type(node[k]).__name__}, not an object"
                )
                break
            node = node[k]
        else:
            node[keys[-1]] = o.value
    return problems


def _origin(o: Override) -> str:
    return f" (from {o.origin})" if o.origin else ""


def _attribute(problems: list[str], overrides: Iterable[Override]) -> list[str]:
    """Name the flag behind a problem whose JSON path was set on the command line."""
    by_path = {o.path: o for o in overrides if o.origin}
    out = []
    for p in problems:
        path = p.split(":", 1)[0]
        o = by_path.get(path)
        out.append(f"{p} [set by {o.origin}]" if o else p)
    return out


def frozen_weights_problems(lift: Any, method: str) -> list[str]:
    """Q-LIFT (``lift.frozen_weights`` int8 / nf4) and streaming (``lift.stream_frozen``) settings that
    cannot work, and a missing torchao (each backend refuses what it cannot shard in its own ``check_config``)."""
    mode = lift.frozen_weights
    problems = []
    if lift.frozen_cache_mb and (mode == "full" or lift.stream_frozen):
        problems.append(
            f"lift.frozen_cache_mb: {lift.frozen_cache_mb} keeps dense copies of quantized frozen layers; "
            + (
                "lift.stream_frozen: true keeps no frozen layer in memory: set one of them to 0 / false"
                if lift.stream_frozen
                else 'lift.frozen_weights is "full" (nothing is quantized): set it to 0, or frozen_weights int8 / nf4'
            )
        )
    if mode == "full" and not lift.stream_frozen:
        return problems
    import importlib.util

    what = f"lift.frozen_weights: {mode!r} quantizes" if mode != "full" else "lift.stream_frozen: true streams"
    if method != "lift":
        problems.append(
            f"{what} LIFT's frozen layers; --baseline {method} trains other parameters (use "
            + ('"full")' if mode != "full" else "false)")
        )
    if lift.block_store_dir is not None and lift.block_store != "disk" and not lift.stream_frozen:
        problems.append(
            f'lift.block_store_dir: set, but lift.block_store is {lift.block_store!r}; set block_store to "disk"'
        )
    if mode != "full" and importlib.util.find_spec("torchao") is None:
        problems.append(
            f"lift.frozen_weights: {mode!r} needs torchao for the quantized tensors: pip install 'lift_ds[quant]' "
            '(torchao), or use "full"'
        )
    return problems


def load_run_config(
    config: str | Path | Mapping[str, Any] | RunConfig,
    overrides: Iterable[Override] = (),
    world_size: int = 1,
    method: str = "lift",
    source: str | None = None,
    total_steps_flag: str | None = None,
) -> RunConfig:
    """Read, override, check and type a whole run configuration: the one place it is built.

    Args:
        config: a DeepSpeed JSON path or dict with a ``"lift"`` section (a RunConfig is returned as is).
        overrides: command-line values for dotted JSON paths (``lift.schedule``, ``optimizer.params.lr``).
        world_size: ranks the run will have (resolves ``"auto"`` batch sizes).
        method: ``lift``, or the ``full`` / ``lora`` baseline (some backends refuse a combination).
        source: the name to report for a dict config (e.g. the file it was read from).
        total_steps_flag: the caller's only other source of ``lift.total_steps`` (the launcher's ``--max_steps``):
            without it, a missing or ``"auto"`` ``lift.total_steps`` is a problem naming this flag.

    Raises:
        ConfigError: listing every problem at once, each with its JSON path (and flag).
    """
    if isinstance(config, RunConfig):
        return config
    raw, name = read_config_file(config)
    source = source or name
    overrides = list(overrides)
    problems = apply_overrides(raw, overrides)
    scanned = scan(raw)
    if scanned:  # non-finite numbers, non-boolean "enabled", nesting: nothing else can be checked on them
        raise ConfigError(_attribute(problems + scanned, overrides), source=source)
    from .backends.ds_config_keys import known_top_level_keys

    problems += misspelled_top_level(raw, known_top_level_keys())
    lift = training = None
    try:
        lift = parse_lift_section(raw.get("lift", {}))
    except ConfigError as e:
        problems += e.problems
    if lift is not None and lift.total_steps is None and total_steps_flag:
        problems.append(f'{total_steps_flag}: required (the config\'s lift.total_steps is "auto")')
    try:
        training = resolve_training(raw, world_size)
    except ConfigError as e:
        problems += e.problems
    reason, options = "", None
    if lift is not None:
        from .backends import choose_backend

        backend, reason, choice_problems = choose_backend(lift.backend, raw, world_size)
        problems += choice_problems
        lift = dataclasses.replace(
            lift, backend=backend
        )  # the one backend field: resolved; what "auto" followed is the reason
        if training is not None and not choice_problems:
            from .backends import get_backend_class

            options, backend_problems = get_backend_class(backend).check_config(lift, training, raw, world_size, method)
            problems += backend_problems
        problems += frozen_weights_problems(lift, method)
    if problems:
        raise ConfigError(_attribute(problems, overrides), source=source)
    assert lift is not None and training is not None
    return RunConfig(
        lift=lift,
        training=training,
        backend_reason=reason,
        backend_options=options,
        raw=copy.deepcopy(raw),
        source=source,
        world_size=world_size,
    )
