"""Probe the DeepSpeed private details lift_ds.backends.compat works around, on live engines.

    torchrun --standalone --nproc_per_node 1 tests/distributed/compat_probe.py OUT.json

Writes one JSON object of facts; tests/distributed/test_compat.py asserts one workaround per test.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import weakref
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch._dynamo  # noqa: E402,F401  (before deepspeed.zero.Init)

from helpers import lm_batches, tiny_llama  # noqa: E402


def config(stage: int) -> dict:
    zero = {"stage": stage, "reduce_bucket_size": 12345}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
    }


def build(stage: int, model=None):
    import deepspeed

    model = model or tiny_llama()
    layer = [p for n, p in model.named_parameters() if n.startswith("model.layers.1.")]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in layer:
        p.requires_grad_(True)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=layer, optimizer=torch.optim.AdamW(layer, lr=1e-2), config=config(stage)
    )
    return model, layer, engine


def train_step(engine) -> None:
    b = lm_batches(1, batch=2)[0]
    loss = engine(**b).loss
    engine.backward(loss)
    engine.step()
    del loss


def main() -> None:
    import deepspeed
    from deepspeed.runtime.engine import DeepSpeedEngine

    from lift_ds.backends import compat
    from lift_ds.backends.distributed import init_process_group

    init_process_group("gloo")
    compat.disable_shm_comm_op()
    deepspeed.init_distributed()
    facts: dict = {"version_verified": compat.check_version()}

    # _broadcast_model: called by every build, skipped inside skip_model_broadcast
    calls = []
    original = DeepSpeedEngine._broadcast_model
    DeepSpeedEngine._broadcast_model = lambda self: calls.append(1) or original(self)
    try:
        model, layer, engine = build(2)
        facts["broadcast_calls_plain_build"] = len(calls)
        compat.release_engine(engine, model)
        with compat.skip_model_broadcast(True):
            model, layer, engine = build(2, model)
        facts["broadcast_calls_skipped_build"] = len(calls) - facts["broadcast_calls_plain_build"]
    finally:
        DeepSpeedEngine._broadcast_model = original

    # ZeRO-2: hooks left by destroy(), the optimizer chain, state round trip, bucket size
    train_step(engine)
    inner = compat.innermost_optimizer(engine.optimizer)
    facts["innermost_is_torch_optimizer"] = isinstance(inner, torch.optim.Optimizer)
    facts["innermost_state_numel"] = sum(
        v.numel() for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0
    )
    facts["layer_numel"] = sum(p.numel() for p in layer)
    facts["reduce_bucket_size"] = compat.zero_reduce_bucket_size(engine)
    inner = compat.innermost_optimizer(engine.optimizer)
    hooks = {name: getattr(engine, name, None) for name in compat._ENGINE_HOOKS}
    facts["engine_hook_attributes_are_handles"] = all(
        isinstance(h, torch.utils.hooks.RemovableHandle) for h in hooks.values()
    )
    state_ref = weakref.ref(
        next(v for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    )
    engine.destroy()
    registered = set(model._forward_pre_hooks) | set(model._forward_hooks)
    facts["destroy_leaves_forward_hooks"] = all(h is not None and h.id in registered for h in hooks.values())
    engine_ref = weakref.ref(engine)
    gc.disable()
    try:
        compat.release_engine(engine, model)
        del engine, inner
        facts["release_frees_optimizer_state_without_gc"] = state_ref() is None
        facts["hooks_after_release"] = len(model._forward_pre_hooks) + len(model._forward_hooks)
    finally:
        gc.enable()
    gc.collect()
    facts["engine_collected"] = engine_ref() is None

    # ZeRO-3: parameter attributes and back-references
    model, layer, engine = build(3, tiny_llama())
    p = layer[0]
    facts["zero3_param_has_ds_id"] = compat.is_zero3_param(p)
    facts["zero3_full_numel"] = compat.full_numel(p)
    facts["zero3_local_numel"] = p.numel()
    facts["zero3_expected_numel"] = int(p.ds_shape.numel()) if hasattr(p, "ds_shape") else -1
    facts["zero3_backref_on_params"] = any(hasattr(q, "_z3_optimizer") for q in model.parameters())
    facts["zero3_module_functions_cached"] = sum(
        1 for m in model.modules() if any(a in m.__dict__ for a in compat._ZERO3_MODULE_FUNCTIONS)
    )
    compat.release_engine(engine, model)
    facts["zero3_backref_after_release"] = any(hasattr(q, "_z3_optimizer") for q in model.parameters())
    facts["zero3_module_functions_after_release"] = sum(
        1 for m in model.modules() if any(a in m.__dict__ for a in compat._ZERO3_MODULE_FUNCTIONS)
    )
    for stage in (2, 3):
        facts.update(state_round_trip(stage))
    facts.update(zero3_offload_kept())
    Path(sys.argv[1]).write_text(json.dumps(facts, indent=1))
    torch.distributed.destroy_process_group()


def zero3_offload_kept() -> dict:
    """A ZeRO-3 LIFT run over 4 phases through lift_ds: how many model-wide DeepSpeedZeRoOffload were
    built, the module hooks per phase, and what is left after close()."""
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    import lift_ds

    built = []
    original = DeepSpeedZeRoOffload.__init__

    def counting(self, *a, **k):
        built.append(1)
        original(self, *a, **k)

    DeepSpeedZeRoOffload.__init__ = counting
    try:
        model = tiny_llama()
        cfg = {
            **config(3),
            "lift": {"backend": "deepspeed", "total_steps": 4, "layer_range": [1, 4], "policy": "cyclic"},
        }
        engine, *_ = lift_ds.initialize(model=model, config=cfg, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
        hooks = []
        for b in lm_batches(4, batch=2):
            loss = engine(**b).loss
            engine.backward(loss)
            engine.step()
            del loss
            hooks.append(sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()))
        reused = engine.backend._offload_keeper.reused
        engine.close()
    finally:
        DeepSpeedZeRoOffload.__init__ = original
    return {
        "z3_offloads_built": len(built),
        "z3_offload_reused": reused,
        "z3_phases": engine.phase_switches,
        "z3_hooks_per_step": hooks,
        "z3_hooks_after_close": sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()),
        "z3_all_partitioned_after_close": all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in model.parameters()),
    }


def state_round_trip(stage: int) -> dict:
    """Portable optimizer state out of one engine and into a fresh one (zero_step_and_keys,
    materialize_zero_state, has_fp32_master through lift_ds's DeepSpeed backend): the next step of
    both is the same."""
    import tempfile

    import lift_ds
    from lift_ds.backends import compat

    cfg = {**config(stage), "lift": {"backend": "deepspeed", "total_steps": 4, "layer_range": [2, 2]}}
    opt = lambda ps: torch.optim.AdamW(ps, lr=1e-2, eps=1e-3)  # noqa: E731
    batches = lm_batches(3, batch=2)
    a, *_ = lift_ds.initialize(model=tiny_llama(), config=cfg, optimizer=opt)
    fresh = compat.zero_step_and_keys(a.backend.optimizer)
    for b in batches[:2]:
        loss = a(**b).loss
        a.backward(loss)
        a.step()
        del loss
    step, keys = compat.zero_step_and_keys(a.backend.optimizer)
    out = {
        f"z{stage}_fresh_state": list(fresh),
        f"z{stage}_step": step,
        f"z{stage}_keys": keys,
        f"z{stage}_has_fp32_master": compat.has_fp32_master(a.backend.active_params()),
    }
    with tempfile.TemporaryDirectory() as d:
        a.save_checkpoint(d)
        b_engine, *_ = lift_ds.initialize(model=tiny_llama(), config=cfg, optimizer=opt)
        b_engine.load_checkpoint(d)
    for e in (a, b_engine):
        loss = e(**batches[2]).loss
        e.backward(loss)
        e.step()
        del loss
    sa, sb = a.backend.full_optimizer_state(), b_engine.backend.full_optimizer_state()
    out[f"z{stage}_round_trip_same_next_step"] = same(sa, sb) and sa["step"] == sb["step"] == 3.0
    a.close()
    b_engine.close()
    return out


def same(a, b) -> bool:
    """Equal nested state (tensors by value); a mismatch in any tensor, key or length is False."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and torch.equal(a.float(), b.float())
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return True  # hyperparameters and flags: not what a round trip is about


if __name__ == "__main__":
    main()
