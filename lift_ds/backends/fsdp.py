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

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ..blocks import find_layer_stack
from ..config import TrainingConfig, is_comment_key
from ..utils import get_logger, init_process_group
from .base import BackendContext, TorchOptimizerBackend

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
            f"zero_optimization.stage: {zero.get('stage')} is a DeepSpeed ZeRO stage; backend \"fsdp\" always shards "
            "parameters, gradients and optimizer state (like ZeRO-3). Remove zero_optimization or use backend \"deepspeed\""
        )
    if isinstance(zero, Mapping) and (zero.get("offload_optimizer") or zero.get("offload_param")):
        problems.append("zero_optimization.offload_*: DeepSpeed offload does not apply to backend \"fsdp\"; use \"fsdp\": {\"cpu_offload\": true}")
    if training.precision == "fp16":
        problems.append("fp16.enabled: backend \"fsdp\" has no loss scaler here; use bf16")
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

def _to_portable(obj: Any) -> Any:
    """Optimizer state with DTensors replaced by (local shard on CPU, mesh, placements)."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        return ("__dtensor__", obj.to_local().detach().to("cpu", copy=True), obj.device_mesh, obj.placements, obj.shape, obj.stride())
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_portable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_portable(v) for v in obj]
    return obj


def _from_portable(obj: Any, device: torch.device) -> Any:
    from torch.distributed.tensor import DTensor

    if isinstance(obj, tuple) and obj and obj[0] == "__dtensor__":
        _, local, mesh, placements, shape, stride = obj
        return DTensor.from_local(local.to(device), mesh, placements, shape=shape, stride=stride, run_check=False)
    if isinstance(obj, dict):
        return {k: _from_portable(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_portable(v, device) for v in obj]
    return obj


class FSDPBackend(TorchOptimizerBackend):
    """FSDP2 with per-layer units and a per-phase optimizer (see module docstring)."""

    name = "fsdp"

    @classmethod
    def check_config(cls, raw: Mapping[str, Any], training: TrainingConfig, world_size: int, method: str) -> tuple[Any, list[str]]:
        _, problems = super().check_config(raw, training, world_size, method)
        fsdp_problems = _fsdp_problems(raw, training)
        sec = raw.get("fsdp") or {}
        options = FSDPOptions(**{k: v for k, v in sec.items() if k in FSDP_KEYS}) if not fsdp_problems else None
        return options, problems + fsdp_problems

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        cfg = ctx.config
        opts = cfg.backend_options or self.check_config(cfg.raw, cfg.training, cfg.world_size, "lift")[0] or FSDPOptions()
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
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if training.precision == "bf16" else MixedPrecisionPolicy()
        offload = CPUOffloadPolicy(pin_memory=cuda) if opts.cpu_offload else OffloadPolicy()
        kw = dict(mesh=self.mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=opts.reshard_after_forward)
        model.to(self.device if not opts.cpu_offload else torch.device("cpu"))
        _, stack = find_layer_stack(model)
        for layer in stack:
            fully_shard(layer, **kw)
        fully_shard(model, **kw)
        self._needs_dtype_warmup = training.precision == "bf16"
        self._offload = opts.cpu_offload

    def memory_layout(self) -> tuple[int, bool]:
        return 3, self._offload

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

    def _full(self, p: torch.Tensor) -> torch.Tensor:
        return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().to("cpu", copy=True)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: self._full(p) for n, p in self.model.named_parameters()}

    # ----------------------------------------------------------------- checkpoints

    def save_weights(self, path: Path, param_names: list[str]) -> None:
        from safetensors.torch import save_file

        named = dict(self.model.named_parameters())
        values = {n: self._full(named[n]).contiguous() for n in param_names}
        if self.rank == 0:
            save_file(values, str(path / "weights.safetensors"))

    def load_weights(self, path: Path) -> list[str]:
        from safetensors import safe_open
        from torch.distributed.tensor import DTensor, distribute_tensor

        named = dict(self.model.named_parameters())
        with safe_open(str(path / "weights.safetensors"), framework="pt") as f, torch.no_grad():
            names = list(f.keys())
            for n in names:
                p, full = named[n], f.get_tensor(n)
                if isinstance(p, DTensor):
                    local = distribute_tensor(full.to(p.device, p.dtype), p.device_mesh, p.placements).to_local()
                    p.to_local().copy_(local)
                else:
                    p.copy_(full.to(p.dtype))
        return names

    def save_optimizer(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        assert self._optimizer is not None
        dcp.save({"optim": get_optimizer_state_dict(self.model, self._optimizer)}, checkpoint_id=str(path / "optimizer"))

    def load_optimizer(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        assert self._optimizer is not None
        state = {"optim": get_optimizer_state_dict(self.model, self._optimizer)}
        dcp.load(state, checkpoint_id=str(path / "optimizer"))
        set_optimizer_state_dict(self.model, self._optimizer, state["optim"])

    def stash_optimizer_state(self) -> Any:
        assert self._optimizer is not None
        return {"state": _to_portable(self._optimizer.state_dict()["state"])}

    def restore_optimizer_state(self, state: Any) -> None:
        assert self._optimizer is not None
        sd = self._optimizer.state_dict()
        sd["state"] = _from_portable(state["state"], self.device)
        self._optimizer.load_state_dict(sd)
