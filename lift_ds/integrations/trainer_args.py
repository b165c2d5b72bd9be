"""TrainingArguments → lift_ds: the config with ``"auto"`` filled in, the per-phase optimizer and
schedule the arguments describe, the Trainer features LIFT refuses, and the rank's sample stream.
Used by :mod:`lift_ds.integrations.transformers`."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..config import ConfigError, read_config_file
from ..optim import NamedGroups

#: TrainingArguments.optim values lift_ds builds per phase
OPTIMS = ("adamw_torch", "adamw_torch_fused", "sgd")


def unsupported_features(trainer: Any) -> list[str]:
    """Trainer features LIFT cannot honour, each a problem naming the argument and what to do."""
    a = trainer.args
    problems = []
    optim = getattr(a.optim, "value", a.optim)
    if optim not in OPTIMS:
        problems.append(f"TrainingArguments.optim: {optim!r} is not built per LIFT phase; use one of {', '.join(OPTIMS)}, or an "
                        "\"optimizer\" section in the DeepSpeed config")
    checks = [
        ("load_best_model_at_end", a.load_best_model_at_end, "LIFT's checkpoints hold the blocks trained so far; pick a checkpoint yourself"),
        ("torch_compile", a.torch_compile, "the model is re-wrapped at every phase"),
        ("train_sampling_strategy", getattr(a, "train_sampling_strategy", "random") != "random",
         "lift_ds orders data by a seeded permutation keyed by global sample index (exact resume on any layout)"),
        ("auto_find_batch_size", a.auto_find_batch_size, "set per_device_train_batch_size"),
        # a subclass whose lift config carries the "fsdp" section itself may keep TrainingArguments.fsdp (axolotl's save reads it)
        ("fsdp", bool(a.fsdp) and not getattr(trainer, "lift_fsdp_from_args", False),
         "pass lift_config= a config with an \"fsdp\" section (lift_ds's FSDP2 backend)"),
        ("neftune_noise_alpha", getattr(a, "neftune_noise_alpha", None) is not None, "not supported with LIFT"),
        ("use_liger_kernel", getattr(a, "use_liger_kernel", False), "not supported with LIFT"),
    ]
    problems += [f"TrainingArguments.{name}: not supported with LIFT ({why})" for name, on, why in checks if on]
    if trainer.model_init is not None:
        problems.append("model_init: not supported with LIFT (pass model=)")
    return problems


def _fill(section: dict, key: str, value: Any, problems: list[str], path: str) -> None:
    """Fill ``"auto"`` (or an absent key) with the TrainingArguments value; a different explicit value is a problem."""
    if section.get(key, "auto") == "auto":
        section[key] = value
    elif section[key] != value and not (isinstance(value, float) and isinstance(section[key], (int, float)) and math.isclose(section[key], value)):
        problems.append(f"{path}: {section[key]!r} in the DeepSpeed config, but TrainingArguments says {value!r}; make them agree or "
                        "set it to \"auto\"")


def trainer_config(trainer: Any, source: Any, total_steps: int) -> dict[str, Any]:
    """The lift_ds config dict: the JSON, with ``"auto"`` values filled from the TrainingArguments."""
    a = trainer.args
    raw, _ = read_config_file(source)
    problems: list[str] = []
    if not isinstance(raw.get("lift"), dict):
        raise ConfigError(["lift: the config has no \"lift\" section; add one (see ds_configs/zero2.json) or use transformers.Trainer"],
                          source=str(source))
    _fill(raw, "train_micro_batch_size_per_gpu", a.per_device_train_batch_size, problems, "train_micro_batch_size_per_gpu")
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
        for key, value in (("lr", a.learning_rate), ("betas", [a.adam_beta1, a.adam_beta2]), ("eps", a.adam_epsilon),
                           ("weight_decay", a.weight_decay)):
            if key in p:
                _fill(p, key, value, problems, f"optimizer.params.{key}")
    sched = raw.get("scheduler")
    if isinstance(sched, dict) and isinstance(sched.get("params"), dict):
        p = sched["params"]
        for key, value in (("warmup_min_lr", 0.0), ("warmup_max_lr", a.learning_rate), ("warmup_num_steps", max(1, a.get_warmup_steps(total_steps))),
                           ("total_num_steps", total_steps)):  # DeepSpeed's WarmupLR family needs >= 1 warm-up step
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
        return torch.optim.AdamW(groups, lr=a.learning_rate, betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon,
                                 fused=optim == "adamw_torch_fused" or None)

    return build


def decay_groups(trainer: Any, weight_decay: float | None) -> NamedGroups:
    """Trainer's two parameter groups, on every optimizer path: ``weight_decay`` for the parameters
    ``get_decay_parameter_names`` names (None: the optimizer's own default, e.g. a DeepSpeed config
    section's), none for biases and norms."""
    model = trainer.model
    decay = set(trainer.get_decay_parameter_names(model))
    group_of = {n: 0 if n in decay else 1 for n, _ in model.named_parameters()}
    return NamedGroups(model, group_of, [{} if weight_decay is None else {"weight_decay": weight_decay}, {"weight_decay": 0.0}])


def scheduler_factory(trainer: Any, total_steps: int) -> Callable[[torch.optim.Optimizer], Any]:
    """``lr_scheduler_type`` with its warm-up, as one schedule over the whole run."""
    from transformers import get_scheduler

    a = trainer.args

    def build(optimizer: torch.optim.Optimizer) -> Any:
        return get_scheduler(a.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=a.get_warmup_steps(total_steps),
                             num_training_steps=total_steps, scheduler_specific_kwargs=a.lr_scheduler_kwargs or {})

    return build


class SampleStream:
    """Micro-batches of a dataset for one rank, keyed by global sample index (see
    :class:`lift_ds.data.RankBatches`): epoch ``e`` is a permutation seeded with ``seed + e``, cut to
    whole global batches; rank ``r`` takes chunk ``j*world + r`` of each optimizer step."""

    def __init__(self, dataset: Any, collate: Callable, micro_batch: int, rank: int, world: int, accumulation: int, seed: int) -> None:
        n = len(dataset)
        self.global_batch = micro_batch * accumulation * world
        if n < self.global_batch:
            raise ConfigError([f"train_dataset: {n} samples are fewer than one global batch ({micro_batch} x {accumulation} x {world} ranks)"])
        self.dataset, self.collate, self.micro_batch, self.rank, self.world, self.seed = dataset, collate, micro_batch, rank, world, seed
        self.samples_per_epoch = (n // self.global_batch) * self.global_batch
        self._epoch, self._order = -1, []

    def batch_at(self, step_start: int, j: int) -> Any:
        start = step_start + (j * self.world + self.rank) * self.micro_batch
        epoch, k = divmod(start, self.samples_per_epoch)
        if epoch != self._epoch:
            self._order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            self._epoch = epoch
        return self.collate([self.dataset[i] for i in self._order[k : k + self.micro_batch]])
