"""Every place lift_ds reaches past DeepSpeed's public API, in one module, version-checked.

Rebuilding a DeepSpeed engine per phase (LIFT's whole point) meets details DeepSpeed's public API
does not cover. Each workaround below names the detail, why it is needed, and the test in
``tests/distributed/test_compat.py`` that fails if a DeepSpeed release changes it. They were
verified on deepspeed 0.16-0.19 (pyproject.toml caps it below 0.20); :func:`check_version` warns
once when another version is found.

| workaround | private detail |
|---|---|
| :func:`release_engine` | ``engine.destroy()`` leaves ``module_forward_pre_hook`` / ``module_forward_post_hook`` on the module, ``_zero_optimizer`` / ``_z3_optimizer`` on every parameter and ZeRO-3's ``pre_bwd_fn`` / ``post_bwd_fn`` (bound to its coordinator) on every module; the engine sits in reference cycles |
| :func:`skip_model_broadcast` | ``DeepSpeedEngine._broadcast_model`` re-broadcasts the whole model at every build |
| :func:`cheap_zero3_build` | ZeRO-3's optimizer formats ``locals()`` (every parameter's repr) for a disabled log line; ``zero.utils.defragment`` runs ``gc.collect()`` |
| :func:`disable_shm_comm_op` | ``deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"]`` (a ~50 s compile on CPU for an op LIFT never uses) |
| :func:`innermost_optimizer` | the ZeRO optimizer's ``.optimizer`` attribute holds the torch optimizer and its partitioned state |
| :func:`is_zero3_param`, :func:`full_numel` | ZeRO-3 parameter attributes ``ds_id``, ``ds_numel`` |
| :func:`has_fp32_master` | ZeRO parameter attributes ``_hp_mapping`` (ZeRO-1/2, bf16 optimizer) and ``ds_id`` (ZeRO-3) |
| :func:`zero_step_and_keys` | where a ZeRO optimizer's base optimizer keeps its state and step (flat partitions; ZeRO-3's ``fp32_partitioned_groups_flat``; state or parameter group) |
| :func:`materialize_zero_state` | creating a fresh ZeRO optimizer's flat state and linking it (``_lazy_init_hp_params_optimizer_state``) |
| :func:`relink_zero_state` | ZeRO-1/2 before DeepSpeed 0.19 link the fragments of every parameter group after the first group's step, so later groups' fragments stay empty (``_hp_optimizer_states_linked``); tested against 0.18.9 by tests/distributed/test_axolotl.py (axolotl's venv) |
| :func:`installed_op` | ``deepspeed.git_version_info.installed_ops`` |
| :func:`zero_reduce_bucket_size` | ``optimizer.reduce_bucket_size`` (read by the leak test) |
| :func:`aten_linear` | ``deepspeed.zero.Init`` (``mem_efficient_linear``, on by default) replaces ``torch.nn.functional.linear`` with its ``zero3_linear_wrap`` for the rest of the process; Q-LIFT's dequantized chunks call aten's linear instead |
| :func:`forget_process_groups` | ZeRO-3 parameters keep their process group in ``ds_process_group`` (dropped at exit) |
| :class:`~lift_ds.backends.compat_zero3.Zero3OffloadKeeper` | ZeRO-3's optimizer builds its model-wide ``DeepSpeedZeRoOffload`` (parameter coordinator, hooks on every module) in ``initialize_ds_offload``, called with keywords, and removes it in ``destroy``; the coordinator's ``_invalidate_trace`` |
"""  # noqa: E501 (a Markdown table: its rows cannot wrap)

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..utils import get_logger

logger = get_logger(__name__)

#: DeepSpeed versions on which every workaround here was verified: [lowest, first unverified)
VERIFIED = ((0, 16), (0, 20))
_PARAM_BACKREFS = ("_zero_optimizer", "_z3_optimizer")
_ENGINE_HOOKS = ("module_forward_pre_hook", "module_forward_post_hook")
#: ZeRO-3 caches these autograd Functions in each module's ``__dict__`` at its first registration; their
#: closures call the parameter coordinator of the engine that made them
_ZERO3_MODULE_FUNCTIONS = ("pre_bwd_fn", "post_bwd_fn")
_warned = False


def deepspeed_version() -> tuple[int, int]:
    import deepspeed

    major, minor = deepspeed.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def check_version() -> bool:
    """True when the installed DeepSpeed is in :data:`VERIFIED`; otherwise warn once."""
    global _warned
    ok = VERIFIED[0] <= deepspeed_version() < VERIFIED[1]
    if not ok and not _warned:
        import deepspeed

        _warned = True
        logger.warning(
            "deepspeed %s is outside the versions lift_ds's workarounds were verified on (%d.%d <= v < %d.%d); "
            "run tests/distributed/test_compat.py against it",
            deepspeed.__version__,
            *VERIFIED[0],
            *VERIFIED[1],
        )
    return ok


def release_engine(engine: Any, model: nn.Module, keep_module_functions: bool = False) -> None:
    """Destroy a DeepSpeed engine so that nothing keeps it, its optimizer or their tensors alive.

    ``engine.destroy()`` leaves the engine's own forward pre/post hooks on the module and a
    back-reference to the ZeRO optimizer on each parameter; both are removed. The engine and its
    ZeRO optimizer sit in reference cycles (lambdas and bound methods in their own attributes)
    that only a full ``gc.collect()`` frees (0.2 s with transformers loaded, 80% of a ZeRO-2
    switch); emptying their attribute dicts frees every tensor they hold at once (optimizer state,
    fp32 master, buffers). An empty shell may wait in a cycle for Python's collector, holding no
    tensor.

    ZeRO-3 also leaves, in each module's ``__dict__``, the pre-/post-backward autograd Functions its
    first engine registered (``pre_bwd_fn``, ``post_bwd_fn``; a later engine reuses them when it finds
    them). Their closures call that first engine's parameter coordinator, so under every later engine
    the backward fetches went to a dead coordinator: the live one never learnt which module's backward
    was running, and in a non-reentrant activation-checkpoint recompute it partitioned the frozen
    parameters the recompute had just gathered (``CheckpointError``: recomputed shape [0], saved
    [128]); the old coordinator stayed alive too. They are removed, so each engine registers its own,
    unless ``keep_module_functions``: the parameter offload (coordinator and hooks) outlives the engine
    (:class:`~lift_ds.backends.compat_zero3.Zero3OffloadKeeper`), so its Functions stay right.
    """
    engine.destroy()
    if not keep_module_functions:
        drop_zero3_module_functions(model)
    for attr in _ENGINE_HOOKS:
        handle = getattr(engine, attr, None)
        if handle is not None:
            handle.remove()
            setattr(engine, attr, None)
    for p in model.parameters():
        for attr in _PARAM_BACKREFS:
            if hasattr(p, attr):
                delattr(p, attr)
        p.grad = None
    for obj in (innermost_optimizer(engine.optimizer), engine.optimizer, engine):
        if obj is not None and hasattr(obj, "__dict__"):
            obj.__dict__.clear()


def drop_zero3_module_functions(model: nn.Module) -> None:
    """Remove the ZeRO-3 backward Functions cached in each module's ``__dict__`` (see :func:`release_engine`)."""
    for module in model.modules():
        for attr in _ZERO3_MODULE_FUNCTIONS:
            module.__dict__.pop(attr, None)


@contextlib.contextmanager
def skip_model_broadcast(skip: bool) -> Iterator[None]:
    """Skip ``DeepSpeedEngine._broadcast_model`` (every rank already holds the same weights after
    the first phase) while an engine is built, when ``skip``."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = getattr(DeepSpeedEngine, "_broadcast_model", None)
    if not skip or original is None:
        yield
        return
    DeepSpeedEngine._broadcast_model = lambda self: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        DeepSpeedEngine._broadcast_model = original  # type: ignore[method-assign]


@contextlib.contextmanager
def cheap_zero3_build(active: bool) -> Iterator[None]:
    """Skip two costs a ZeRO-3 engine build pays for nothing, once per LIFT phase.

    ``DeepSpeedZeroOptimizer_Stage3.__init__`` formats ``locals()`` for a log line that is off by
    default (a tensor repr of every parameter: 0.5 s for SmolLM2 on one rank), and
    ``zero.utils.defragment`` runs a full ``gc.collect()`` (0.5 s with transformers loaded) whose
    storages reference counting has already freed. While the engine is built, parameter reprs are
    short and that collection is skipped; both are restored after.
    """
    if not active:
        yield
        return
    repr_ = torch.nn.Parameter.__repr__
    holders = zero3_gc_holders()  # the defragmenting code: zero.utils from 0.19, stage3 itself before
    saved = [(m, m.gc) for m in holders]
    torch.nn.Parameter.__repr__ = lambda self: f"Parameter(shape={tuple(self.shape)}, dtype={self.dtype})"  # type: ignore[method-assign]
    for m in holders:
        m.gc = types.SimpleNamespace(collect=lambda *a, **k: 0)
    try:
        yield
    finally:
        torch.nn.Parameter.__repr__ = repr_  # type: ignore[method-assign]
        for m, gc_ in saved:
            m.gc = gc_


def zero3_gc_holders() -> list[Any]:
    """The DeepSpeed modules whose ``gc`` a ZeRO-3 build calls: ``zero.utils`` (its ``defragment``,
    DeepSpeed 0.19) and ``zero.stage3`` (which defragments in place before 0.19)."""
    import deepspeed.runtime.zero.stage3 as stage3
    import deepspeed.runtime.zero.utils as zero_utils

    return [m for m in (zero_utils, stage3) if hasattr(m, "gc")]


def disable_shm_comm_op() -> None:
    """Mark ``deepspeed_shm_comm`` incompatible: on CPU ``init_distributed`` would compile it (about
    50 s) for inference all-reduce, which LIFT never runs."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def innermost_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrappers (it holds the partitioned state)."""
    seen = 0
    while hasattr(opt, "optimizer") and not isinstance(opt, torch.optim.Optimizer) and seen < 5:
        opt = opt.optimizer
        seen += 1
    return opt


def is_zero3_param(p: torch.Tensor) -> bool:
    """A parameter partitioned by ZeRO-3 (``zero.Init`` or a ZeRO-3 engine)."""
    return hasattr(p, "ds_id")


def full_numel(p: torch.Tensor) -> int:
    """Elements of the parameter's full value (ZeRO-3 partitions hold ``ds_numel``; ``numel()`` is 0)."""
    return int(getattr(p, "ds_numel", p.numel()))


def has_fp32_master(params: list[torch.Tensor]) -> bool:
    """Whether DeepSpeed keeps an fp32 master behind these parameters (ZeRO-1/2 and the bf16
    optimizer link one through ``_hp_mapping``, ZeRO-3 partitions carry ``ds_id``); ZeRO-0 in fp32
    trains the parameters themselves with the client optimizer."""
    return any(hasattr(p, "_hp_mapping") or hasattr(p, "ds_id") for p in params)


def zero_step_and_keys(opt: Any) -> tuple[float | None, list[str]]:
    """``(step, state keys)`` of a ZeRO optimizer's base optimizer (``(None, [])`` before its first
    step). The step lives in each flat partition's state (torch optimizers, DeepSpeedCPUAdam) or in
    the parameter group (FusedAdam)."""
    inner = innermost_optimizer(opt)
    for group, flat in _flat_partitions(opt):
        st = inner.state.get(flat)
        if st:
            step = st.get("step", group.get("step"))
            keys = sorted(k for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0)
            return (None if step is None else float(step)), keys
    return None, []


def _flat_partitions(opt: Any) -> list[tuple[dict, torch.Tensor]]:
    """``(base-optimizer param group, flat fp32 partition)`` pairs whose state the base optimizer
    keeps. ZeRO-3 empties the groups' params outside its step and keys the state by
    ``fp32_partitioned_groups_flat`` (one per sub-group)."""
    inner = innermost_optimizer(opt)
    if hasattr(opt, "fp32_partitioned_groups_flat"):
        return [(inner.param_groups[0], flat) for flat in opt.fp32_partitioned_groups_flat]
    return [(group, flat) for group in inner.param_groups for flat in group["params"]]


def materialize_zero_state(opt: Any, keys: list[str], step: float | None) -> None:
    """Create a fresh ZeRO optimizer's base-optimizer state (zeros, the given step) so that
    ``safe_set_full_optimizer_state`` has somewhere to write: torch optimizers create it lazily at
    the first step. ZeRO-1/2 and the bf16 optimizer then link their per-parameter fragments to it
    (``_lazy_init_hp_params_optimizer_state``, which they otherwise run after their first step);
    ZeRO-3 reads the flat state directly."""
    inner = innermost_optimizer(opt)
    for group, flat in _flat_partitions(opt):
        st = inner.state[flat]
        for k in keys:
            if k not in st:
                st[k] = torch.zeros_like(flat)
        if step is not None:
            if "step" in group and "step" not in st:  # FusedAdam counts per group
                group["step"] = int(step)
            else:
                old = st.get("step")
                st["step"] = (
                    int(step)
                    if isinstance(old, int)
                    else torch.tensor(
                        float(step), dtype=torch.float32, device=old.device if torch.is_tensor(old) else "cpu"
                    )
                )
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2, bf16 optimizer: link the new state
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def relink_zero_state(opt: Any) -> None:
    """Link every parameter's optimizer-state fragments to the flat state again, so that
    ``safe_get_full_optimizer_state`` sees all of it. DeepSpeed < 0.19's ZeRO-1/2 link once, after
    the *first* parameter group's step, when the other groups have no state yet: with two groups (a
    Trainer's decay / no-decay split) the second group's fragments stay empty and reading them fails
    ("exp_avg not found in optimizer state fragment"). Idempotent; a no-op before the first step and
    for optimizers without per-parameter fragments (ZeRO-3, ZeRO-0)."""
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state") and getattr(opt, "_hp_optimizer_states_linked", False):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def installed_op(name: str) -> bool | None:
    """Whether DeepSpeed was installed with op ``name`` (``cpu_adam``, ``fused_adam``) pre-built
    (None: DeepSpeed is not installed)."""
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        return None
    return bool(installed_ops.get(name))


def zero_reduce_bucket_size(engine: Any) -> int:
    """The reduce bucket (elements) a ZeRO optimizer allocated."""
    return int(engine.optimizer.reduce_bucket_size)


#: what a dynamic loss scaler changes as it runs (the rest comes from the fp16 config)
LOSS_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def _dynamic_scaler(optimizer: Any) -> Any:
    """The object holding a DeepSpeed 0.19 optimizer's dynamic loss scale: a ZeRO-1/2/3 optimizer's
    ``loss_scaler`` (DynamicLossScaler), or the ZeRO-0 FP16 optimizers' ``loss_scale_config``;
    None for a static scale, bf16/fp32, or an optimizer without either."""
    scaler = getattr(optimizer, "loss_scaler", None)
    if scaler is not None:
        return scaler if getattr(scaler, "dynamic", False) else None
    config = getattr(optimizer, "loss_scale_config", None)
    return config if getattr(config, "dynamic_loss_scale", False) else None


def loss_scaler_state(optimizer: Any) -> dict[str, Any] | None:
    """The running state of ``optimizer``'s dynamic loss scaler (None where it has none)."""
    scaler = _dynamic_scaler(optimizer)
    if scaler is None:
        return None
    return {k: _plain(getattr(scaler, k)) for k in LOSS_SCALER_FIELDS if hasattr(scaler, k)}


def set_loss_scaler_state(optimizer: Any, state: dict[str, Any]) -> bool:
    """Put ``state`` (from :func:`loss_scaler_state`) into a new optimizer's dynamic loss scaler;
    False when it has none."""
    scaler = _dynamic_scaler(optimizer)
    if scaler is None:
        return False
    for k, v in state.items():
        if k in LOSS_SCALER_FIELDS and hasattr(scaler, k):
            setattr(scaler, k, v)
    return True


def _plain(v: Any) -> Any:
    return v.item() if torch.is_tensor(v) else v


#: DeepSpeedEngine attributes set in ``__init__`` (not on the class) that loops read
ENGINE_INSTANCE_ATTRIBUTES = frozenset(
    {
        "global_rank",
        "local_rank",
        "world_size",
        "dp_world_size",
        "mp_world_size",
        "global_steps",
        "global_samples",
        "micro_steps",
        "skipped_steps",
        "tput_timer",
        "monitor",
        "lr_scheduler",
        "optimizer",
        "basic_optimizer",
        "client_optimizer",
        "client_lr_scheduler",
        "training_dataloader",
        "module",
        "mpu",
        "losses",
        "timers",
        "device",
        "config",
        "gradient_average",
        "warn_unscaled_loss",
        "data_parallel_group",
        "seq_data_parallel_group",
        "sequence_parallel_size",
        "pipeline_parallelism",
        "dist_backend",
        "checkpoint_engine",
        "flops_profiler",
        "summary_events",
        "param_names",
        "has_moe_layers",
        "num_experts",
        "inside_no_sync_ctxt",
    }
)
#: top-level config sections that make a DeepSpeedEngine open monitor writers
MONITOR_SECTIONS = ("tensorboard", "wandb", "csv_monitor", "comet")


def is_deepspeed_engine_member(name: str) -> bool:
    """A public member of ``DeepSpeedEngine`` (a class attribute, or one its ``__init__`` sets)."""
    if name.startswith("__"):
        return False
    from deepspeed.runtime.engine import DeepSpeedEngine

    return name in ENGINE_INSTANCE_ATTRIBUTES or (hasattr(DeepSpeedEngine, name) and not hasattr(torch.nn.Module, name))


def run_monitor(raw: dict[str, Any]) -> Any:
    """One DeepSpeed ``MonitorMaster`` for the whole run from the config's monitor sections (each phase's
    engine is built without them: its writers would restart their sample counts at every phase)."""
    from deepspeed.monitor.config import get_monitor_config
    from deepspeed.monitor.monitor import MonitorMaster

    return MonitorMaster(get_monitor_config(raw))


def aten_linear() -> Any:
    """aten's linear (``torch._C._nn.linear``): ``torch.nn.functional.linear`` unless something replaced
    it. ``deepspeed.zero.Init`` swaps ``F.linear`` for ``zero3_linear_wrap`` (an autograd Function that
    keeps its weight for the backward) and leaves it so; a frozen layer's dequantized chunk, used once
    and freed, must not go through it."""
    return torch._C._nn.linear


def forget_process_groups(models: list[nn.Module]) -> None:
    """At exit: drop the process group that ZeRO-3 parameters and the ``zero.Init`` that converted them keep
    (``ds_process_group``); it would keep the group, and its worker threads, alive into the interpreter's teardown."""
    import gc

    from deepspeed.runtime.zero.partition_parameters import Init

    for model in models:
        for p in model.parameters():
            if getattr(p, "ds_process_group", None) is not None:
                p.ds_process_group = None
    for o in gc.get_objects():
        if isinstance(o, Init) and getattr(o, "ds_process_group", None) is not None:
            o.ds_process_group = None
