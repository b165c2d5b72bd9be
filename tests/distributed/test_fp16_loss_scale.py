"""fp16 under DeepSpeed: the dynamic loss scale carries over phase switches and checkpoints.

Every phase builds a new ZeRO optimizer, and with it a new loss scaler that would start again at
2^initial_scale_power (a run with short phases could then spend its steps on overflow skips, and the
scale would never settle). DeepSpeed's CPU accelerator reports no fp16 on a machine without AVX-512
FP16 / AMX, but torch's CPU fp16 kernels run anyway (slowly): the job below lets DeepSpeed use them,
one process, a tiny model. Scale 2^4, doubled after every 2 clean steps (loss_scale_window 2); 4
layers x 2 steps, grouped: a new optimizer every 2 steps."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

JOB = r"""
import json, sys
import torch
from deepspeed.accelerator import get_accelerator
type(get_accelerator()).is_fp16_supported = lambda self: True
import lift_ds
from lift_ds.backends import hardware
hardware.supports = lambda backend, dtype: (True, "fp16 allowed for this test")
from helpers import lm_batches, tiny_llama

from lift_ds.backends.compat import loss_scaler_state

save, resume, stage = sys.argv[1], sys.argv[2] == "resume", int(sys.argv[3])
cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.0, "zero_optimization": {"stage": stage},
       "fp16": {"enabled": True, "initial_scale_power": 4, "loss_scale_window": 2},
       "lift": {"backend": "deepspeed", "total_steps": 8}}
engine, _, _, _ = lift_ds.initialize(model=tiny_llama(), config=cfg,
                                     optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3))
if resume:
    engine.load_checkpoint(save)
scales = {}
for k, b in enumerate(lm_batches(8)):
    if k < engine.global_step:
        continue
    engine.backward(engine(**b).loss)
    engine.step()
    scales[engine.global_step] = loss_scaler_state(engine.backend.engine.optimizer)["cur_scale"]
    if engine.global_step == 5 and not resume:
        engine.save_checkpoint(save)
print("SCALES " + json.dumps({"scales": scales, "skipped": engine.skipped_steps}))
engine.close()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tmp: Path, mode: str, stage: int) -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{REPO}:{REPO / 'tests'}",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    proc = subprocess.run(
        [sys.executable, "-c", JOB, str(tmp / "ckpt"), mode, str(stage)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("SCALES "))
    out = json.loads(line[len("SCALES ") :])
    return {"scales": {int(k): v for k, v in out["scales"].items()}, "skipped": out["skipped"]}


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_fp16_loss_scale_carries_over_phases_and_resume(tmp_path, stage):
    """ZeRO-0 (DeepSpeed's FP16 optimizer), ZeRO-2 and ZeRO-3 (their own scalers); the resume is
    backend-generic and runs under ZeRO-2."""
    full = run(tmp_path, "fresh", stage)
    scales = [full["scales"][s] for s in range(1, 9)]
    assert full["skipped"] == 0, full  # a clean run: the scale only grows
    # without the carry every phase's optimizer starts again at 16 and never reaches its window
    assert scales == sorted(scales) and scales[-1] >= 8 * scales[0], scales
    if stage != 2:
        return
    resumed = run(tmp_path, "resume", stage)
    assert sorted(resumed["scales"]) == [6, 7, 8], resumed  # resumed after step 5 (mid-phase)
    assert all(resumed["scales"][s] == full["scales"][s] for s in (6, 7, 8)), (resumed, full)
