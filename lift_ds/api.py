"""``lift_ds.initialize``: the same call shape and 4-tuple as ``deepspeed.initialize``."""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .backends import get_backend_class
from .blocks import find_blocks, match_modules, select_candidates
from .config import ConfigError, parse_config
from .engine import LiftEngine
from .optim import LRController, as_optimizer_factory
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
    config: str | os.PathLike | Mapping[str, Any] | None = None,
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
        mpu, dist_init_required: passed through to DeepSpeed by the DeepSpeed backend.
        collate_fn: collate function for the returned DataLoader.
        config: a DeepSpeed config (path or dict) with a ``"lift"`` section.
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
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    lift, training, raw = parse_config(config, world_size=world_size)
    if total_steps is not None:
        lift = lift.replace(total_steps=total_steps)
    if lift.total_steps is None:
        raise ConfigError(["lift.total_steps: required (an integer >= 1); set it in the config or pass total_steps="])
    if model_parameters is not None:
        logger.info("model_parameters is ignored: LIFT chooses the trainable parameters of each phase")
    # with no optimizer given, each backend builds the config's "optimizer" section its own way
    factory = None if optimizer is None and training.optimizer is not None else as_optimizer_factory(optimizer, training.optimizer)
    lr = LRController(lr_scheduler if lr_scheduler is not None else training.scheduler, lift.total_steps)
    if fixed_trainable is None:  # a model LIFT cannot split fails here, before any process group
        select_candidates(find_blocks(model), lift)
        match_modules(model, lift.always_trainable)
    backend_cls = get_backend_class(lift.backend)
    backend_kwargs: dict[str, Any] = {}
    if lift.backend == "deepspeed":
        backend_kwargs = {"mpu": mpu, "dist_init_required": dist_init_required}
    backend = backend_cls(model, training, raw, factory, **backend_kwargs)
    engine = LiftEngine(model, lift, training, backend, lr, fixed_trainable=fixed_trainable)
    loader = None
    if training_data is not None:
        loader = make_dataloader(training_data, training.micro_batch_size, backend.rank, backend.world_size, collate_fn, lift.seed)
    return engine, PhaseOptimizer(engine), loader, lr


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
