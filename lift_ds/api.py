"""``lift_ds.initialize``: the same call shape and 4-tuple as ``deepspeed.initialize``."""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .backends import get_backend_class
from .backends.base import BackendContext
from .backends.lr_schedules import scheduler_factory
from .config import ConfigError, RunConfig, load_run_config
from .engine import LiftEngine
from .optim import CrossPhaseLRScheduler, as_optimizer_factory
from .plan import resolve_plan
from .utils import get_logger

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
    config: "str | os.PathLike | Mapping[str, Any] | RunConfig | None" = None,
    config_params: Mapping[str, Any] | None = None,
    total_steps: int | None = None,
    fixed_trainable: list[str] | None = None,
) -> tuple[LiftEngine, PhaseOptimizer, Any, Any]:
    """Build a LIFT engine; returns ``(engine, optimizer, training_dataloader, lr_scheduler)``.

    Args:
        args: an argparse namespace; its ``deepspeed_config`` is used when ``config`` is None.
        model: the model (a Hugging Face model or any module with a layer ``ModuleList``).
        optimizer: a callable ``params -> torch.optim.Optimizer`` (one optimizer is built per
            phase), an Optimizer whose class and defaults are reused per phase, or None to use the
            config's ``"optimizer"`` section.
        model_parameters: accepted for compatibility and ignored: LIFT picks the trainable
            parameters of each phase itself.
        training_data: a ``torch.utils.data.Dataset``; a DataLoader with the config's micro batch
            size (and a DistributedSampler on several ranks) is returned for it.
        lr_scheduler: a callable ``optimizer -> scheduler``; the schedule runs over the whole run.
            None uses the config's ``"scheduler"`` section (if any).
        mpu, dist_init_required: passed through to the backend's library (DeepSpeed).
        collate_fn: collate function for the returned DataLoader.
        config: a DeepSpeed config (path or dict) with a ``"lift"`` section, or a checked
            :class:`~lift_ds.config.RunConfig`.
        config_params: alias of ``config`` (as in DeepSpeed).
        total_steps: overrides ``lift.total_steps`` (e.g. from ``--max_steps``).
        fixed_trainable: parameter names trained for the whole run instead of the LIFT plan (the
            full fine-tuning and LoRA baselines in the same harness).

    Raises:
        ConfigError: every configuration problem at once, before any process group starts.
    """
    if model is None:
        raise ConfigError(["model: required (pass model=...)"])
    if config is None:
        config = config_params
    if config is None and args is not None:
        config = getattr(args, "deepspeed_config", None) or getattr(args, "ds_config", None)
    if config is None:
        raise ConfigError(["config: none given; pass config= a DeepSpeed JSON path or dict with a \"lift\" section"])
    run = load_run_config(config, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    if total_steps is not None:
        run = run.with_lift(total_steps=total_steps)
    if model_parameters is not None:
        logger.info("model_parameters is ignored: LIFT chooses the trainable parameters of each phase")
    # a model LIFT cannot split, a bad layer range or pattern fail here, before any process group
    plan = resolve_plan(model, run.lift, fixed_trainable)
    install_model_loss(model, run.lift.loss)
    if run.lift.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    # with no optimizer given, each backend builds the config's "optimizer" section its own way
    factory = None if optimizer is None and run.training.optimizer is not None else as_optimizer_factory(optimizer, run.training.optimizer)
    if lr_scheduler is None and run.training.scheduler is not None:
        lr_scheduler = scheduler_factory(run.training.scheduler, plan.total_steps)
    schedule = CrossPhaseLRScheduler(lr_scheduler)
    passthrough = {k: v for k, v in (("mpu", mpu), ("dist_init_required", dist_init_required)) if v is not None}
    backend = get_backend_class(run.backend)(BackendContext(model, run, factory, passthrough))
    engine = LiftEngine(model, run, plan, backend, schedule)
    loader = None
    if training_data is not None:
        loader = make_dataloader(training_data, run.training.micro_batch_size, backend.rank, backend.world_size, collate_fn, run.lift.seed)
    return engine, PhaseOptimizer(engine), loader, schedule


def install_model_loss(model: nn.Module, mode: str) -> str | None:
    """``lift.loss`` on ``model`` (:func:`lift_ds.loss.install_loss`); a model ``chunked`` cannot serve is a ConfigError."""
    from .loss import install_loss

    try:
        return install_loss(model, mode)
    except ValueError as e:
        raise ConfigError([str(e)]) from None


def enable_gradient_checkpointing(model: nn.Module, **kwargs: Any) -> None:
    """Non-reentrant activation checkpointing through transformers' own switch, keeping truncated
    backward: a block before the active one is neither recomputed nor back-propagated.

    transformers also makes the input embeddings' output require a gradient when it turns
    checkpointing on (``enable_input_require_grads``, needed by reentrant checkpointing and PEFT);
    every layer's output would then need a gradient and backward would run through every block
    before the active one. Non-reentrant checkpointing does not need it, so it is removed here.
    """
    kwargs = {**kwargs, "use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ConfigError([f"lift.gradient_checkpointing: {type(model).__name__} has no activation_checkpointing_enable / "
                           "gradient_checkpointing_enable (a Hugging Face PreTrainedModel has); wrap its layers yourself"])
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
    logger.info("gradient checkpointing on (non-reentrant; truncated backward kept)")


def make_dataloader(
    dataset: Any, micro_batch_size: int, rank: int, world_size: int, collate_fn: Callable | None, seed: int
) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset``: shuffled with ``seed``, split across ranks."""
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

    if world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    return DataLoader(dataset, batch_size=micro_batch_size, sampler=sampler, collate_fn=collate_fn, drop_last=True)
