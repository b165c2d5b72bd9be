"""DeepSpeed backend: a new DeepSpeed engine over the active block at every phase.

At each phase boundary the old engine is torn down completely and ``deepspeed.initialize`` builds a
new one on the same model with ``model_parameters`` = the active block's parameters, so ZeRO
partitions, gradient buffers and optimizer state (fp32 master weights, moments) cover that block
only. ZeRO-1/2/3, fp32/bf16/fp16, optimizer offload, and models built under ``deepspeed.zero.Init``.
Every DeepSpeed private detail this needs is in :mod:`lift_ds.backends.compat`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import LiftConfig, TrainingConfig, is_comment_key
from ..errors import ConfigError, NotUnderLiftError
from ..utils import get_logger
from . import compat, compat_zero3, ds_config_keys
from .base import Backend, BackendContext
from .distributed import init_process_group
from .engine_members import phase_engine_member
from .ops import choose_optimizer
from .state import WEIGHTS_FILE, host_copies_done, load_torch_optimizer_full_state, to_host, torch_optimizer_full_state

logger = get_logger(__name__)

#: optimizer types lift_ds builds as torch.optim on a CPU accelerator (DeepSpeed would compile FusedAdam)
TORCH_OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass(frozen=True)
class DeepSpeedOptions:
    """What the DeepSpeed backend reads of ``zero_optimization`` (everything else passes through)."""

    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False


class DeepSpeedBackend(Backend):
    """Rebuilds a DeepSpeed engine for the active block at every phase (see module docstring)."""

    name = "deepspeed"

    @classmethod
    def check_config(
        cls, lift: LiftConfig, training: TrainingConfig, raw: Mapping[str, Any], world_size: int, baseline: str = "lift"
    ) -> tuple[Any, list[str]]:
        _, problems = super().check_config(lift, training, raw, world_size, baseline)
        problems += cls.foreign_section_problems(raw, cls.name, {"fsdp": "fsdp"})
        zero = raw.get("zero_optimization")
        options = DeepSpeedOptions()
        if zero is not None:
            zero_problems = ds_config_keys.zero_problems(zero, raw)
            problems += zero_problems
            # the rest of the section as DeepSpeed's own model reads it (it
            # would refuse it after the process group started)
            reported = tuple(p.split(":", 1)[0] for p in zero_problems) + (
                ("zero_optimization",) if not isinstance(zero, Mapping) else ()
            )
            problems += ds_config_keys.section_problems(raw, ("zero_optimization",), reported)
            if not zero_problems:
                options = DeepSpeedOptions(
                    int(zero.get("stage", 0)),
                    ds_config_keys.offloaded(zero, "offload_optimizer"),
                    ds_config_keys.offloaded(zero, "offload_param"),
                )
        frozen = lift.frozen_layers_setting()
        if frozen and options.zero_stage == 3:
            problems.append(
                f"{frozen} needs the frozen layers whole on every rank, and ZeRO-3 partitions them; use "
                "zero_optimization.stage 1 or 2 (e.g. ds_configs/zero2.json), "
                'or frozen_weights "full" (not streamed) with ZeRO-3'
            )
        if baseline == "lora" and options.zero_stage == 3:
            problems.append("--baseline lora: use a ZeRO-1/2 config (ZeRO-3 with peft adapters is not supported here)")
        return options, problems

    @classmethod
    def optimizer_section_problems(cls, section: Mapping[str, Any] | None) -> list[str]:
        # DeepSpeed's own optimizers (Lamb, OneBitAdam, ...) are DeepSpeed's to check
        if section is None or str(section.get("type", "")).lower() not in TORCH_OPTIMIZERS:
            return []
        return super().optimizer_section_problems(section)

    @classmethod
    def client_optimizer_problems(cls, raw: Mapping[str, Any], optimizer_class: str) -> list[str]:
        return ds_config_keys.client_offload_problems(raw, optimizer_class)

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        import deepspeed
        import torch.distributed as dist
        from deepspeed.accelerator import get_accelerator

        compat.check_version()
        self._ds = deepspeed
        cfg = ctx.config
        options: DeepSpeedOptions = cfg.backend_options  # checked by load_run_config, the one way to a RunConfig
        self.mpu = ctx.passthrough.get("mpu")
        factory = self.optimizer_factory
        device = get_accelerator().device_name()
        cpu = device == "cpu"
        extra: dict[str, Any] = {}
        if factory is None and self.training.optimizer is not None:
            # DeepSpeed's compiled op where it is pre-built or can be built here, torch's otherwise
            choice = choose_optimizer(self.training.optimizer, device, options.offload_optimizer)
            factory = self.optimizer_factory = choice.factory
            extra = choice.config
            logger.info("%s", choice.message)
        self.ds_config = {
            **self.deepspeed_config(dict(cfg.raw), self.training, client_optimizer=factory is not None),
            **extra,
        }
        if self.ds_config.get("optimizer") is None and factory is None:
            raise ConfigError(
                ['optimizer: none given; pass optimizer= a callable params -> Optimizer, or add an "optimizer" section']
            )
        self.zero_stage = options.zero_stage
        self._offload = options.offload_optimizer
        if cpu:
            compat.disable_shm_comm_op()
        if not dist.is_initialized() and ctx.passthrough.get("dist_init_required") is not False:
            init_process_group(get_accelerator().communication_backend_name())
            deepspeed.init_distributed()  # DeepSpeed's comm layer over the group just made
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self._engine: Any = None
        self._params: list[nn.Parameter] = []
        self._built_once = False
        #: ZeRO-3: one parameter offload (coordinator, module hooks) for the whole run, not one per phase
        self._offload_keeper = compat_zero3.Zero3OffloadKeeper()
        #: fp16: the dynamic loss scaler's state, carried from one phase's optimizer to the next (each
        #: new ZeRO optimizer would start again at 2^initial_scale_power and skip steps to come down)
        self._loss_scaler: dict[str, Any] | None = None
        self._monitor = (
            compat.run_monitor(dict(cfg.raw))
            if any(isinstance(cfg.raw.get(k), Mapping) for k in compat.MONITOR_SECTIONS)
            else None
        )

    def memory_layout(self) -> tuple[int, bool]:
        return self.zero_stage, self._offload

    # ----------------------------------------------------------------- the DeepSpeedEngine surface (lift_ds.facade)

    def library_member(self, name: str) -> Any:
        return phase_engine_member(lambda: self._engine, name)

    def library_member_problem(self, name: str) -> str | None:
        if not compat.is_deepspeed_engine_member(name):
            return None
        return "a member of the phase's DeepSpeed engine, and there is none now (between phases, or after close())"

    def no_sync(self) -> Any:
        if self.zero_stage >= 2:  # DeepSpeed asserts the same
            raise NotUnderLiftError(
                "no_sync: incompatible with the gradient partitioning "
                f"of ZeRO stage {self.zero_stage} (as in DeepSpeed)"
            )
        return self._engine.no_sync() if self._engine is not None else contextlib.nullcontext()

    def monitor(self) -> Any:
        return self._monitor

    def gathers_16bit_on_save(self) -> bool:
        zero = self.ds_config.get("zero_optimization") or {}
        return self.zero_stage < 3 or bool(
            zero.get("stage3_gather_16bit_weights_on_model_save", zero.get("stage3_gather_fp16_weights_on_model_save"))
        )

    @classmethod
    def planned_memory_layout(cls, options: Any) -> tuple[int, bool]:
        return (options.zero_stage, options.offload_optimizer) if isinstance(options, DeepSpeedOptions) else (0, False)

    # ----------------------------------------------------------------- config

    @staticmethod
    def deepspeed_config(raw: dict[str, Any], training: TrainingConfig, client_optimizer: bool) -> dict[str, Any]:
        """The config handed to ``deepspeed.initialize``: LIFT's section and the scheduler removed
        (LIFT drives the learning rate across phases), the monitor sections too (one monitor runs
        for the whole run), ``"auto"`` batch sizes filled in, and ``gradient_clipping`` always explicit."""
        cfg = {k: v for k, v in copy.deepcopy(raw).items() if not is_comment_key(k)}
        cfg.pop("lift", None)
        cfg.pop("scheduler", None)
        for key in compat.MONITOR_SECTIONS:  # one run-long monitor instead (Backend.monitor)
            cfg.pop(key, None)
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
        numel = max(1, sum(compat.full_numel(p) for p in params))
        cfg = dict(self.ds_config)
        zero = dict(cfg.get("zero_optimization", {}))
        keys = ("reduce_bucket_size",) if self.zero_stage == 3 else ("reduce_bucket_size", "allgather_bucket_size")
        for key in keys:
            value = zero.get(key, 5e8)
            zero[key] = min(int(float(value)) if isinstance(value, (int, float)) else int(5e8), numel)
        cfg["zero_optimization"] = zero
        return cfg

    def build(self, params: list[nn.Parameter]) -> None:
        # parameter groups (their own weight decay, lr, ...) reach the
        # client optimizer, or DeepSpeed's own build of the config's
        inputs = self.param_groups(params) if self.param_groups is not None else params
        opt = self.optimizer_factory(inputs) if self.optimizer_factory is not None else None
        skip = self._built_once and self.zero_stage < 3
        z3 = self.zero_stage == 3
        with compat.skip_model_broadcast(skip), compat.cheap_zero3_build(z3), self._offload_keeper.building(z3):
            engine, _, _, _ = self._ds.initialize(
                model=self.model,
                model_parameters=inputs,
                optimizer=opt,
                config=self.phase_config(params),
                mpu=self.mpu,
                dist_init_required=False,
            )
        if self._loss_scaler is not None:
            compat.set_loss_scaler_state(engine.optimizer, self._loss_scaler)
        self._engine = engine
        self._params = params
        self._built_once = True

    def teardown(self) -> None:
        if self._engine is None:
            return
        self._loss_scaler = self._loss_scale_now()
        engine, self._engine = self._engine, None
        # ZeRO-3: the kept parameter offload (and the backward Functions
        # bound to its coordinator) stays for the next phase
        compat.release_engine(engine, self.model, keep_module_functions=self._offload_keeper.offload is not None)
        del engine
        self._params = []

    def close(self) -> None:
        self.teardown()
        self._offload_keeper.release()

    def _loss_scale_now(self) -> dict[str, Any] | None:
        """The current phase's fp16 loss-scaler state, or the one carried between phases."""
        live = compat.loss_scaler_state(self._engine.optimizer) if self._engine is not None else None
        return live or self._loss_scaler

    def precision_state(self) -> dict[str, Any]:
        state = self._loss_scale_now()
        return {"loss_scaler": state} if state else {}

    def load_precision_state(self, state: dict[str, Any]) -> None:
        # the checkpointer calls this between phases: the next build() puts it into the new optimizer
        self._loss_scaler = state.get("loss_scaler") or None

    # ----------------------------------------------------------------- training

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._engine is None:
            with torch.no_grad():
                return self.model(*args, **kwargs)
        return self._engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        self._engine.backward(loss, retain_graph=retain_graph)

    def step(self, boundary: bool) -> float | None:
        # no_grad: DeepSpeed < 0.19 all-gathers ZeRO-1/2's updated partitions in grad mode, which gloo's
        # all_gather_into_tensor (in-place copies into split views) refuses on CPU; an update needs no autograd
        with torch.no_grad():
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
        with torch.no_grad():
            self._engine.step()
        if self._engine.was_step_applied():
            raise RuntimeError(
                "DeepSpeed applied an update from NaN/inf gradients (its overflow check is off: "
                "zero_optimization.compute_grad_norm is false?); "
                "the weights may now be NaN. Resume from the last checkpoint"
            )

    @property
    def comm_device(self) -> torch.device:
        from deepspeed.accelerator import get_accelerator

        return torch.device(get_accelerator().current_device_name())

    def optimizer_state_numel(self) -> int:
        """Elements of optimizer state this rank holds (moments; fp32 master partitions not counted)."""
        if self._engine is None:
            return 0
        inner = compat.innermost_optimizer(self._engine.optimizer)
        return sum(v.numel() for st in inner.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)

    # ----------------------------------------------------------------- sizes and collectives

    def numel(self, p: torch.Tensor) -> int:
        return compat.full_numel(p)

    @contextlib.contextmanager
    def gathered(self, params: list[nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
        """Full values of ZeRO-3 partitioned ``params`` inside the block (collective)."""
        z3 = [p for p in params if compat.is_zero3_param(p)]
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

    def full_state_dict(self) -> dict[str, torch.Tensor]:
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
            save_file(values, str(path / WEIGHTS_FILE))

    def load_weights(self, path: Path, skip: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
        from safetensors import safe_open

        named = dict(self.model.named_parameters())
        with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
            names = [n for n in f.keys() if n not in skip]
            for n in names:
                p = named[n]
                with self.gathered([p], modifier_rank=0), torch.no_grad():
                    if self.rank == 0 or not compat.is_zero3_param(p):
                        p.data.copy_(f.get_tensor(n).to(p.dtype))
        return names

    # ----------------------------------------------------------------- optimizer state, portable

    def active_params(self) -> list[nn.Parameter]:
        return list(self._params)

    def full_optimizer_state(self) -> dict[str, Any]:
        """Through DeepSpeed's public per-parameter API (``safe_get_full_fp32_param``,
        ``safe_get_full_optimizer_state``): full values gathered from every rank's partition."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        names, opt = self.active_param_names(), self._engine.optimizer
        if not compat.has_fp32_master(self._params):  # ZeRO-0 in fp32: a torch optimizer over the module's parameters
            return torch_optimizer_full_state(compat.innermost_optimizer(opt), names, self._params)
        step, keys = compat.zero_step_and_keys(opt)
        compat.relink_zero_state(opt)
        out: dict[str, Any] = {"step": step, "keys": keys, "state": {}, "master": {}}
        for n, p in zip(names, self._params):
            out["master"][n] = to_host(safe_get_full_fp32_param(p))
            out["state"][n] = {k: to_host(safe_get_full_optimizer_state(p, k)) for k in keys}
        host_copies_done()
        return out

    def load_full_optimizer_state(self, state: dict[str, Any]) -> None:
        """Through DeepSpeed's ``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state``: each
        rank keeps its partition of the full values (a fresh optimizer's state is created first)."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        names, opt = self.active_param_names(), self._engine.optimizer
        if not compat.has_fp32_master(self._params):
            load_torch_optimizer_full_state(compat.innermost_optimizer(opt), names, self._params, state)
            return
        device = self.comm_device
        if state["keys"]:
            compat.materialize_zero_state(opt, state["keys"], state["step"])
        for n, p in zip(names, self._params):
            safe_set_full_fp32_param(p, state["master"][n].to(device))
            for k in state["keys"]:
                safe_set_full_optimizer_state(p, state["state"][n][k].to(device), k)
