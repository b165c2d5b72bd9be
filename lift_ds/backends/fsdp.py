"""FSDP2 backend: ``fully_shard`` per decoder layer, then the root; a new optimizer each phase.

Every layer is its own FSDP unit, so a frozen layer never carries a gradient buffer; the embedding
and head live in the root unit (tied embeddings stay one parameter). FSDP2 shards per parameter
(DTensor), so the per-phase optimizer built over the active block's parameters holds sharded state
for that block only. Mixed precision (``bf16``) uses ``MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)``; CPU offload is ``"fsdp": {"cpu_offload": true}``.

FSDP2 caches gradient dtypes at its lazy initialisation for the parameters trainable then; with bf16
a later phase would fail ("attempting to assign a gradient with dtype BFloat16 ..."). The first
forward therefore runs once under ``no_grad`` with every parameter trainable (public API only).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..blocks import find_layer_stack
from ..config import LiftConfig, TrainingConfig, is_comment_key
from ..utils import get_logger
from .base import BackendContext, TorchOptimizerBackend
from .distributed import init_process_group

logger = get_logger(__name__)


@dataclass(frozen=True)
class FSDPOptions:
    """The ``"fsdp"`` section."""

    cpu_offload: bool = False
    reshard_after_forward: bool = True


FSDP_KEYS = ("cpu_offload", "reshard_after_forward")


def _fsdp_problems(raw: Mapping[str, Any], training: TrainingConfig) -> list[str]:
    """Keys backend ``fsdp`` cannot honour, and a check of its ``"fsdp"`` section."""
    problems = []
    zero = raw.get("zero_optimization") or {}
    if isinstance(zero, Mapping) and zero.get("stage", 0) not in (0, None):
        problems.append(
            f'zero_optimization.stage: {zero.get("stage")} is a DeepSpeed ZeRO stage; backend "fsdp" always shards '
            "parameters, gradients and optimizer state (like ZeRO-3). "
            'Remove zero_optimization or use backend "deepspeed"'
        )
    offloaded = [
        k
        for k in ("offload_optimizer", "offload_param")
        if isinstance(zero, Mapping)
        and zero.get(k)
        and (not isinstance(zero[k], Mapping) or (zero[k].get("device") or "none") != "none")
    ]
    if offloaded:  # {"device": "none"} (DeepSpeed-Chat's default) offloads nothing
        problems.append(
            "zero_optimization.offload_*: DeepSpeed offload does not apply "
            'to backend "fsdp"; use "fsdp": {"cpu_offload": true}'
        )
    if training.precision == "fp16":
        problems.append('fp16.enabled: backend "fsdp" has no loss scaler here; use bf16')
    sec = raw.get("fsdp", {})
    if not isinstance(sec, Mapping):
        return problems + [f"fsdp: must be an object, got {sec!r}"]
    for k, v in sec.items():
        if is_comment_key(k):
            continue
        if k not in FSDP_KEYS:
            problems.append(f"fsdp.{k}: unknown key; allowed: {', '.join(FSDP_KEYS)}")
        elif not isinstance(v, bool):
            problems.append(f"fsdp.{k}: must be true or false, got {v!r}")
    return problems


class FSDPBackend(TorchOptimizerBackend):
    """FSDP2 with per-layer units and a per-phase optimizer (see module docstring)."""

    name = "fsdp"

    @classmethod
    def check_config(
        cls, lift: LiftConfig, training: TrainingConfig, raw: Mapping[str, Any], world_size: int, baseline: str = "lift"
    ) -> tuple[Any, list[str]]:
        _, problems = super().check_config(lift, training, raw, world_size, baseline)
        fsdp_problems = _fsdp_problems(raw, training)
        frozen = lift.frozen_layers_setting()
        if frozen:
            problems.append(
                f"{frozen}: FSDP2 shards every layer once at the start, and Q-LIFT swaps a layer's "
                'linear modules at each phase; use backend "deepspeed" with ZeRO-1/2, "torch" on one process, or '
                'frozen_weights "full" (not streamed)'
            )
        sec = raw.get("fsdp") or {}
        options = FSDPOptions(**{k: v for k, v in sec.items() if k in FSDP_KEYS}) if not fsdp_problems else None
        return options, problems + fsdp_problems

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        cfg = ctx.config
        opts: FSDPOptions = cfg.backend_options  # checked by load_run_config, the one way to a RunConfig
        model, training = self.model, self.training
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        cuda = torch.cuda.is_available()
        if not dist.is_initialized():
            init_process_group("nccl" if cuda else "gloo")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if training.precision == "bf16"
            else MixedPrecisionPolicy()
        )
        offload = CPUOffloadPolicy(pin_memory=cuda) if opts.cpu_offload else OffloadPolicy()
        kw = dict(
            mesh=self.mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=opts.reshard_after_forward
        )
        model.to(self.device if not opts.cpu_offload else torch.device("cpu"))
        _, stack = find_layer_stack(model)
        for layer in stack:
            fully_shard(layer, **kw)
        fully_shard(model, **kw)
        self._needs_dtype_warmup = training.precision == "bf16"
        self._offload = opts.cpu_offload

    def memory_layout(self) -> tuple[int, bool]:
        return 3, self._offload

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """FSDP2 keeps unreduced gradients while this is open (``set_requires_gradient_sync``)."""
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    @classmethod
    def planned_memory_layout(cls, options: Any) -> tuple[int, bool]:
        return 3, bool(getattr(options, "cpu_offload", False))

    def _warmup(self, args: Any, kwargs: Any) -> None:
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in flags:
            p.requires_grad_(True)
        with torch.no_grad():
            self.model(*args, **kwargs)
        for p, flag in flags:
            p.requires_grad_(flag)
        self._needs_dtype_warmup = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args = tuple(a.to(self.device) if torch.is_tensor(a) else a for a in args)
        kwargs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
        if self._needs_dtype_warmup:
            self._warmup(args, kwargs)
        return self.model(*args, **kwargs)

    # ----------------------------------------------------------------- collectives

    @property
    def comm_device(self) -> torch.device:
        return self.device

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {
            n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().to("cpu", copy=True)
            for n, p in self.model.named_parameters()
        }
