"""Launch tests/distributed/worker.py on 2 CPU ranks and compute single-process references."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import lift_ds

from helpers import lm_batches, tiny_llama

WORKER = Path(__file__).with_name("worker.py")
REPO = Path(__file__).resolve().parents[2]
WORLD = 2


def torchrun(scenarios: dict, tmp: Path, name: str = "run", timeout: int = 900, nproc: int = WORLD, expect_results: bool = True) -> dict:
    spec = tmp / f"{name}.json"
    out = tmp / f"{name}.pt"
    spec.write_text(json.dumps(scenarios))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER), str(spec), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if not expect_results:
        if proc.returncode != 0:
            raise AssertionError(f"worker failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
        return {}
    if not out.exists():
        raise AssertionError(f"worker produced no results (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    results = torch.load(out, weights_only=False)
    errors = {k: v["error"] for k, v in results.items() if "error" in v}
    if errors:
        raise AssertionError("\n\n".join(f"[{k}] {e}" for k, e in errors.items()))
    return results


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.5),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, eps=1e-3, weight_decay=0.01),
}


def reference(sc: dict, world: int = WORLD, start_state: dict | None = None) -> tuple[dict, dict]:
    """The torch backend, one process, fed the same global batches. Returns (start, final).

    ``start_state`` replaces the initial weights (e.g. those a zero.Init model was built with)."""
    cfg = copy.deepcopy(sc["config"])
    cfg.pop("zero_optimization", None)
    mb = cfg.pop("train_micro_batch_size_per_gpu", 2)
    cfg["train_micro_batch_size_per_gpu"] = mb * world
    cfg["lift"] = {**cfg["lift"], "backend": "torch"}
    cfg.pop("train_batch_size", None)
    for key in ("bf16", "fp16"):
        cfg.pop(key, None)
    model = tiny_llama(layers=sc.get("layers", 4), hidden=sc.get("hidden", 32), vocab=sc.get("vocab", 128), seed=sc.get("seed", 0))
    if start_state is not None:
        model.load_state_dict(start_state, strict=False)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = None if sc["optimizer"] == "config" else OPTIMIZERS[sc["optimizer"]]
    engine, _, _, _ = lift_ds.initialize(model=model, config=cfg, optimizer=opt)
    gas = cfg.get("gradient_accumulation_steps", 1)
    data = lm_batches(sc["steps"] * gas, batch=mb * world, seq=sc.get("seq", 16), vocab=sc.get("vocab", 128), seed=sc.get("data_seed", 1))
    for b in data:
        loss = engine(**b).loss
        if engine.global_step + 1 in sc.get("nan_steps", ()):
            loss = loss * float("nan")
        engine.backward(loss)
        engine.step()
    return start, {n: p.detach().clone() for n, p in model.named_parameters()}


def max_rel_error(final: dict, ref: dict, start: dict) -> tuple[float, float]:
    """(max |final - ref|, max |ref - start|) over all parameters."""
    err = max((final[n].float() - ref[n].float()).abs().max().item() for n in ref)
    move = max((ref[n] - start[n]).abs().max().item() for n in ref)
    return err, move
