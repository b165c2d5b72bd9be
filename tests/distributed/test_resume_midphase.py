"""SIGKILL in the middle of a phase, with optimizer state in flight, then resume: bit-for-bit the
uninterrupted run, on ZeRO-2, ZeRO-3 and FSDP2 (launch/train.py) and under LiftTrainer.

What "mid-phase" means here, and why each part is needed:
- the checkpoint the run resumes from is itself mid-phase: 3 layers + head = 4 blocks over 16 steps
  (4 steps each: 1-4, 5-8, ...) with a checkpoint every 3 steps, so ``global_step6`` holds block 2 after
  two of its four steps, its Adam moments and fp32 state in the checkpoint;
- the kill comes one step later (``kill@7``: SIGKILL after step 7, no save at 7), so step 7's update is
  lost and must be redone from the checkpoint's optimizer state, not from a fresh optimizer;
- the model has attention dropout (p = 0.1): every training forward draws from each rank's RNG, so
  the resumed run equals the uninterrupted one only if the checkpoint's RNG states are restored.
The kill and the resume run in one torchrun job (``--max-restarts 1``; faults fire in the first attempt
only), the way a cluster restarts a job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import make_model_dir, write_sentiment

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DROPOUT = 0.1
ADAMW = {"type": "AdamW", "params": {"lr": 0.01, "weight_decay": 0.0, "eps": 1e-3}}
CONFIGS = {
    "zero2": {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2},
        "optimizer": ADAMW,
        "lift": {"backend": "deepspeed", "include_head": True},
    },
    "zero3": {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_clipping": 1.0,
        "optimizer": ADAMW,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "lift": {"backend": "deepspeed", "include_head": True},
    },
    "fsdp": {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_clipping": 1.0,
        "optimizer": ADAMW,
        "lift": {"backend": "fsdp", "include_head": True},
    },
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("midphase")
    make_model_dir(d / "model", layers=3, attention_dropout=DROPOUT)
    assert json.loads((d / "model" / "config.json").read_text())["attention_dropout"] == DROPOUT
    write_sentiment(d / "train.jsonl", 96)
    for name, cfg in CONFIGS.items():
        (d / f"{name}.json").write_text(json.dumps(cfg))
    return d


def launch(
    files: Path, config: str, out: Path, *extra: str, faults: str = "", restarts: int = 0
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LIFT_DS_FAULTS": faults}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "--max-restarts",
        str(restarts),
        "launch/train.py",
        "--ds_config",
        str(files / f"{config}.json"),
        "--model",
        str(files / "model"),
        "--data",
        str(files / "train.jsonl"),
        "--format",
        "classification",
        "--max_steps",
        "16",
        "--save_every",
        "3",
        "--keep_checkpoints",
        "0",
        "--seq_len",
        "32",
        "--output_dir",
        str(out),
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "final" / "model.safetensors")


@pytest.mark.parametrize(
    "config,fault",
    [
        ("zero2", "kill@7"),  # every rank killed
        ("zero3", "kill@7:1"),  # rank 1 only: rank 0 is left inside a collective until torchrun stops it
        ("fsdp", "kill@7:0"),
    ],
)
def test_sigkill_mid_phase_then_resume_is_bit_for_bit(files, tmp_path, config, fault):
    clean = tmp_path / "clean"
    proc = launch(files, config, clean)
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = tmp_path / "killed"
    proc = launch(files, config, out, "--resume", faults=fault, restarts=1)
    assert proc.returncode == 0, proc.stderr[-5000:]
    log = proc.stdout + proc.stderr
    ckpt = out / "checkpoints" / "global_step6"
    assert "no checkpoint in" in log and f"resumed from {ckpt} at step 6" in log, log[-3000:]
    # the checkpoint is mid-phase: block 2 (model.layers.1, steps 5-8) after two of its steps, Adam moments held
    assert json.loads((ckpt / "lift_state.json").read_text())["cursor"]["step"] == 6
    state = torch.load(ckpt / "optimizer_state.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 2 and state["keys"] == ["exp_avg", "exp_avg_sq"], (state["step"], state["keys"])
    assert state["master"] and all(n.startswith("model.layers.1.") for n in state["master"]), sorted(state["master"])
    assert all(state["state"][n]["exp_avg"].abs().sum() > 0 for n in state["master"])
    # step 7 was lost with the kill and ran again from the checkpoint's state: metrics.jsonl holds every
    # step once (a record the killed attempt wrote past the checkpoint is dropped on resume)
    logged = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert logged == list(range(1, 17)), logged
    want, got = final_weights(clean), final_weights(out)
    assert want.keys() == got.keys()
    differ = [n for n in want if not torch.equal(want[n], got[n])]
    assert not differ, (
        f"{len(differ)} tensors differ, e.g. {differ[:3]}: "
        f"max |diff| {max((want[n] - got[n]).abs().max().item() for n in differ):.3g}"
    )


def test_lift_trainer_sigkill_mid_phase_then_resume_is_bit_for_bit(tmp_path):
    """LiftTrainer (ZeRO-3, 2 ranks, attention dropout): 4 blocks x 3 steps; checkpoint-4 is block 2
    after one of its three steps, the kill comes after step 5; train(resume_from_checkpoint=True)
    ends with the uninterrupted run's weights, bit for bit."""
    from .test_trainer import CONFIGS as TRAINER_CONFIGS
    from .test_trainer import run

    spec = {"config": TRAINER_CONFIGS["zero3"], "max_steps": 12, "save_steps": 4, "attention_dropout": DROPOUT}
    code, clean, err = run(tmp_path, "clean", {**spec, "output_dir": str(tmp_path / "clean")})
    assert code == 0, err
    code, _, err = run(tmp_path, "kill", {**spec, "output_dir": str(tmp_path / "killed"), "kill_at": 5})
    written = sorted(p.name for p in (tmp_path / "killed").iterdir())
    assert code != 0 and "checkpoint-4" in written and "checkpoint-8" not in written, (written, err)
    code, resumed, err = run(tmp_path, "resume", {**spec, "output_dir": str(tmp_path / "killed"), "resume": True})
    assert code == 0, err
    assert resumed["resumed_at"] == 4 and resumed["global_step"] == 12 and len(resumed["losses"]) == 8
    # the resumed run's first step (5) is mid-phase: block 2's state from the checkpoint, not a fresh optimizer
    assert resumed["state_numel"][0] > 0, resumed["state_numel"]
    differ = [n for n, t in clean["final"].items() if not torch.equal(t, resumed["final"][n])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
