"""Optimizers built per phase, and one learning-rate schedule that runs across all phases.

LIFT builds a new optimizer at every phase boundary, but a learning-rate schedule must not restart
with it. The schedule therefore drives a *proxy* optimizer that lives for the whole run (one dummy
parameter, never stepped); before each optimizer step the phase optimizer's groups get
``their base lr x (proxy lr / proxy base lr)``. Any scheduler works this way: a DeepSpeed
``"scheduler"`` section (through :mod:`lift_ds.backends.lr_schedules`), or a callable
``optimizer -> LRScheduler`` such as a Hugging Face ``get_cosine_schedule_with_warmup`` partial. A scheduler
already built on the caller's optimizer drives that optimizer instead, group by group. Its state is one
``state_dict`` for checkpoints.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .errors import ConfigError

OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]

_DS_ONLY_KEYS = {"torch_adam", "adam_w_mode", "fused", "bias_correction"}
#: optimizer types only the torch backend builds (``AdamW8bit``: torchao's 8-bit AdamW, which updates
#: 16-bit weights itself, with stochastic rounding, instead of through fp32 masters)
TORCH_BACKEND_ONLY = ("adamw8bit",)


def optimizer_backend_problems(section: Mapping[str, Any] | None, backend: str, runs_16bit: bool) -> list[str]:
    """An optimizer type the backend ``backend`` cannot run (``AdamW8bit`` outside the torch backend)."""
    kind = str((section or {}).get("type", "")).lower()
    if kind in TORCH_BACKEND_ONLY and not runs_16bit:
        return [
            f"optimizer.type: {section['type']!r} updates 16-bit "
            "weights without fp32 masters, which only the torch backend "
            f"runs (this is {backend}); use AdamW here (DeepSpeed: offload_optimizer keeps its state in host memory)"
        ]
    return []


def _adamw8bit() -> type:
    try:
        from torchao.optim import AdamW8bit
    except ImportError:
        raise ConfigError(
            ["optimizer.type: AdamW8bit is torchao's 8-bit AdamW: pip install 'lift_ds[quant]' (torchao)"]
        ) from None
    return AdamW8bit


def optimizer_factory_from_section(
    section: Mapping[str, Any], extra: Mapping[str, Any] | None = None
) -> OptimizerFactory:
    """A factory for the DeepSpeed ``"optimizer"`` section's type, with DeepSpeed's meanings.

    DeepSpeed's ``"Adam"`` is AdamW unless ``"adam_w_mode": false``; ``"AdamW"`` and ``"SGD"`` are
    as in torch. ``extra`` adds constructor arguments (e.g. ``fused=True`` on CUDA).
    """
    kind = str(section.get("type", "")).lower()
    params = dict(section.get("params", {}))
    autos = [k for k, v in params.items() if v == "auto"]
    if autos:
        raise ConfigError(
            [
                f'optimizer.params.{k}: "auto" is filled in only by a Hugging Face Trainer '
                "(lift_ds.integrations.transformers.LiftTrainer); give a value here (the launcher's --lr sets lr)"
                for k in autos
            ]
        )
    from .optim_checks import section_value_problems

    problems = section_value_problems(params)
    if problems:
        raise ConfigError(problems)
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
        raise ConfigError(
            [
                f"optimizer.type: {section.get('type')!r} is not supported by this backend; "
                "allowed: Adam, AdamW, AdamW8bit, SGD "
                "(or pass optimizer= a factory)"
            ]
        )
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ConfigError(
            [f"optimizer.params.{k}: not a parameter of {cls.__name__}; allowed: {sorted(allowed)}" for k in unknown]
        )

    kwargs.update(extra or {})

    def factory(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        kw = dict(kwargs)
        if kind == "adamw8bit":  # no fp32 master: bf16 weights take the update with stochastic rounding
            # parameters, or parameter groups
            flat = [q for g in ps for q in (g["params"] if isinstance(g, dict) else [g])]
            kw.setdefault("bf16_stochastic_round", any(q.dtype == torch.bfloat16 for q in flat))
        return cls(ps, **kw)

    factory.__name__ = f"{cls.__name__}_from_config"
    #: the optimizer updates 16-bit weights itself: the backend gives it the weights, not fp32 masters
    factory.updates_16bit_weights = kind == "adamw8bit"  # type: ignore[attr-defined]
    return factory


class NamedGroups:
    """Splits each phase's parameters into the parameter groups a caller asked for, by parameter name.

    The group settings (weight decay, an lr of its own, betas, ...) are given per group once; at each
    phase the active parameters are sorted into those groups (empty groups are left out). Names are
    looked up at every call: FSDP2 and Q-LIFT give parameters new objects, their names stay. Each group
    carries ``lift_group``, its index, so the learning-rate schedule can follow it (see
    :class:`CrossPhaseLRScheduler`).

    Args:
        model: the model whose parameters are grouped.
        group_of: parameter name -> group index.
        settings: one dict of optimizer settings per group (no ``"params"``).
        default: the group of a name not in ``group_of`` (None: such a parameter is an error).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        group_of: Mapping[str, int],
        settings: list[dict[str, Any]],
        default: int | None = None,
    ) -> None:
        self.model, self.group_of, self.settings, self.default = (
            model,
            dict(group_of),
            [dict(s) for s in settings],
            default,
        )

    def missing(self, names: Iterable[str]) -> list[str]:
        """The names (of parameters LIFT will train) that belong to no group."""
        return [] if self.default is not None else [n for n in names if n not in self.group_of]

    def __call__(self, params: list[torch.nn.Parameter]) -> list[dict[str, Any]]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        groups: dict[int, list[torch.nn.Parameter]] = {}
        for p in params:
            i = self.group_of.get(names.get(id(p), ""), self.default)
            if i is None:
                raise ConfigError(
                    [f"optimizer: parameter {names.get(id(p), '?')!r} is in none of the optimizer's parameter groups"]
                )
            groups.setdefault(i, []).append(p)
        return [{**self.settings[i], "params": ps, "lift_group": i} for i, ps in sorted(groups.items())]


def groups_of_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> NamedGroups:
    """The parameter groups of a built optimizer, by the names of ``model``'s parameters in them.

    A group's ``lr`` is its ``initial_lr`` where a scheduler built on the optimizer has set one (a
    warm-up starts the group's ``lr`` at 0; the schedule then scales the initial value)."""
    names = {id(p): n for n, p in model.named_parameters()}
    group_of = {names[id(p)]: i for i, g in enumerate(optimizer.param_groups) for p in g["params"] if id(p) in names}
    settings = []
    for g in optimizer.param_groups:
        s = {k: v for k, v in g.items() if k not in ("params", "initial_lr", "lift_group")}
        if "initial_lr" in g:
            s["lr"] = g["initial_lr"]
        settings.append(s)
    return NamedGroups(model, group_of, settings)


def resolve_optimizer(
    optimizer: Any, section: Mapping[str, Any] | None, model: torch.nn.Module | None = None
) -> tuple[OptimizerFactory | None, NamedGroups | None]:
    """Turn what a caller passed as ``optimizer`` into ``(per-phase factory, parameter groups)``.

    Accepts a callable ``params -> Optimizer`` (no groups: the callable groups as it likes); an
    Optimizer instance, as ``deepspeed.initialize`` does: each phase gets an optimizer of its class
    and defaults whose groups are the instance's groups restricted to the active parameters, every
    parameter with its own group's settings (the instance itself is never stepped); or None, with
    the config's ``"optimizer"`` section (the backend builds it; factory None).
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        if model is None:
            raise TypeError(
                "resolve_optimizer: an Optimizer instance needs the model (its groups are found by parameter name)"
            )
        cls = type(optimizer)
        allowed = set(inspect.signature(cls.__init__).parameters)
        defaults = {k: v for k, v in optimizer.defaults.items() if k in allowed}
        groups = groups_of_optimizer(optimizer, model)
        if not groups.group_of:
            raise ConfigError(
                [
                    f"optimizer: the {cls.__name__} you passed holds none of the model's parameters; build it over "
                    "model.parameters() (or parameter groups of them), or pass a callable params -> Optimizer"
                ]
            )

        def factory(params: Any) -> torch.optim.Optimizer:
            return cls(params, **defaults)

        factory.__name__ = f"{cls.__name__}_like_the_given_instance"
        return factory, groups
    if callable(optimizer):
        return optimizer, None
    if optimizer is not None:
        raise ConfigError(
            [
                "optimizer: must be a callable params -> torch.optim.Optimizer, "
                f"an Optimizer, or None; got {type(optimizer).__name__}"
            ]
        )
    if section is None:
        raise ConfigError(
            [
                "optimizer: none given; pass optimizer= a callable params -> torch.optim.Optimizer, "
                'or add an "optimizer" section to the config'
            ]
        )
    return None, None


class CrossPhaseLRScheduler:
    """One learning-rate schedule for the whole run, applied to each phase's optimizer.

    It behaves like a scheduler (``step``, ``get_last_lr``, ``state_dict``) but lives across phase
    rebuilds. The schedule's clock is an optimizer that lives for the whole run and is never stepped:

    - a scheduler factory (a callable ``optimizer -> scheduler``, a config's ``"scheduler"``
      section, see :func:`lift_ds.backends.lr_schedules.scheduler_factory`) drives a proxy optimizer
      with one dummy parameter; each phase group gets ``its base lr x (proxy lr / proxy base lr)``;
    - a built scheduler (``LambdaLR``, ``get_scheduler(...)``, ``OneCycleLR``, ``ReduceLROnPlateau``,
      DeepSpeed's ``WarmupLR``, ...) drives its own optimizer, the one the caller built it on. When
      that is the optimizer whose groups the phases use (``optimizer``), a phase group that came
      from its group ``i`` (``lift_group``, see :class:`NamedGroups`) gets group ``i``'s lr; any
      other group gets its base lr x the first group's scale.

    :meth:`apply` copies the rates into whichever phase optimizer is current. Attributes not defined
    here come from the wrapped scheduler (``scheduler.last_epoch``, ``scheduler.base_lrs``, ...).

    Args:
        scheduler: a scheduler factory, a built scheduler, or None for a constant learning rate.
        optimizer: the optimizer instance whose parameter groups the phases use, if any.
    """

    def __init__(self, scheduler: Any, optimizer: torch.optim.Optimizer | None = None) -> None:
        built = scheduler is not None and not callable(scheduler)
        if built and not (
            callable(getattr(scheduler, "step", None))
            and isinstance(getattr(scheduler, "optimizer", None), torch.optim.Optimizer)
        ):
            raise ConfigError(
                [
                    "lr_scheduler: must be a callable optimizer -> scheduler, "
                    "or a scheduler built on an optimizer (it has .step() and "
                    f".optimizer); got {type(scheduler).__name__}"
                ]
            )
        self._factory = None if built else scheduler
        self.scheduler: Any = scheduler if built else None
        #: the run-long optimizer whose group learning rates are the schedule
        self._clock: torch.optim.Optimizer | None = scheduler.optimizer if built else None
        self._clock_base: list[float] = [_initial_lr(g) for g in self._clock.param_groups] if built else []
        self.base_lr: float | None = self._clock_base[0] if built else None
        self._same_groups = built and optimizer is not None and scheduler.optimizer is optimizer

    @property
    def plateau(self) -> bool:
        """A built scheduler whose ``step`` needs a metric (``ReduceLROnPlateau``): the engine steps it only when
        ``engine.step(lr_kwargs={"metrics": ...})`` gives one; otherwise the caller steps it."""
        return self.scheduler is not None and "metrics" in inspect.signature(self.scheduler.step).parameters

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Record a new phase optimizer's base learning rates (and start the schedule on first use)."""
        for g in optimizer.param_groups:
            g.setdefault("lift_base_lr", g["lr"])
        if self._clock is None:
            self.base_lr = float(optimizer.param_groups[0]["lift_base_lr"])
            self._clock = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=self.base_lr)
            self._clock_base = [self.base_lr]
            if self._factory is not None:
                self.scheduler = self._factory(self._clock)
        self.apply(optimizer)

    @property
    def lr(self) -> float:
        """The learning rate the schedule gives now (for the first parameter group)."""
        return float(self._clock.param_groups[0]["lr"]) if self._clock else float("nan")

    def apply(self, optimizer: torch.optim.Optimizer) -> None:
        """Set the phase optimizer's learning rates from the schedule."""
        if self._clock is None:
            return
        clock = self._clock.param_groups
        own = self._same_groups
        scale = self.lr / self._clock_base[0] if self._clock_base[0] else 1.0
        for g in optimizer.param_groups:
            i = g.get("lift_group")
            if own and i is not None and i < len(clock):
                g["lr"] = clock[i]["lr"]
            else:
                g["lr"] = g["lift_base_lr"] * scale

    def step(self, *args: Any, **kwargs: Any) -> None:
        """Advance the schedule by one optimizer step (arguments go to the wrapped scheduler's ``step``,
        e.g. ``metrics`` for ``ReduceLROnPlateau``)."""
        if self.scheduler is None:
            return
        with warnings.catch_warnings():
            # the clock optimizer is never stepped (the phase optimizers are): torch's order check does not apply
            warnings.filterwarnings(
                "ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`"
            )
            warnings.filterwarnings("ignore", message=r"Seems like `optimizer.step\(\)` has been overridden")
            self.scheduler.step(*args, **kwargs)

    def get_last_lr(self) -> list[float]:
        """The learning rates the schedule gives now: one per group of a built scheduler's optimizer."""
        if self._clock is None:
            return [float("nan")]
        if self._factory is None and self.scheduler is not None:
            return [float(g["lr"]) for g in self._clock.param_groups]
        return [self.lr]

    def __getattr__(self, name: str) -> Any:
        scheduler = self.__dict__.get("scheduler")
        if scheduler is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r} (and no scheduler to ask)")
        return getattr(scheduler, name)

    def state_dict(self) -> dict[str, Any]:
        return {
            "base_lr": self.base_lr,
            "proxy_lr": self.lr if self._clock else None,
            "group_lrs": [g["lr"] for g in self._clock.param_groups] if self._clock else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any], resume_step: int | None = None) -> str:
        """Restore the schedule. When the phase optimizer's base learning rate differs from the saved
        one (``--lr`` changed on resume) and ``resume_step`` is given, the new rate is applied
        instead: the schedule is replayed to ``resume_step`` with it. Returns what changed ("" if nothing)."""
        import math

        if self._clock is None:
            raise RuntimeError("CrossPhaseLRScheduler.load_state_dict before any optimizer was attached")
        old = state.get("base_lr")
        if (
            resume_step is not None
            and isinstance(old, (int, float))
            and self.base_lr
            and not self.plateau
            and not math.isclose(old, self.base_lr, rel_tol=1e-9)
        ):
            for _ in range(resume_step):  # the schedule the new rate describes, at the resumed step
                self.step()
            return (
                f"the learning rate changed from {old:g} to {self.base_lr:g} "
                "since the checkpoint: applied, the schedule continues at "
                f"step {resume_step} as the new rate gives (lr now {self.lr:g}); "
                "the result will differ from an uninterrupted run"
            )
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        lrs = state.get("group_lrs") or ([state["proxy_lr"]] if state.get("proxy_lr") is not None else [])
        for g, lr in zip(self._clock.param_groups, lrs):
            g["lr"] = lr
        return ""


def _initial_lr(group: Mapping[str, Any]) -> float:
    return float(group.get("initial_lr", group["lr"]))


def optimizer_state_elements(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor] | None = None) -> int:
    """Number of tensor elements of optimizer state (moments etc.), optionally only for ``params``."""
    wanted = None if params is None else {id(p) for p in params}
    total = 0
    for p, st in optimizer.state.items():
        if wanted is not None and id(p) not in wanted:
            continue
        total += sum(v.numel() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
    return total
