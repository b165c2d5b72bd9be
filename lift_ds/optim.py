"""Optimizers built per phase, and one learning-rate schedule that runs across all phases.

LIFT builds a new optimizer at every phase boundary, but a learning-rate schedule must not restart
with it. The schedule therefore drives a *proxy* optimizer that lives for the whole run (one dummy
parameter, never stepped); before each optimizer step the phase optimizer's groups get
``their base lr x (proxy lr / proxy base lr)``. Any scheduler works this way: a DeepSpeed
``"scheduler"`` section (through :mod:`lift_ds.backends.lr_schedules`), or a callable ``optimizer -> LRScheduler`` such as a Hugging Face
``get_cosine_schedule_with_warmup`` partial. A scheduler already built on the caller's optimizer
drives that optimizer instead, group by group. Its state is one ``state_dict`` for checkpoints.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, Iterable, Mapping

import torch

from .config import ConfigError

OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]

_DS_ONLY_KEYS = {"torch_adam", "adam_w_mode", "fused", "bias_correction"}
#: numeric optimizer parameters: (must be >= this, strictly greater)
_NUMERIC = {"lr": (0.0, True), "eps": (0.0, False), "weight_decay": (0.0, False), "momentum": (0.0, False), "dampening": (0.0, False)}
#: words in torch's argument errors -> the parameter they are about
_ERROR_KEYS = (("learning rate", "lr"), ("epsilon", "eps"), ("beta", "betas"), ("weight_decay", "weight_decay"), ("nesterov", "nesterov"),
               ("momentum", "momentum"), ("dampening", "dampening"), ("amsgrad", "amsgrad"), ("maximize", "maximize"))


def _section_value_problems(params: Mapping[str, Any]) -> list[str]:
    """Types and ranges torch's constructors leave to fail later (or to train wrong)."""
    problems = []
    for key, (lo, strict) in _NUMERIC.items():
        v = params.get(key)
        if v is None or v == "auto":
            continue
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not (v > lo if strict else v >= lo):
            problems.append(f"optimizer.params.{key}: must be a finite number {'>' if strict else '>='} {lo:g}, got {v!r}")
    betas = params.get("betas")
    if betas is not None and betas != "auto":
        ok = isinstance(betas, (list, tuple)) and len(betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)
        if not ok:
            problems.append(f"optimizer.params.betas: must be a list of two numbers in [0, 1) (beta1, beta2), got {betas!r}")
    for key in ("amsgrad", "maximize", "nesterov", "foreach", "capturable", "differentiable", "fused", "adam_w_mode", "torch_adam"):
        if key in params and params[key] is not None and not isinstance(params[key], bool):
            problems.append(f"optimizer.params.{key}: must be true or false, got {params[key]!r}")
    if params.get("bias_correction", True) is not True:
        problems.append("optimizer.params.bias_correction: false is DeepSpeed's FusedAdam only; torch's Adam/AdamW always correct the bias "
                        "(remove the key)")
    return problems


#: optimizer-group keys that say how a step is computed, not what it computes (and the rate, which may change)
_IMPLEMENTATION_KEYS = {"params", "lr", "initial_lr", "lift_base_lr", "foreach", "fused", "capturable", "differentiable", "step"}


def describe_optimizer(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimizer's class and first group's hyperparameters (not its rate): part of a run's fingerprint."""
    group = opt.param_groups[0]
    out: dict[str, Any] = {"type": type(opt).__name__}
    for k, v in sorted(group.items()):
        if k not in _IMPLEMENTATION_KEYS and isinstance(v, (int, float, str, bool, tuple, list, type(None))):
            out[k] = list(v) if isinstance(v, tuple) else v
    return out


def probe_optimizer(factory: "OptimizerFactory", where: str = "optimizer", params: Mapping[str, Any] | None = None,
                    param: torch.nn.Parameter | None = None, keep: bool = False) -> Any:
    """Build the optimizer once, so its own argument checks are problems now, named
    ``where.<param>`` for a config section, instead of errors after the process group started; its
    groups' hyperparameters must be finite, and an Adam-style ``eps`` above 0 (with 0, a parameter
    whose gradient is 0, e.g. an unused embedding row, becomes NaN). Nothing is stepped.

    It runs on a dummy parameter, or on ``param`` (a model's parameter, for factories that look
    their parameters up by name). Returns the problems, or with ``keep`` ``(problems, the optimizer
    or None)``. No process group; milliseconds."""
    import math

    p = param if param is not None else torch.nn.Parameter(torch.ones(2))
    try:
        opt = factory([p])
    except Exception as e:  # noqa: BLE001 - any error of the optimizer is a config problem here
        text = str(e).lower()
        key = next((k for word, k in _ERROR_KEYS if word in text), None) if params is not None else None
        path = f"{where}.{key}" if key else where
        got = f" (got {params[key]!r})" if key and params is not None and key in params else ""
        problems = [f"{path}: the optimizer refuses it: {type(e).__name__}: {e}{got}"]
        return (problems, None) if keep else problems
    if not isinstance(opt, torch.optim.Optimizer):
        problems = [f"{where}: the factory returned {type(opt).__name__}, not a torch.optim.Optimizer"]
        return (problems, None) if keep else problems
    problems = []
    for i, group in enumerate(opt.param_groups):
        for k, v in group.items():
            values = v if isinstance(v, (tuple, list)) and k != "params" else [v]
            if k != "params" and any(isinstance(x, float) and not math.isfinite(x) for x in values):
                problems.append(f"{where}: parameter group {i} has {k} = {v!r}; it must be finite")
        if "betas" in group and group.get("eps") == 0:
            problems.append(f"{where}{'.eps' if params is not None else ''}: eps 0 turns a zero gradient (e.g. an embedding row no batch "
                            "used) into NaN in Adam's update; use a small positive eps such as 1e-8")
    return (problems, opt) if keep else problems


def probe_scheduler(factory: "SchedulerFactory", base_lr: float, total_steps: int | None, where: str = "lr_scheduler") -> list[str]:
    """Build the schedule on a dummy optimizer and run it over the plan's steps (at most 2,000): an
    error, or a learning rate that is negative or not finite, is a problem now."""
    import math
    import warnings

    proxy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sched = factory(proxy)
            for k in range(min(total_steps or 100, 2000)):
                lr = float(proxy.param_groups[0]["lr"])
                if not math.isfinite(lr) or lr < 0:
                    return [f"{where}: the schedule gives a learning rate of {lr} at step {k}; it must be a finite number >= 0"]
                proxy.step()
                sched.step()
    except Exception as e:  # noqa: BLE001
        return [f"{where}: building or stepping the schedule failed: {type(e).__name__}: {e}"]
    return []


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
    problems = _section_value_problems(params)
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
    else:
        raise ConfigError([f"optimizer.type: {section.get('type')!r} is not supported by this backend; allowed: Adam, AdamW, SGD (or pass optimizer= a factory)"])
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ConfigError([f"optimizer.params.{k}: not a parameter of {cls.__name__}; allowed: {sorted(allowed)}" for k in unknown])

    kwargs.update(extra or {})

    def factory(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return cls(ps, **kwargs)

    factory.__name__ = f"{cls.__name__}_from_config"
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

    def __init__(self, model: torch.nn.Module, group_of: Mapping[str, int], settings: list[dict[str, Any]], default: int | None = None) -> None:
        self.model, self.group_of, self.settings, self.default = model, dict(group_of), [dict(s) for s in settings], default

    def missing(self, names: Iterable[str]) -> list[str]:
        """The names (of parameters LIFT will train) that belong to no group."""
        return [] if self.default is not None else [n for n in names if n not in self.group_of]

    def __call__(self, params: list[torch.nn.Parameter]) -> list[dict[str, Any]]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        groups: dict[int, list[torch.nn.Parameter]] = {}
        for p in params:
            i = self.group_of.get(names.get(id(p), ""), self.default)
            if i is None:
                raise ConfigError([f"optimizer: parameter {names.get(id(p), '?')!r} is in none of the optimizer's parameter groups"])
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


def resolve_optimizer(optimizer: Any, section: Mapping[str, Any] | None, model: torch.nn.Module | None = None
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
            raise TypeError("resolve_optimizer: an Optimizer instance needs the model (its groups are found by parameter name)")
        cls = type(optimizer)
        allowed = set(inspect.signature(cls.__init__).parameters)
        defaults = {k: v for k, v in optimizer.defaults.items() if k in allowed}
        groups = groups_of_optimizer(optimizer, model)
        if not groups.group_of:
            raise ConfigError([f"optimizer: the {cls.__name__} you passed holds none of the model's parameters; build it over "
                               "model.parameters() (or parameter groups of them), or pass a callable params -> Optimizer"])

        def factory(params: Any) -> torch.optim.Optimizer:
            return cls(params, **defaults)

        factory.__name__ = f"{cls.__name__}_like_the_given_instance"
        return factory, groups
    if callable(optimizer):
        return optimizer, None
    if optimizer is not None:
        raise ConfigError([f"optimizer: must be a callable params -> torch.optim.Optimizer, an Optimizer, or None; got {type(optimizer).__name__}"])
    if section is None:
        raise ConfigError(["optimizer: none given; pass optimizer= a callable params -> torch.optim.Optimizer, or add an \"optimizer\" section to the config"])
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
        if built and not (callable(getattr(scheduler, "step", None)) and isinstance(getattr(scheduler, "optimizer", None), torch.optim.Optimizer)):
            raise ConfigError([
                "lr_scheduler: must be a callable optimizer -> scheduler, or a scheduler built on an optimizer (it has .step() and "
                f".optimizer); got {type(scheduler).__name__}"
            ])
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
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")
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
        if (resume_step is not None and isinstance(old, (int, float)) and self.base_lr and not self.plateau
                and not math.isclose(old, self.base_lr, rel_tol=1e-9)):
            for _ in range(resume_step):  # the schedule the new rate describes, at the resumed step
                self.step()
            return (f"the learning rate changed from {old:g} to {self.base_lr:g} since the checkpoint: applied, the schedule continues at "
                    f"step {resume_step} as the new rate gives (lr now {self.lr:g}); the result will differ from an uninterrupted run")
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
