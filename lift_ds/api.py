"""``lift_ds.initialize``: the same call shape and 4-tuple as ``deepspeed.initialize``."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .backends import get_backend_class
from .backends.base import BackendContext
from .backends.lr_schedules import scheduler_factory
from .blocks import enable_gradient_checkpointing
from .drop_in_config import merge_args_lift_section, scheduler_horizon
from .engine import LiftEngine
from .errors import ConfigError
from .optim import CrossPhaseLRScheduler, NamedGroups, resolve_optimizer
from .plan import LiftPlan, resolve_plan
from .run_config import RunConfig, load_run_config
from .utils import get_logger, get_world_size

logger = get_logger(__name__)


class PhaseOptimizer:
    """The optimizer handle returned by :func:`initialize`: always the current phase's optimizer.

    LIFT builds a new optimizer at each phase boundary; this view forwards to whichever is current,
    so code holding it (``optimizer.param_groups[0]["lr"]``) stays right across phases.
    """

    def __init__(self, engine: LiftEngine) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        opt = self._engine.optimizer
        if opt is None:
            raise AttributeError(f"no optimizer: the LIFT plan is finished (asked for {name!r})")
        return getattr(opt, name)

    def zero_grad(self, set_to_none: bool = True) -> None:
        opt = self._engine.optimizer
        if opt is not None:
            opt.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        return f"PhaseOptimizer(block={self._engine.active_block!r}, optimizer={self._engine.optimizer!r})"


def initialize(
    args: Any = None,
    model: nn.Module | None = None,
    optimizer: Any = None,
    model_parameters: Any = None,
    training_data: Any = None,
    lr_scheduler: Any = None,
    mpu: Any = None,
    dist_init_required: bool | None = None,
    collate_fn: Callable | None = None,
    config: str | os.PathLike | Mapping[str, Any] | RunConfig | None = None,
    config_params: Mapping[str, Any] | None = None,
    total_steps: int | None = None,
    fixed_trainable: list[str] | None = None,
    param_groups: NamedGroups | None = None,
    plan: LiftPlan | None = None,
) -> tuple[LiftEngine, PhaseOptimizer, Any, Any]:
    """Build a LIFT engine; returns ``(engine, optimizer, training_dataloader, lr_scheduler)``.

    Args:
        args: an argparse namespace; its ``deepspeed_config`` is used when ``config`` is None.
        model: the model (a Hugging Face model or any module with a layer ``ModuleList``).
        optimizer: a callable ``params -> torch.optim.Optimizer`` (one optimizer is built per
            phase), a built Optimizer (each phase gets one of its class and defaults over its
            parameter groups restricted to the active block: every parameter keeps its group's
            weight decay, lr, betas, ...; the instance itself is never stepped), or None to use the
            config's ``"optimizer"`` section.
        model_parameters: accepted for compatibility and ignored: LIFT picks the trainable
            parameters of each phase itself.
        training_data: a ``torch.utils.data.Dataset``; a DataLoader with the config's micro batch
            size (and a DistributedSampler on several ranks) is returned for it.
        lr_scheduler: a callable ``optimizer -> scheduler``, or a scheduler already built on the
            optimizer you pass (``get_scheduler(...)``, ``LambdaLR``, ``OneCycleLR``,
            ``ReduceLROnPlateau``, ...); either way one schedule runs over the whole run, across
            phases. None uses the config's ``"scheduler"`` section (if any).
        mpu, dist_init_required: passed through to the backend's library (DeepSpeed).
        collate_fn: collate function for the returned DataLoader.
        config: a DeepSpeed config (path or dict) with a ``"lift"`` section, or a checked
            :class:`~lift_ds.run_config.RunConfig`.
        config_params: alias of ``config`` (as in DeepSpeed).
        total_steps: overrides ``lift.total_steps`` (e.g. from ``--max_steps``).
        fixed_trainable: parameter names trained for the whole run instead of the LIFT plan (the
            full fine-tuning and LoRA baselines in the same harness).
        param_groups: parameter groups for the phase optimizers when ``optimizer`` is a callable or
            None (e.g. the Trainer's no-decay group for biases and norms).
        plan: the plan already resolved for this model and config (the launcher resolves it on a
            meta-device copy of the model, before any weight is loaded); None resolves it here.

    Raises:
        ConfigError: every configuration problem at once, before any process group starts.
    """
    if model is None:
        raise ConfigError(["model: required (pass model=...)"])
    if not isinstance(model, nn.Module):
        raise ConfigError(
            [
                f"model: must be a torch.nn.Module, got {type(model).__name__} {model!r:.80}; load it first, e.g. "
                "AutoModelForCausalLM.from_pretrained(path)"
            ]
        )
    if config is None:
        config = config_params
    if config is None and args is not None:
        config = getattr(args, "deepspeed_config", None) or getattr(args, "ds_config", None)
    elif not isinstance(config, RunConfig):  # a config built in code, and --deepspeed_config with its "lift" section
        config = merge_args_lift_section(config, args)
    if config is None:
        raise ConfigError(['config: none given; pass config= a DeepSpeed JSON path or dict with a "lift" section'])
    run = config if isinstance(config, RunConfig) else load_run_config(config, world_size=get_world_size())
    if total_steps is None and run.lift.total_steps is None:
        total_steps = scheduler_horizon(lr_scheduler)  # get_scheduler(..., num_training_steps=N) knows the run's length
        if total_steps is not None:
            logger.info("lift.total_steps: %d, the horizon of the given lr_scheduler", total_steps)
    if total_steps is not None:
        run = run.with_lift(total_steps=total_steps)
    if model_parameters is not None:
        logger.info("model_parameters is ignored: LIFT chooses the trainable parameters of each phase")
    if fixed_trainable is None and (problem := adapter_model_problem(model)):
        raise ConfigError([problem])
    if plan is not None and fixed_trainable is not None:
        raise ConfigError(["plan: give plan or fixed_trainable, not both (a plan already says what trains)"])
    if plan is not None and plan.total_steps != run.lift.total_steps:
        raise ConfigError(
            [
                f"plan: resolved for {plan.total_steps} steps, but lift.total_steps is {run.lift.total_steps}; "
                "resolve it with this config (lift_ds.resolve_plan)"
            ]
        )
    # a model LIFT cannot split, a bad layer range or pattern fail here, before any process group
    plan = plan or resolve_plan(model, run.lift, fixed_trainable)
    install_model_loss(model, run.lift.loss)
    if run.lift.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    # with no optimizer given, each backend builds the config's "optimizer" section its own way
    factory, groups = (
        (None, None)
        if optimizer is None and run.training.optimizer is not None
        else resolve_optimizer(optimizer, run.training.optimizer, model)
    )
    groups = groups or param_groups
    missing = groups.missing(plan.param_names_of(range(len(plan.candidates)))) if groups is not None else []
    if missing:
        raise ConfigError(
            [
                f"optimizer: {len(missing)} parameters LIFT trains are in none of the optimizer's parameter groups "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
                "build it over every parameter of the "
                "blocks LIFT trains (e.g. model.parameters()), or pass a callable params -> Optimizer"
            ]
        )
    fingerprint = _probe_before_any_process_group(run, model, factory, lr_scheduler, plan.total_steps)
    client_class = (
        type(optimizer).__name__
        if isinstance(optimizer, torch.optim.Optimizer)
        else fingerprint.get("optimizer", {}).get("type")
    )
    # e.g. DeepSpeed-Chat's DeepSpeedCPUAdam with --offload: judged as DeepSpeed judges it
    if factory is not None and client_class:
        problems = get_backend_class(run.backend).client_optimizer_problems(run.raw, client_class)
        if problems:
            raise ConfigError(problems, source=run.source)
    if lr_scheduler is None and run.training.scheduler is not None:
        lr_scheduler = scheduler_factory(run.training.scheduler, plan.total_steps)
    schedule = CrossPhaseLRScheduler(lr_scheduler, optimizer if isinstance(optimizer, torch.optim.Optimizer) else None)
    passthrough = {k: v for k, v in (("mpu", mpu), ("dist_init_required", dist_init_required)) if v is not None}
    backend = get_backend_class(run.backend)(BackendContext(model, run, factory, passthrough, groups))
    engine = LiftEngine(model, run, plan, backend, schedule)
    engine.run_fingerprint.update(fingerprint)
    loader = None
    if training_data is not None:
        loader = make_dataloader(
            training_data, run.training.micro_batch_size, backend.rank, backend.world_size, collate_fn, run.lift.seed
        )
        engine.training_dataloader = loader
    return engine, PhaseOptimizer(engine), loader, schedule


def _probe_before_any_process_group(
    run: RunConfig, model: nn.Module, factory: Any, lr_scheduler: Any, total_steps: int
) -> dict[str, Any]:
    """The optimizer and schedule the run will build, tried once (on a dummy parameter, or one of
    the model's when the factory needs its own): a NaN or out-of-range argument is a ConfigError now,
    not an error inside torch or DeepSpeed later. Returns their part of the run's fingerprint."""
    from .backends.lr_schedules import config_lr, scheduler_problems
    from .optim_checks import describe_optimizer, probe_optimizer, probe_scheduler

    problems, base_lr, fingerprint = [], config_lr(run.training.optimizer) or 1e-3, {}
    if factory is not None:
        problems, built = probe_optimizer(factory, "optimizer", keep=True)
        # a factory that looks its parameters up in the model
        if built is None and any("KeyError" in p for p in problems):
            problems, built = probe_optimizer(
                factory, "optimizer", param=next(iter(model.parameters()), None), keep=True
            )
        if built is not None:
            base_lr, fingerprint["optimizer"] = float(built.param_groups[0]["lr"]), describe_optimizer(built)
    else:  # every hyperparameter as torch.optim holds it (defaults included); DeepSpeed's own optimizers: the section
        section = run.training.optimizer or {}
        try:
            from .optim import optimizer_factory_from_section

            fingerprint["optimizer"] = describe_optimizer(
                optimizer_factory_from_section(section)([nn.Parameter(torch.zeros(1))])
            )
        except (ConfigError, TypeError, ValueError):
            fingerprint["optimizer"] = {
                "type": section.get("type"),
                **{k: v for k, v in section.get("params", {}).items() if k != "lr"},
            }
    if callable(lr_scheduler) and not problems:
        problems += probe_scheduler(lr_scheduler, base_lr, total_steps)
    elif lr_scheduler is None and run.training.scheduler is not None:
        problems += scheduler_problems(run.training.scheduler, total_steps, base_lr)
        fingerprint["scheduler"] = run.training.scheduler
    if problems:
        raise ConfigError(problems, source=run.source)
    return fingerprint


def install_model_loss(model: nn.Module, mode: str) -> str | None:
    """``lift.loss`` on ``model`` (:func:`lift_ds.loss.install_loss`); a model ``chunked`` cannot serve is a
    ConfigError."""
    from .loss import install_loss

    try:
        return install_loss(model, mode)
    except ValueError as e:
        raise ConfigError([str(e)]) from None


def adapter_model_problem(model: nn.Module) -> str | None:
    """A PEFT model with frozen base weights: LIFT would train each active block's weights, which PEFT
    froze, and a PEFT save keeps only the adapter (the training silently lost). Refused, naming the way out."""
    if getattr(model, "peft_config", None) is None:
        return None
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if not frozen:
        return None
    return (
        f"model: a PEFT model ({type(model).__name__}, "
        f"peft_config / --use_peft) with {len(frozen)} frozen base weights (e.g. "
        f"{frozen[0]}): LIFT trains every weight of the active block, "
        "so it would train what PEFT froze, and saving a PEFT "
        "model keeps only the adapter. LIFT over adapters is not supported: "
        "pass the base model (no peft_config) to train "
        "it block by block, or train the adapters without LIFT (plain Trainer / deepspeed.initialize)"
    )


def make_dataloader(
    dataset: Any, micro_batch_size: int, rank: int, world_size: int, collate_fn: Callable | None, seed: int
) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset``: shuffled with ``seed``, split across ranks."""
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

    if world_size > 1:
        sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    return DataLoader(dataset, batch_size=micro_batch_size, sampler=sampler, collate_fn=collate_fn, drop_last=True)
