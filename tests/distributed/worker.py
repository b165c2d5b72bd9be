"""Runs LIFT scenarios under a multi-rank launcher; rank 0 writes results for the pytest side.

    torchrun --nproc_per_node 2 tests/distributed/worker.py SCENARIOS.json OUT_DIR

Each scenario is a dict: config (a whole DeepSpeed config with a "lift" section), optimizer
("sgd" | "adamw" | "config"), steps, seed, and optional actions (save_at, resume_from,
die_after_save, track). Data: global batches of learnable token sequences; rank r takes its rows.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch._dynamo  # noqa: E402,F401  (must precede deepspeed.zero.Init)
import transformers  # noqa: E402,F401

from lift_ds.memory import live_tensor_bytes  # noqa: E402

from helpers import lm_batches, tiny_llama  # noqa: E402

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.5),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, eps=1e-3, weight_decay=0.01),
}


def rss_mb() -> float:
    """Resident memory after glibc hands its free pages back (malloc_trim): what is still allocated,
    without the allocator's caching, which moved RSS by several MB between samples here."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def live_engines() -> int:
    """DeepSpeed engines that still hold anything (a released engine's emptied shell may wait in a
    reference cycle for Python's collector; it holds no tensor). No collection is forced."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    return sum(1 for o in gc.get_objects() if isinstance(o, DeepSpeedEngine) and o.__dict__)


def live_optimizers() -> int:
    """Optimizers holding real parameters (LIFT's LR proxy holds one 1-element dummy; DeepSpeed may
    hold empty ones; a released one's emptied shell holds none). No collection is forced."""
    return sum(
        1
        for o in gc.get_objects()
        if isinstance(o, torch.optim.Optimizer)
        and any(p.numel() > 1 for g in getattr(o, "param_groups", []) for p in g["params"])
    )


def layer_modules(model):
    from lift_ds.blocks import find_layer_stack

    return list(find_layer_stack(model)[1])


def hook_count(model) -> int:
    return sum(
        len(m._forward_pre_hooks)
        + len(m._forward_hooks)
        + len(m._backward_hooks)
        + len(getattr(m, "_backward_pre_hooks", {}))
        for m in model.modules()
    )


def global_batches(sc, world):
    mb = sc["config"].get("train_micro_batch_size_per_gpu", 2)
    gas = sc["config"].get("gradient_accumulation_steps", 1)
    return lm_batches(
        sc["steps"] * gas,
        batch=mb * world,
        seq=sc.get("seq", 16),
        vocab=sc.get("vocab", 128),
        seed=sc.get("data_seed", 1),
        prompt=sc.get("prompt", 0),
    )


def build_model(sc, ds_config):
    import deepspeed

    kw = dict(
        layers=sc.get("layers", 4),
        hidden=sc.get("hidden", 32),
        vocab=sc.get("vocab", 128),
        seed=sc.get("seed", 0),
        tie=sc.get("tie", False),
    )
    if sc.get("zero_init"):
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            return tiny_llama(**kw)
    return tiny_llama(**kw)


def run(sc, rank, world):
    import lift_ds

    if sc.get("crash"):  # the whole job dies here (tests of the per-scenario attribution)
        os._exit(3)

    model = build_model(sc, sc["config"])
    start = {n: t.clone() for n, t in _full_state(model).items()} if sc.get("report_start") else None
    opt = None if sc["optimizer"] == "config" else OPTIMIZERS[sc["optimizer"]]
    engine, _, _, _ = lift_ds.initialize(model=model, config=sc["config"], optimizer=opt)
    assert engine.backend.name == sc["config"]["lift"]["backend"]
    mb = sc["config"].get("train_micro_batch_size_per_gpu", 2)
    data = global_batches(sc, world)
    out: dict = {
        "losses": [],
        "state_numel": [],
        "phase_blocks": [],
        "trainable_numel": [],
        "engines": [],
        "hooks": [],
        "rss": [],
    }
    if sc.get("resume_from"):
        path, _ = engine.load_checkpoint(sc["resume_from"])
        # evidence that the checkpoint was loaded: where the run continues and the state it got
        out["resumed_from"] = None if path is None else str(path)
        out["resumed_at"] = engine.global_step
        out["loaded_state"] = engine.backend.full_optimizer_state() if engine.active_block_index is not None else None
    fired: list[int] = []
    if sc.get("track_backward"):
        # truncated backward: a block before the active one must see no backward at all
        for i, layer in enumerate(layer_modules(model)):
            layer.register_full_backward_hook(lambda mod, gi, go, i=i: fired.append(i))
    micro = engine.micro_steps
    out["steps_run"] = 0
    t0 = time.perf_counter()
    while not engine.done:
        b = data[micro]
        local = {k: v[rank * mb : (rank + 1) * mb] for k, v in b.items()}
        loss = engine(**local).loss
        if engine.global_step + 1 in sc.get("nan_steps", ()) and rank in sc.get("nan_ranks", [rank]):
            loss = loss * float("nan")  # a numerical fault on this rank only
        engine.backward(loss)
        out["losses"].append(loss.item())
        # DeepSpeed's backward hooks on the outputs reference the engine that made them: a loop that
        # keeps the loss tensor keeps the previous phase's engine alive until its next forward
        del loss
        was_boundary = engine.is_gradient_accumulation_boundary()
        block = engine.active_block_index
        if was_boundary:
            # state exists after the first step of a phase; count what this rank holds now (before step)
            out["state_numel"].append(engine.backend.optimizer_state_numel())
            out["trainable_numel"].append(
                sum(
                    p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                    for p in engine.module.parameters()
                    if p.requires_grad
                )
            )
            if sc.get("track_names"):
                out.setdefault("trainable_names", []).append(
                    sorted(n for n, p in engine.module.named_parameters() if p.requires_grad)
                )
            if sc.get("track_grads"):
                # FSDP: gradients exist for the active block only (checked before the step clears them)
                out.setdefault("grad_names", []).append(
                    sorted(n for n, p in engine.module.named_parameters() if p.grad is not None)
                )
            out["phase_blocks"].append(block)
        if was_boundary and sc.get("track_backward"):
            out.setdefault("backward_fired", []).append((block, sorted(set(fired))))
            fired.clear()
        engine.step()
        micro += 1
        out["steps_run"] += int(was_boundary)
        if was_boundary and sc.get("track"):
            # what a real run holds after each step: no collection is forced (phase switches run none)
            out.setdefault("live_tensor_bytes", []).append(live_tensor_bytes())
            out["engines"].append(live_engines())
            out.setdefault("optimizers", []).append(live_optimizers())
            if engine.backend.name == "deepspeed":  # a private DeepSpeed attribute, through lift_ds's compat module
                from lift_ds.backends.compat import zero_reduce_bucket_size

                out.setdefault("bucket", []).append(zero_reduce_bucket_size(engine.backend.engine))
            out["hooks"].append(hook_count(engine.module))
            out["rss"].append(rss_mb())
        if was_boundary and sc.get("save_at") == engine.global_step:
            engine.save_checkpoint(sc["save_dir"])
            state = engine.backend.full_optimizer_state()  # what a resumed run must get back (tests compare)
            if rank == 0:
                torch.save({"step": engine.global_step, "state": state}, Path(sc["save_dir"]) / "probe_saved_state.pt")
            if sc.get("die_after_save"):
                engine.backend.barrier()
                os._exit(0)
    if sc.get("track"):  # tensors only Python's cycle collector would free, after the whole run
        pending = live_tensor_bytes()
        gc.collect()
        out["uncollected_at_end"] = pending - live_tensor_bytes()
    out["seconds"] = time.perf_counter() - t0
    out["switch_seconds"] = engine.phase_switch_seconds
    out["skipped_steps"] = engine.skipped_steps
    out["final"] = _full_state(model)
    if engine.quant is not None:  # Q-LIFT: quantized layers' exact weights are in the block store
        out["final"].update({n: t.float() for n, t in engine.quant.exact_weights().items()})
    if sc.get("export_dir"):
        from lift_ds.export import save_hf_checkpoint

        save_hf_checkpoint(engine, sc["export_dir"])
    engine.close()
    gc.collect()
    if sc.get("track"):
        out["engines_after_close"] = live_engines()
        out["hooks_after_close"] = hook_count(model)
    if start is not None:
        out["start"] = start
    return out


def _full_state(model):
    import deepspeed

    state = {}
    for n, p in model.named_parameters():
        if hasattr(p, "full_tensor"):  # FSDP2 DTensor
            state[n] = p.full_tensor().detach().float().clone()
        elif hasattr(p, "ds_id"):
            with deepspeed.zero.GatheredParameters([p]):
                state[n] = p.detach().float().clone()
        else:
            state[n] = p.detach().float().clone()
    return state


def main() -> None:
    scenarios = json.loads(Path(sys.argv[1]).read_text())
    out_dir = Path(sys.argv[2])
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, sc in scenarios.items():
        # each scenario's result (rank 0) or error (every rank that raised) is written as soon as it
        # is known, so one failing scenario, or a job killed later, leaves the others' results intact
        try:
            result = run(sc, rank, world)
        except Exception as e:  # recorded and reported by the pytest side, for this scenario only
            import traceback

            msg = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
            with open(out_dir / f"errors.rank{rank}.jsonl", "a") as f:
                f.write(json.dumps({"scenario": name, "rank": rank, "error": msg}) + "\n")
            print(f"[rank {rank}] scenario {name} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        else:
            if rank == 0:
                tmp = out_dir / f".{name}.pt.partial"
                torch.save(result, tmp)
                os.replace(tmp, out_dir / f"{name}.pt")
        gc.collect()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
