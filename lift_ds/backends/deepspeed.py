"""DeepSpeed backend: a new DeepSpeed engine over the active block at every phase.

At each phase boundary the old engine is torn down completely and ``deepspeed.initialize`` builds a
new one on the same model with ``model_parameters`` = the active block's parameters, so ZeRO
partitions, gradient buffers and optimizer state (fp32 master weights, moments) cover that block
only. ZeRO-1/2/3, fp32/bf16/fp16, optimizer offload, and models built under ``deepspeed.zero.Init``.

Private DeepSpeed details are touched in exactly two places, both below, and the version range in
pyproject.toml is pinned for them: :func:`release_engine` (deepspeed 0.19's ``destroy()`` leaves
the engine's forward hooks and per-parameter back-references alive) and
:func:`_skip_model_broadcast` (every new engine re-broadcasts the whole model from rank 0, which
is redundant after the first phase: all ranks already hold identical weights).
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..config import ConfigError, TrainingConfig, is_comment_key
from ..optim import OptimizerFactory, optimizer_factory_from_section
from ..utils import get_logger, init_process_group
from .base import Backend

logger = get_logger(__name__)

_PARAM_BACKREFS = ("_zero_optimizer", "_z3_optimizer")
_ENGINE_HOOKS = ("module_forward_pre_hook", "module_forward_post_hook")


def release_engine(engine: Any, model: nn.Module) -> None:
    """Destroy a DeepSpeed engine so that nothing keeps it (or its optimizer) alive.

    ``engine.destroy()`` in deepspeed 0.19 leaves the engine's own forward pre/post hooks on the
    module and a back-reference to the ZeRO optimizer on each parameter; both are removed here.
    """
    engine.destroy()
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


@contextlib.contextmanager
def _skip_model_broadcast(skip: bool) -> Iterator[None]:
    """Skip DeepSpeedEngine's start-up broadcast of every parameter from rank 0 (when ``skip``)."""
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
def _cheap_zero3_build(active: bool) -> Iterator[None]:
    """Skip two costs a ZeRO-3 engine build pays for nothing, once per LIFT phase.

    In deepspeed 0.19, ``DeepSpeedZeroOptimizer_Stage3.__init__`` formats ``locals()`` for a log line
    that is off by default (a tensor repr of every model parameter: 0.5 s for SmolLM2 on one rank),
    and ``zero.utils.defragment`` runs a full ``gc.collect()`` (0.5 s with transformers loaded) after
    moving the partitions, whose old storages reference counting has already freed. While the engine
    is built, parameter reprs are short and that collection is skipped; both are restored after.
    """
    if not active:
        yield
        return
    import types

    import deepspeed.runtime.zero.utils as zero_utils

    repr_ = torch.nn.Parameter.__repr__
    gc_ = zero_utils.gc
    torch.nn.Parameter.__repr__ = lambda self: f"Parameter(shape={tuple(self.shape)}, dtype={self.dtype})"  # type: ignore[method-assign]
    zero_utils.gc = types.SimpleNamespace(collect=lambda *a, **k: 0)
    try:
        yield
    finally:
        torch.nn.Parameter.__repr__ = repr_  # type: ignore[method-assign]
        zero_utils.gc = gc_


def innermost_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrappers (it holds the partitioned state)."""
    seen = 0
    while hasattr(opt, "optimizer") and not isinstance(opt, torch.optim.Optimizer) and seen < 5:
        opt = opt.optimizer
        seen += 1
    return opt


def is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


class DeepSpeedBackend(Backend):
    """Rebuilds a DeepSpeed engine for the active block at every phase (see module docstring)."""

    name = "deepspeed"

    def __init__(
        self,
        model: nn.Module,
        training: TrainingConfig,
        raw_config: dict[str, Any],
        optimizer_factory: OptimizerFactory | None,
        mpu: Any = None,
        dist_init_required: bool | None = None,
    ) -> None:
        super().__init__(model, training, raw_config, optimizer_factory)
        import deepspeed
        import torch.distributed as dist
        from deepspeed.accelerator import get_accelerator

        self._ds = deepspeed
        self.mpu = mpu
        zero = raw_config.get("zero_optimization", {}) or {}
        offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
        if optimizer_factory is None and training.optimizer is not None and not offload and get_accelerator().device_name() == "cpu":
            # On CPU DeepSpeed would compile FusedAdam (about a minute); torch's optimizer is the same math.
            optimizer_factory = optimizer_factory_from_section(training.optimizer)
            self.optimizer_factory = optimizer_factory
            logger.info("CPU accelerator: the config's %s optimizer runs as torch.optim (no op to compile)", training.optimizer["type"])
        self.ds_config = self.deepspeed_config(raw_config, training, client_optimizer=optimizer_factory is not None)
        if self.ds_config.get("optimizer") is None and optimizer_factory is None:
            raise ConfigError(["optimizer: none given; pass optimizer= a callable params -> Optimizer, or add an \"optimizer\" section"])
        self.zero_stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        if get_accelerator().device_name() == "cpu":
            # deepspeed_shm_comm only serves inference all-reduce and costs a ~50 s compile on CPU.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if not dist.is_initialized() and dist_init_required is not False:
            init_process_group(get_accelerator().communication_backend_name())
            deepspeed.init_distributed()  # DeepSpeed's comm layer over the group just made
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self._engine: Any = None
        self._params: list[nn.Parameter] = []
        self._built_once = False
        self._offload = offload

    def memory_layout(self) -> tuple[int, bool]:
        return self.zero_stage, self._offload

    # ----------------------------------------------------------------- config

    @staticmethod
    def deepspeed_config(raw: dict[str, Any], training: TrainingConfig, client_optimizer: bool) -> dict[str, Any]:
        """The config handed to ``deepspeed.initialize``: LIFT's section and the scheduler removed
        (LIFT drives the learning rate across phases), ``"auto"`` batch sizes filled in, and
        ``gradient_clipping`` always explicit."""
        cfg = {k: v for k, v in copy.deepcopy(raw).items() if not is_comment_key(k)}
        cfg.pop("lift", None)
        cfg.pop("scheduler", None)
        cfg["train_micro_batch_size_per_gpu"] = training.micro_batch_size
        cfg["gradient_accumulation_steps"] = training.gradient_accumulation_steps
        cfg["train_batch_size"] = training.train_batch_size
        cfg["gradient_clipping"] = training.gradient_clipping
        if client_optimizer:
            cfg.pop("optimizer", None)
            cfg.setdefault("zero_allow_untested_optimizer", True)
        return cfg

    # ----------------------------------------------------------------- phases

    @property
    def engine(self) -> Any:
        """The current DeepSpeed engine (None between phases)."""
        return self._engine

    @property
    def optimizer(self) -> Any:
        return None if self._engine is None else self._engine.optimizer

    def phase_config(self, params: list[nn.Parameter]) -> dict[str, Any]:
        """The DeepSpeed config for one phase: communication buckets no larger than the active block.

        ZeRO allocates its reduce (and, for ZeRO-1/2, all-gather) buckets up front, 5e8 elements by
        default: sized for a whole model, mostly empty for one block (1 GB of bf16 per rank for a
        135M-parameter model's layer). A bucket holding the whole block reduces it in one go, so
        capping the bucket at the block's size changes no arithmetic.
        """
        if self.zero_stage < 1:
            return self.ds_config
        numel = max(1, sum(int(getattr(p, "ds_numel", p.numel())) for p in params))
        cfg = dict(self.ds_config)
        zero = dict(cfg.get("zero_optimization", {}))
        keys = ("reduce_bucket_size",) if self.zero_stage == 3 else ("reduce_bucket_size", "allgather_bucket_size")
        for key in keys:
            value = zero.get(key, 5e8)
            zero[key] = min(int(float(value)) if isinstance(value, (int, float)) else int(5e8), numel)
        cfg["zero_optimization"] = zero
        return cfg

    def build(self, params: list[nn.Parameter]) -> None:
        opt = self.optimizer_factory(params) if self.optimizer_factory is not None else None
        skip = self._built_once and self.zero_stage < 3
        with _skip_model_broadcast(skip), _cheap_zero3_build(self.zero_stage == 3):
            engine, _, _, _ = self._ds.initialize(
                model=self.model, model_parameters=params, optimizer=opt, config=self.phase_config(params),
                mpu=self.mpu, dist_init_required=False,
            )
        self._engine = engine
        self._params = params
        self._built_once = True

    def teardown(self) -> None:
        if self._engine is None:
            return
        engine, self._engine = self._engine, None
        release_engine(engine, self.model)
        # The engine and its ZeRO optimizer sit in reference cycles (lambdas and bound methods in
        # their own attributes), which only a full gc.collect() frees: 0.2 s with transformers
        # loaded, 80% of a ZeRO-2 phase switch. Emptying their attribute dicts frees every tensor
        # they hold at once (optimizer state, fp32 master, buffers); with bf16 an empty engine
        # shell can stay in a cycle through a closure until Python's own collector runs, holding
        # no tensor (checked by live-tensor census in tests/distributed, leak scenario).
        for obj in (innermost_optimizer(engine.optimizer), engine.optimizer, engine):
            if obj is not None and hasattr(obj, "__dict__"):
                obj.__dict__.clear()
        del engine
        self._params = []

    # ----------------------------------------------------------------- training

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._engine is None:
            with torch.no_grad():
                return self.model(*args, **kwargs)
        return self._engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self._engine.backward(loss)

    def step(self, boundary: bool) -> float | None:
        self._engine.step()
        if boundary:
            # ZeRO skips a step whose global gradient norm is NaN/inf (and fp16 overflows) itself
            self.step_applied = bool(self._engine.was_step_applied())
            norm = self._engine.get_global_grad_norm()
            return None if norm is None else float(norm)
        return None

    def discard_gradients(self) -> None:
        # The window's gradients are NaN (the engine poisons a non-finite loss): ZeRO's own overflow
        # check skips the update and clears them, and its step also ends the ZeRO-3 iteration.
        self._engine.step()
        if self._engine.was_step_applied():
            raise RuntimeError(
                "DeepSpeed applied an update from NaN/inf gradients (its overflow check is off: "
                "zero_optimization.compute_grad_norm is false?); the weights may now be NaN. Resume from the last checkpoint"
            )

    @property
    def comm_device(self) -> torch.device:
        from deepspeed.accelerator import get_accelerator

        return torch.device(get_accelerator().current_device_name())

    def optimizer_state_numel(self) -> int:
        """Elements of optimizer state this rank holds (moments; fp32 master partitions not counted)."""
        if self._engine is None:
            return 0
        inner = innermost_optimizer(self._engine.optimizer)
        return sum(v.numel() for st in inner.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)

    # ----------------------------------------------------------------- collectives

    def barrier(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()

    @contextlib.contextmanager
    def gathered(self, params: list[nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
        """Full values of ZeRO-3 partitioned ``params`` inside the block (collective)."""
        z3 = [p for p in params if is_zero3_param(p)]
        if not z3:
            yield
            return
        with self._ds.zero.GatheredParameters(z3, modifier_rank=modifier_rank):
            yield

    def named_full_params(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, full value on CPU)`` for each name; collective under ZeRO-3 (one at a time)."""
        named = dict(self.model.named_parameters())
        for n in names:
            p = named[n]
            with self.gathered([p]):
                yield n, p.detach().to("cpu", copy=True)

    def gathered_state_dict(self) -> dict[str, torch.Tensor]:
        names = [n for n, _ in self.model.named_parameters()]
        out = {}
        for n, t in self.named_full_params(names):
            if self.rank == 0:
                out[n] = t
        return out

    # ----------------------------------------------------------------- checkpoints

    def save_weights(self, path: Path, param_names: list[str]) -> None:
        from safetensors.torch import save_file

        values = {}
        for n, t in self.named_full_params(param_names):
            if self.rank == 0:
                values[n] = t.contiguous()
        if self.rank == 0:
            save_file(values, str(path / "weights.safetensors"))

    def load_weights(self, path: Path) -> list[str]:
        from safetensors import safe_open

        named = dict(self.model.named_parameters())
        with safe_open(str(path / "weights.safetensors"), framework="pt") as f:
            names = list(f.keys())
            for n in names:
                p = named[n]
                with self.gathered([p], modifier_rank=0), torch.no_grad():
                    if self.rank == 0 or not is_zero3_param(p):
                        p.data.copy_(f.get_tensor(n).to(p.dtype))
        return names

    def save_optimizer(self, path: Path) -> None:
        self._engine.save_checkpoint(str(path / "deepspeed"), tag="phase", save_latest=False, exclude_frozen_parameters=True)

    def load_optimizer(self, path: Path) -> None:
        loaded, _ = self._engine.load_checkpoint(
            str(path / "deepspeed"), tag="phase", load_module_strict=False, load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed optimizer state under {path / 'deepspeed'}")

    def stash_optimizer_state(self) -> Any:
        sd = self._engine.optimizer.state_dict()
        return _to_cpu(sd)

    def restore_optimizer_state(self, state: Any) -> None:
        opt = self._engine.optimizer
        if self.zero_stage == 0:
            opt.load_state_dict(state)
            return
        # ZeRO optimizers take one state per rank and pick their own: same block, same ranks, same
        # partitioning. The fp32 master partitions are restored too, then copied into the params.
        per_rank: list[Any] = [None] * self.world_size
        per_rank[self.rank] = state
        opt.load_state_dict(per_rank, load_optimizer_states=True, load_from_fp32_weights=True)


def _to_cpu(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
