"""TrainingArguments → lift_ds: the config with ``"auto"`` filled in, the per-phase optimizer and
schedule the arguments describe, the Trainer features LIFT refuses, and the rank's sample stream.
Used by :mod:`lift_ds.integrations.transformers`."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConfigError
from ..optim import NamedGroups
from ..run_config import read_config_file

#: TrainingArguments.optim values lift_ds builds per phase
OPTIMS = ("adamw_torch", "adamw_torch_fused", "sgd")


def unsupported_features(trainer: Any) -> list[str]:
    """Trainer features LIFT cannot honour, each a problem naming the argument and what to do."""
    a = trainer.args
    problems = []
    optim = getattr(a.optim, "value", a.optim)
    if optim not in OPTIMS:
        problems.append(
            f"TrainingArguments.optim: {optim!r} is not built per LIFT phase; use one of {', '.join(OPTIMS)}, or an "
            '"optimizer" section in the DeepSpeed config'
        )
    checks = [
        (
            "load_best_model_at_end",
            a.load_best_model_at_end,
            "LIFT's checkpoints hold the blocks trained so far; pick a checkpoint yourself",
        ),
        ("torch_compile", a.torch_compile, "the model is re-wrapped at every phase"),
        (
            "train_sampling_strategy",
            getattr(a, "train_sampling_strategy", "random") != "random",
            "lift_ds orders data by a seeded permutation keyed by global sample index (exact resume on any layout)",
        ),
        ("auto_find_batch_size", a.auto_find_batch_size, "set per_device_train_batch_size"),
        # a subclass whose lift config carries the "fsdp" section itself may
        # keep TrainingArguments.fsdp (axolotl's save reads it)
        (
            "fsdp",
            bool(a.fsdp) and not getattr(trainer, "lift_fsdp_from_args", False),
            'pass lift_config= a config with an "fsdp" section (lift_ds\'s FSDP2 backend)',
        ),
        ("neftune_noise_alpha", getattr(a, "neftune_noise_alpha", None) is not None, "not supported with LIFT"),
        ("use_liger_kernel", getattr(a, "use_liger_kernel", False), "not supported with LIFT"),
    ]
    problems += [f"TrainingArguments.{name}: not supported with LIFT ({why})" for name, on, why in checks if on]
    if trainer.model_init is not None:
        problems.append("model_init: not supported with LIFT (pass model=)")
    from ..api import adapter_model_problem

    if (
        problem := adapter_model_problem(trainer.model)
    ) is not None:  # SFTTrainer(peft_config=...) wraps the model first
        problems.append(problem)
    problems += unhonoured_arguments(a)
    return problems


def _fill(section: dict, key: str, value: Any, problems: list[str], path: str) -> None:
    """Fill ``"auto"`` (or an absent key) with the TrainingArguments value; a different explicit value is a problem."""
    if section.get(key, "auto") == "auto":
        section[key] = value
    elif section[key] != value and not (
        isinstance(value, float) and isinstance(section[key], (int, float)) and math.isclose(section[key], value)
    ):
        problems.append(
            f"{path}: {section[key]!r} in the DeepSpeed config, "
            f"but TrainingArguments says {value!r}; make them agree or "
            'set it to "auto"'
        )


def trainer_config(trainer: Any, source: Any, total_steps: int) -> dict[str, Any]:
    """The lift_ds config dict: the JSON, with ``"auto"`` values filled from the TrainingArguments."""
    a = trainer.args
    raw, _ = read_config_file(source)
    problems: list[str] = []
    if not isinstance(raw.get("lift"), dict):
        raise ConfigError(
            ['lift: the config has no "lift" section; add one (see ds_configs/zero2.json) or use transformers.Trainer'],
            source=str(source),
        )
    _fill(
        raw, "train_micro_batch_size_per_gpu", a.per_device_train_batch_size, problems, "train_micro_batch_size_per_gpu"
    )
    _fill(raw, "gradient_accumulation_steps", a.gradient_accumulation_steps, problems, "gradient_accumulation_steps")
    raw.pop("train_batch_size", None) if raw.get("train_batch_size") == "auto" else None
    _fill(raw, "gradient_clipping", float(a.max_grad_norm), problems, "gradient_clipping")
    if "bfloat16" in raw and "bf16" not in raw:  # DeepSpeed's older name of the section (DeepSpeed-Chat writes it)
        raw["bf16"] = raw.pop("bfloat16")
    for key, on in (("bf16", a.bf16), ("fp16", a.fp16)):
        # an absent section follows the TrainingArguments, as accelerate does; only an explicit disagreement is an error
        sec = raw.setdefault(key, {"enabled": "auto"}) if isinstance(raw.get(key, {}), dict) else raw[key]
        if isinstance(sec, dict):
            _fill(sec, "enabled", bool(on), problems, f"{key}.enabled")
    lift = raw["lift"]
    _fill(lift, "total_steps", total_steps, problems, "lift.total_steps")
    lift.setdefault("seed", a.data_seed if a.data_seed is not None else a.seed)
    opt = raw.get("optimizer")
    if isinstance(opt, dict) and isinstance(opt.get("params"), dict):
        p = opt["params"]
        for key, value in (
            ("lr", a.learning_rate),
            ("betas", [a.adam_beta1, a.adam_beta2]),
            ("eps", a.adam_epsilon),
            ("weight_decay", a.weight_decay),
        ):
            if key in p:
                _fill(p, key, value, problems, f"optimizer.params.{key}")
    sched = raw.get("scheduler")
    if isinstance(sched, dict) and isinstance(sched.get("params"), dict):
        p = sched["params"]
        for key, value in (
            ("warmup_min_lr", 0.0),
            ("warmup_max_lr", a.learning_rate),
            ("warmup_num_steps", max(1, a.get_warmup_steps(total_steps))),
            ("total_num_steps", total_steps),
        ):  # DeepSpeed's WarmupLR family needs >= 1 warm-up step
            if key in p:
                _fill(p, key, value, problems, f"scheduler.params.{key}")
    if problems:
        raise ConfigError(problems, source=str(source))
    return raw


def optimizer_factory(trainer: Any) -> Callable[[Any], torch.optim.Optimizer]:
    """The per-phase optimizer the TrainingArguments describe (``optim``, ``learning_rate``, Adam
    betas/epsilon), or the trainer's ``optimizer_cls_and_kwargs``; built over :func:`decay_groups`."""
    a = trainer.args
    if getattr(trainer, "optimizer_cls_and_kwargs", None) is not None:
        cls, kwargs = trainer.optimizer_cls_and_kwargs
        return lambda groups: cls(groups, **kwargs)
    optim = getattr(a.optim, "value", a.optim)

    def build(groups: Any) -> torch.optim.Optimizer:
        if optim == "sgd":
            return torch.optim.SGD(groups, lr=a.learning_rate)
        return torch.optim.AdamW(
            groups,
            lr=a.learning_rate,
            betas=(a.adam_beta1, a.adam_beta2),
            eps=a.adam_epsilon,
            fused=optim == "adamw_torch_fused" or None,
        )

    return build


def decay_groups(trainer: Any, weight_decay: float | None) -> NamedGroups:
    """Trainer's two parameter groups, on every optimizer path: ``weight_decay`` for the parameters
    ``get_decay_parameter_names`` names (None: the optimizer's own default, e.g. a DeepSpeed config
    section's), none for biases and norms."""
    model = trainer.model
    decay = set(trainer.get_decay_parameter_names(model))
    group_of = {n: 0 if n in decay else 1 for n, _ in model.named_parameters()}
    return NamedGroups(
        model, group_of, [{} if weight_decay is None else {"weight_decay": weight_decay}, {"weight_decay": 0.0}]
    )


def scheduler_factory(trainer: Any, total_steps: int) -> Callable[[torch.optim.Optimizer], Any]:
    """``lr_scheduler_type`` with its warm-up, as one schedule over the whole run."""
    from transformers import get_scheduler

    a = trainer.args

    def build(optimizer: torch.optim.Optimizer) -> Any:
        return get_scheduler(
            a.lr_scheduler_type,
            optimizer=optimizer,
            num_warmup_steps=a.get_warmup_steps(total_steps),
            num_training_steps=total_steps,
            scheduler_specific_kwargs=a.lr_scheduler_kwargs or {},
        )

    return build


class SampleStream:
    """Micro-batches of a dataset for one rank, keyed by global sample index (see
    :class:`lift_ds.data.RankBatches`): epoch ``e`` is a permutation seeded with ``seed + e``, cut to
    whole global batches; rank ``r`` takes chunk ``j*world + r`` of each optimizer step."""

    def __init__(
        self, dataset: Any, collate: Callable, micro_batch: int, rank: int, world: int, accumulation: int, seed: int
    ) -> None:
        n = len(dataset)
        self.global_batch = micro_batch * accumulation * world
        if n < self.global_batch:
            raise ConfigError(
                [
                    f"train_dataset: {n} samples are fewer than one global "
                    f"batch ({micro_batch} x {accumulation} x {world} ranks)"
                ]
            )
        self.dataset, self.collate, self.micro_batch, self.rank, self.world, self.seed = (
            dataset,
            collate,
            micro_batch,
            rank,
            world,
            seed,
        )
        self.samples_per_epoch = (n // self.global_batch) * self.global_batch
        self._epoch, self._order = -1, []

    def batch_at(self, step_start: int, j: int) -> Any:
        start = step_start + (j * self.world + self.rank) * self.micro_batch
        epoch, k = divmod(start, self.samples_per_epoch)
        if epoch != self._epoch:
            self._order = torch.randperm(
                len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch)
            ).tolist()
            self._epoch = epoch
        return self.collate([self.dataset[i] for i in self._order[k : k + self.micro_batch]])


# ----------------------------------------------------------------------------- arguments LIFT cannot honour

#: TrainingArguments fields LIFT does not honour, refused when set away from Hugging Face's default
#: (with the reason); fields that only matter with one of these, or that LIFT honours, are not listed
UNHONOURED = {
    "optim_args": (
        "the optimizer is built per phase from optim / learning_rate "
        "/ weight_decay / adam_*; put other arguments in "
        'the DeepSpeed config\'s "optimizer" section'
    ),
    "optim_target_modules": "GaLore-style optimizers are not built per LIFT phase",
    "bf16_full_eval": "evaluation runs through the training engine in its precision",
    "fp16_full_eval": "evaluation runs through the training engine in its precision",
    "torch_empty_cache_steps": "not supported with LIFT",
    "include_num_input_tokens_seen": "not counted by LIFT's loop",
    "eval_delay": "LIFT evaluates from the first eval step",
    "eval_on_start": "not supported with LIFT",
    "save_only_model": "LIFT's checkpoints always hold what an exact resume needs",
    "save_on_each_node": "rank 0 writes LIFT's checkpoints to a shared directory",
    "push_to_hub": "LiftTrainer does not push; push output_dir/checkpoint-N or save_model()'s directory yourself",
    "ignore_data_skip": "LIFT always resumes at the exact sample (its data order is keyed by global sample index)",
    "restore_callback_states_from_checkpoint": "LIFT's checkpoints keep the TrainerState, not callback states",
    "enable_jit_checkpoint": "LIFT saves at save_steps; resume from the newest checkpoint",
    "fsdp_config": 'pass lift_config= a config with an "fsdp" section (lift_ds\'s FSDP2 backend)',
    "parallelism_config": "LIFT is data parallel (ZeRO / FSDP2) only",
}


def unhonoured_arguments(a: Any) -> list[str]:
    """TrainingArguments values LIFT cannot honour (each named with why), and values Hugging Face
    would refuse or misread later, found when the trainer is built."""
    import dataclasses

    defaults = {
        f.name: f.default
        if f.default is not dataclasses.MISSING
        else f.default_factory()
        if f.default_factory is not dataclasses.MISSING
        else None
        for f in dataclasses.fields(type(a))
    }
    problems = []
    for name, why in UNHONOURED.items():
        value = getattr(a, name, None)
        if value is not None and value != defaults.get(name) and value not in ({}, []):
            problems.append(
                f"TrainingArguments.{name}: {getattr(value, 'value', value)!r} is not supported with LIFT ({why})"
            )
    sched = getattr(a.lr_scheduler_type, "value", a.lr_scheduler_type)
    if sched == "reduce_lr_on_plateau":
        problems.append(
            "TrainingArguments.lr_scheduler_type: "
            "'reduce_lr_on_plateau' needs the evaluation metric at every step, which "
            "LIFT's run-long schedule does not feed; use a step schedule (linear, cosine, constant_with_warmup, ...)"
        )
    if getattr(a.save_strategy, "value", a.save_strategy) == "best":
        problems.append(
            "TrainingArguments.save_strategy: 'best' is not supported "
            "with LIFT (it keeps no best-metric checkpoint); use "
            '"steps" or "epoch" and pick a checkpoint by its eval_loss in log_history'
        )
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        v = getattr(a, name)
        if not isinstance(v, int) or v < 1:
            problems.append(f"TrainingArguments.{name}: must be an integer >= 1, got {v!r}")
    for name in ("learning_rate", "weight_decay", "adam_epsilon", "max_grad_norm", "adam_beta1", "adam_beta2"):
        v = getattr(a, name)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            problems.append(f"TrainingArguments.{name}: must be a finite number >= 0, got {v!r}")
    if a.max_steps <= 0 and not (
        isinstance(a.num_train_epochs, (int, float)) and math.isfinite(a.num_train_epochs) and a.num_train_epochs > 0
    ):
        problems.append(
            "TrainingArguments.num_train_epochs: "
            f"must be a number > 0 when max_steps is not set, got {a.num_train_epochs!r}"
        )
    for name in ("logging_steps", "eval_steps", "save_steps", "warmup_steps"):
        v = getattr(a, name)
        if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
            problems.append(
                f"TrainingArguments.{name}: must be a number >= 0 (below 1: a fraction of the run), got {v!r}"
            )
    return problems


def absolute_steps(value: float | None, total: int) -> int:
    """A ``*_steps`` value as Hugging Face reads it: below 1 a fraction of the run's steps (rounded
    up, as ``Trainer`` does), else a count; 0 or None stays 0 (never)."""
    if not value:
        return 0
    return math.ceil(total * value) if value < 1 else int(value)


def trainer_fingerprint(trainer: Any, seed: int) -> dict[str, Any]:
    """The TrainingArguments that decide the result beyond the config (the learning rate may change)."""
    a = trainer.args
    keys = (
        "optim",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "lr_scheduler_type",
        "lr_scheduler_kwargs",
        "warmup_steps",
        "label_smoothing_factor",
        "num_train_epochs",
        "max_steps",
    )
    out = {k: getattr(getattr(a, k, None), "value", getattr(a, k, None)) for k in keys}
    out["warmup_ratio"] = getattr(a, "warmup_ratio", None)
    return {"trainer": json.loads(json.dumps(out, default=str)), "data_seed": seed}
