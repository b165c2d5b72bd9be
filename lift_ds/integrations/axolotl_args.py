"""The axolotl YAML keys of :class:`lift_ds.integrations.axolotl.LiftPlugin`, checked when axolotl
validates the config (before any dataset is tokenized, any model loaded or any process group started).

axolotl merges this pydantic model into its own config schema (``get_input_args``). It declares one
key, ``lift:``, whose value is a ``"lift"`` section (the keys of :class:`lift_ds.config.LiftConfig`,
checked by :func:`lift_ds.config.parse_lift_section`), and refuses the axolotl settings that would
fight LIFT or that LIFT's training loop would silently drop. Imports pydantic and lift_ds only.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

from ..backends import choose_backend, shards_parameters
from ..config import lift_settings, parse_lift_section
from ..errors import ConfigError
from ..run_config import read_config_file
from ..utils import get_world_size

PLUGIN_NAME = "lift_ds.integrations.axolotl.LiftPlugin"

#: axolotl keys that train parameters LIFT does not choose, or re-wrap what LIFT rebuilds per phase
_CONFLICTS: dict[str, str] = {
    "lisa_n_layers": (
        "axolotl's own LISA toggles requires_grad inside one optimizer; use lift: {method: lisa, lisa_layers: N}"
    ),
    "lisa_step_interval": "axolotl's own LISA; use lift: {method: lisa, switch_every: K}",
    "lisa_layers_attribute": "axolotl's own LISA; lift_ds finds the decoder layers itself",
    "relora": "ReLoRA merges and restarts LoRA adapters; LIFT trains the model's own weights block by block",
    "jagged_restart_steps": "ReLoRA's restart schedule; LIFT runs one schedule across phases",
    "unfrozen_parameters": (
        "LIFT decides what trains in each phase; keep extra modules trainable with lift: {always_trainable: [...]}"
    ),
    "adapter": (
        "LIFT fine-tunes the model's own weights, one block at a time; "
        "remove the adapter (LoRA on top of LIFT is not supported)"
    ),
    "lora_model_dir": "a LoRA adapter to load; LIFT trains the model's own weights",
    "layer_offloading": (
        "axolotl moves frozen layers off the device with hooks; LIFT rebuilds its engine over the active block instead"
    ),
    "activation_offloading": "not supported with LIFT; use gradient_checkpointing: true",
    "rl": "preference / RL trainers are not supported with LIFT (supervised fine-tuning only)",
    "reward_model": "reward-model training is not supported with LIFT",
    "process_reward_model": "process-reward-model training is not supported with LIFT",
    "load_best_model_at_end": "LIFT's checkpoints hold the blocks trained so far; pick a checkpoint yourself",
    "early_stopping_patience": "needs load_best_model_at_end, which LIFT cannot honour",
    "torch_compile": "the model is re-wrapped at every phase",
    "neftune_noise_alpha": "not supported with LIFT",
    "auto_find_batch_size": "set micro_batch_size",
    "group_by_length": (
        "lift_ds orders data by a seeded permutation keyed by global sample index (exact resume on any layout)"
    ),
    "curriculum_sampling": (
        "lift_ds orders data by a seeded permutation keyed by global sample index (exact resume on any layout)"
    ),
    "sample_packing": (
        "LIFT reads single samples by global index; packed bins are not supported yet (use pad_to_sequence_len)"
    ),
    "use_ray": "not supported with LIFT",
    "optim_args": (
        "LIFT builds adamw_torch / adamw_torch_fused / sgd per phase from learning_rate, weight_decay and adam_*"
    ),
    "lr_groups": "LIFT builds one optimizer per phase over the active block; per-group learning rates are not applied",
    "embedding_lr": (
        "LIFT builds one optimizer per phase; train the embedding with lift: {include_embedding: true} at learning_rate"
    ),
    "embedding_lr_scale": (
        "LIFT builds one optimizer per phase; train the embedding with lift: {include_embedding: true} at learning_rate"
    ),
    "loraplus_lr_ratio": "LoRA+ is for adapters; LIFT trains the model's own weights",
    "cosine_min_lr_ratio": (
        "axolotl's own scheduler is not used; LIFT runs the lr_scheduler (transformers' get_scheduler) across phases"
    ),
    "cosine_constant_lr_ratio": (
        "axolotl's own scheduler is not used; LIFT runs the lr_scheduler (transformers' get_scheduler) across phases"
    ),
    "lr_quadratic_warmup": (
        "axolotl's own scheduler is not used; LIFT runs the lr_scheduler (transformers' get_scheduler) across phases"
    ),
}
#: values of these keys that are fine (the schema's defaults and explicit "off" values)
_HARMLESS = (None, False, 0, 0.0, "", [], {})
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "sgd")
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)
_PARALLEL = (
    "tensor_parallel_size",
    "context_parallel_size",
    "dp_shard_size",
    "dp_replicate_size",
    "expert_parallel_size",
)


def _lift_help() -> str:
    keys = ", ".join(f.name for f in lift_settings())
    return f'LIFT / BAdam / LISA through lift_ds (the "lift" section of a lift_ds config): {keys}'


def _read_json(source: Any) -> dict[str, Any] | None:
    """The DeepSpeed config the YAML names (a path or a mapping), or None if it cannot be read here."""
    if isinstance(source, dict):
        return source
    if isinstance(source, (str, Path)) and Path(source).is_file():
        try:
            data = json.loads(Path(source).read_text())
        except (OSError, ValueError):
            return None  # axolotl reports an unreadable file itself
        return data if isinstance(data, dict) else None
    return None


def lift_config(cfg: Any) -> dict[str, Any]:
    """The lift_ds config (a dict with a ``"lift"`` section) an axolotl config describes.

    The DeepSpeed JSON the YAML names (with its ``"lift"`` section, or the YAML's ``lift:``), or an
    ``"fsdp"`` section made from axolotl's ``fsdp_config`` (FSDP2), or the ``lift:`` keys alone. Batch
    sizes, clipping, precision, total steps and seed are left for the TrainingArguments to fill.
    """
    section = cfg.get("lift")
    section = copy.deepcopy(dict(section)) if section is not None else None
    if cfg.get("deepspeed"):
        source = cfg["deepspeed"]
        raw, _ = read_config_file(source.to_dict() if hasattr(source, "to_dict") else source)
        if section is not None:
            raw["lift"] = section
        if not isinstance(raw.get("lift"), dict):
            raw["lift"] = {}
        return raw
    raw = {"lift": section or {}}
    fsdp = cfg.get("fsdp_config")
    if fsdp:
        fsdp = fsdp.to_dict() if hasattr(fsdp, "to_dict") else dict(fsdp)
        raw["fsdp"] = {
            "cpu_offload": bool(fsdp.get("offload_params")),
            "reshard_after_forward": fsdp.get("reshard_after_forward") is not False,
        }
    return raw


def _backend_problems(data: dict[str, Any]) -> list[str]:
    """axolotl saves rank 0's copy of the model unless its own ZeRO-3 or FSDP is configured: a lift
    backend that shards parameters must come from that configuration, not from ``lift.backend`` alone."""
    if data.get("deepspeed") or data.get("fsdp_config") or not isinstance(data.get("lift"), dict):
        return []
    raw = lift_config(data)
    backend, _, _ = choose_backend(raw["lift"].get("backend", "auto"), raw, get_world_size())
    if shards_parameters(backend, raw):
        return [
            f"lift.backend: {backend!r} shards the model, "
            "but axolotl knows nothing of it and would save rank 0's shard; "
            "configure the backend in axolotl (fsdp_version: 2 + fsdp_config, "
            "or deepspeed: a ZeRO-3 JSON) and drop lift.backend"
        ]
    return []


def conflicts(data: dict[str, Any]) -> list[str]:
    """Every axolotl setting in ``data`` (a raw config) that LIFT cannot honour, one line each."""
    problems = [
        f"{key}: {data[key]!r} is set; {why}" for key, why in _CONFLICTS.items() if data.get(key) not in _HARMLESS
    ]
    optimizer = data.get("optimizer")
    if optimizer is not None and str(getattr(optimizer, "value", optimizer)) not in OPTIMIZERS:
        problems.append(f"optimizer: {optimizer!r} is not built per LIFT phase; use one of {', '.join(OPTIMIZERS)}")
    scheduler = data.get("lr_scheduler")
    if scheduler is not None and str(getattr(scheduler, "value", scheduler)) not in SCHEDULERS:
        problems.append(
            f"lr_scheduler: {scheduler!r} is axolotl's own; "
            f"LIFT runs transformers' schedulers across phases: {', '.join(SCHEDULERS)}"
        )
    problems += [
        f"{key}: {data[key]!r}; LIFT parallelizes with ZeRO / FSDP2 data parallelism only"
        for key in _PARALLEL
        if isinstance(data.get(key), int) and data[key] > 1
    ]
    fsdp_version = (
        data.get("fsdp_version")
        if data.get("fsdp_version") is not None
        else (data.get("fsdp_config") or {}).get("fsdp_version", 1)
    )
    if (data.get("fsdp_config") or data.get("fsdp")) and str(fsdp_version) != "2":
        problems.append(f"fsdp_version: {fsdp_version!r}; lift_ds's FSDP backend is FSDP2: set fsdp_version: 2")
    if data.get("deepspeed") and (data.get("fsdp_config") or data.get("fsdp")):
        problems.append("deepspeed and fsdp_config: both are set; choose one backend")
    try:
        problems += _backend_problems(data)
    except ConfigError as e:
        problems += e.problems
    ds = _read_json(data.get("deepspeed"))
    if ds is not None and isinstance(ds.get("lift"), dict) and data.get("lift") is not None:
        problems.append(f'lift: given in the YAML and as the "lift" section of {data["deepspeed"]!r}; keep one')
    if ds is not None and "lift" in ds and not isinstance(ds["lift"], dict):
        problems.append(f'deepspeed: the "lift" section of {data["deepspeed"]!r} must be an object, got {ds["lift"]!r}')
    elif ds is not None and isinstance(ds.get("lift"), dict):
        problems += _lift_problems(ds["lift"], f"{data['deepspeed']}: lift")
    return problems


def _lift_problems(section: Any, path: str) -> list[str]:
    try:
        parse_lift_section(
            {k: v for k, v in section.items() if k != "total_steps" or v not in ("auto", None)}
            if isinstance(section, dict)
            else section,
            path=path,
        )
    except ConfigError as e:
        return e.problems
    return []


def _uses_plugin(data: dict[str, Any]) -> bool:
    return any(str(p).endswith(".LiftPlugin") and "lift_ds" in str(p) for p in data.get("plugins") or [])


class LiftArgs(BaseModel):
    """axolotl input args of ``LiftPlugin``: the ``lift:`` key and the checks of the whole config."""

    lift: dict[str, Any] | None = Field(default=None, json_schema_extra={"description": _lift_help()})

    @field_validator("lift", mode="before")
    @classmethod
    def _check_lift(cls, value: Any) -> Any:
        if value is None:
            return value
        if not isinstance(value, dict):
            raise ValueError(
                f"lift: must be a mapping of lift_ds keys ({', '.join(f.name for f in lift_settings())}), got {value!r}"
            )
        problems = _lift_problems(value, "lift")
        if problems:
            raise ValueError("invalid LIFT configuration:\n" + "\n".join(f"  - {p}" for p in problems))
        return value

    @model_validator(mode="before")
    @classmethod
    def _check_conflicts(cls, data: Any) -> Any:
        if isinstance(data, dict) and _uses_plugin(data):
            problems = conflicts(data)
            if isinstance(data.get("lift"), dict):  # listed with the rest (a raised "before" check stops pydantic)
                problems += _lift_problems(data["lift"], "lift")
            if problems:
                raise ValueError(
                    f"{PLUGIN_NAME} cannot run this config, {len(problems)} problem(s):\n"
                    + "\n".join(f"  - {p}" for p in problems)
                )
        return data
