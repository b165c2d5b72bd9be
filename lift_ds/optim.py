"""Optimizers built per phase, and one learning-rate schedule that runs across all phases.

LIFT builds a new optimizer at every phase boundary, but a learning-rate schedule must not restart
with it. The schedule therefore drives a *proxy* optimizer that lives for the whole run (one dummy
parameter, never stepped); before each optimizer step the phase optimizer's groups get
``their base lr x (proxy lr / proxy base lr)``. Any scheduler works this way: a DeepSpeed
``"scheduler"`` section (through :mod:`lift_ds.backends.lr_schedules`), or a callable ``optimizer -> LRScheduler`` such as a Hugging Face
``get_cosine_schedule_with_warmup`` partial. Its state is one ``state_dict`` for checkpoints.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Mapping

import torch

from .config import ConfigError

OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]

_DS_ONLY_KEYS = {"torch_adam", "adam_w_mode", "fused", "bias_correction", "amsgrad"}
#: optimizer types only the torch backend builds (``AdamW8bit``: torchao's 8-bit AdamW, which updates
#: 16-bit weights itself, with stochastic rounding, instead of through fp32 masters)
TORCH_BACKEND_ONLY = ("adamw8bit",)


def optimizer_backend_problems(section: Mapping[str, Any] | None, backend: str, runs_16bit: bool) -> list[str]:
    """An optimizer type the backend ``backend`` cannot run (``AdamW8bit`` outside the torch backend)."""
    kind = str((section or {}).get("type", "")).lower()
    if kind in TORCH_BACKEND_ONLY and not runs_16bit:
        return [f"optimizer.type: {section['type']!r} updates 16-bit weights without fp32 masters, which only the torch backend "
                f"runs (this is {backend}); use AdamW here (DeepSpeed: offload_optimizer keeps its state in host memory)"]
    return []


def _adamw8bit() -> type:
    try:
        from torchao.optim import AdamW8bit
    except ImportError:
        raise ConfigError(["optimizer.type: AdamW8bit is torchao's 8-bit AdamW: pip install 'lift_ds[quant]' (torchao)"]) from None
    return AdamW8bit


def optimizer_factory_from_section(section: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> OptimizerFactory:
    """A factory for the DeepSpeed ``"optimizer"`` section's type, with DeepSpeed's meanings.

    DeepSpeed's ``"Adam"`` is AdamW unless ``"adam_w_mode": false``; ``"AdamW"`` and ``"SGD"`` are
    as in torch. ``extra`` adds constructor arguments (e.g. ``fused=True`` on CUDA).
    """
    kind = str(section.get("type", "")).lower()
    params = dict(section.get("params", {}))
    autos = [k for k, v in params.items() if v == "auto"]
    if autos:
        raise ConfigError([f"optimizer.params.{k}: \"auto\" is filled in only by a Hugging Face Trainer "
                           "(lift_ds.integrations.transformers.LiftTrainer); give a value here (the launcher's --lr sets lr)" for k in autos])
    adam_w_mode = params.get("adam_w_mode", True)
    kwargs = {k: v for k, v in params.items() if k not in _DS_ONLY_KEYS}
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    if kind == "adam":
        cls = torch.optim.AdamW if adam_w_mode else torch.optim.Adam
    elif kind == "adamw":
        cls = torch.optim.AdamW
    elif kind == "sgd":
        cls = torch.optim.SGD
    elif kind == "adamw8bit":
        cls = _adamw8bit()
    else:
        raise ConfigError([f"optimizer.type: {section.get('type')!r} is not supported by this backend; allowed: Adam, AdamW, AdamW8bit, SGD "
                           "(or pass optimizer= a factory)"])
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ConfigError([f"optimizer.params.{k}: not a parameter of {cls.__name__}; allowed: {sorted(allowed)}" for k in unknown])

    kwargs.update(extra or {})

    def factory(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        kw = dict(kwargs)
        if kind == "adamw8bit":  # no fp32 master: bf16 weights take the update with stochastic rounding
            kw.setdefault("bf16_stochastic_round", any(p.dtype == torch.bfloat16 for p in ps))
        return cls(ps, **kw)

    factory.__name__ = f"{cls.__name__}_from_config"
    #: the optimizer updates 16-bit weights itself: the backend gives it the weights, not fp32 masters
    factory.updates_16bit_weights = kind == "adamw8bit"  # type: ignore[attr-defined]
    return factory


def as_optimizer_factory(optimizer: Any, section: Mapping[str, Any] | None) -> OptimizerFactory:
    """Turn what a caller passed as ``optimizer`` into a per-phase factory.

    Accepts a callable ``params -> Optimizer``; an Optimizer instance (its class and defaults are
    reused for every phase: its own parameters are not used); or None, with the config's
    ``"optimizer"`` section.
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        cls, defaults = type(optimizer), dict(optimizer.defaults)
        allowed = set(inspect.signature(cls.__init__).parameters)
        defaults = {k: v for k, v in defaults.items() if k in allowed}
        return lambda ps: cls(ps, **defaults)
    if callable(optimizer):
        return optimizer
    if optimizer is not None:
        raise ConfigError([f"optimizer: must be a callable params -> torch.optim.Optimizer, an Optimizer, or None; got {type(optimizer).__name__}"])
    if section is None:
        raise ConfigError(["optimizer: none given; pass optimizer= a callable params -> torch.optim.Optimizer, or add an \"optimizer\" section to the config"])
    return optimizer_factory_from_section(section)


class CrossPhaseLRScheduler:
    """One learning-rate schedule for the whole run, applied to each phase's optimizer.

    It behaves like a scheduler (``step``, ``get_last_lr``, ``state_dict``) but lives across phase
    rebuilds: the wrapped schedule drives a proxy optimizer, and :meth:`apply` copies its rate into
    whichever phase optimizer is current.

    Args:
        scheduler: a callable ``optimizer -> scheduler`` (any torch or DeepSpeed LR scheduler; for
            a config's ``"scheduler"`` section see :func:`lift_ds.backends.lr_schedules.scheduler_factory`),
            or None for a constant learning rate.
    """

    def __init__(self, scheduler: SchedulerFactory | None) -> None:
        if scheduler is not None and not callable(scheduler):
            raise ConfigError([
                "lr_scheduler: must be a callable optimizer -> scheduler (LIFT builds a new optimizer each phase, "
                f"so an already-built scheduler cannot follow it); got {type(scheduler).__name__}"
            ])
        self._factory = scheduler
        self._proxy: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.base_lr: float | None = None

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Record a new phase optimizer's base learning rates (and start the schedule on first use)."""
        for g in optimizer.param_groups:
            g.setdefault("lift_base_lr", g["lr"])
        if self._proxy is None:
            self.base_lr = float(optimizer.param_groups[0]["lift_base_lr"])
            self._proxy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=self.base_lr)
            if self._factory is not None:
                self.scheduler = self._factory(self._proxy)
        self.apply(optimizer)

    @property
    def lr(self) -> float:
        """The learning rate the schedule gives now (for the first parameter group)."""
        return float(self._proxy.param_groups[0]["lr"]) if self._proxy else float("nan")

    def apply(self, optimizer: torch.optim.Optimizer) -> None:
        """Set the phase optimizer's learning rates from the schedule."""
        if self._proxy is None or not self.base_lr:
            return
        factor = self.lr / self.base_lr
        for g in optimizer.param_groups:
            g["lr"] = g["lift_base_lr"] * factor

    def step(self) -> None:
        """Advance the schedule by one optimizer step."""
        if self.scheduler is not None:
            assert self._proxy is not None
            self._proxy.step()  # a no-op (the dummy has no grad) that keeps torch's step-order check quiet
            self.scheduler.step()

    def get_last_lr(self) -> list[float]:
        return [self.lr]

    def state_dict(self) -> dict[str, Any]:
        return {
            "base_lr": self.base_lr,
            "proxy_lr": self.lr if self._proxy else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self._proxy is None:
            raise RuntimeError("CrossPhaseLRScheduler.load_state_dict before any optimizer was attached")
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("proxy_lr") is not None:
            self._proxy.param_groups[0]["lr"] = state["proxy_lr"]


def optimizer_state_elements(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor] | None = None) -> int:
    """Number of tensor elements of optimizer state (moments etc.), optionally only for ``params``."""
    wanted = None if params is None else {id(p) for p in params}
    total = 0
    for p, st in optimizer.state.items():
        if wanted is not None and id(p) not in wanted:
            continue
        total += sum(v.numel() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
    return total
