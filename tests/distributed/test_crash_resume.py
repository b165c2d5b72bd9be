"""SIGKILL a 2-rank launch/train.py run at several points, resume with --resume: same final weights.

Faults come from LIFT_DS_FAULTS (lift_ds/faults.py). The plan: 4 layers + head = 5 blocks over 16
steps, grouped: block 1 trains steps 1-4, block 2 steps 5-7, block 3 steps 8-10, ...; checkpoints
every 4 steps, in fp32 so the comparison can be exact.
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

# eps 1e-3: with Adam's default 1e-8 a fresh moment estimate turns float noise (a different reduction
# order, e.g. ZeRO-3 after ZeRO-2) into sign-sized steps; the layout tests compare across such changes
CONFIGS = {
    "zero2": {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2},
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "weight_decay": 0.0, "eps": 1e-3}},
        "lift": {"backend": "deepspeed", "include_head": True},
    },
    "fsdp": {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "weight_decay": 0.0, "eps": 1e-3}},
        "lift": {"backend": "fsdp", "include_head": True},
    },
}
CONFIGS["zero3"] = {**CONFIGS["zero2"], "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
# every step a new phase and every block's Adam state stashed between its phases: the stash must resume anywhere too
CONFIGS["zero2_offload_cyclic"] = {
    **CONFIGS["zero2"],
    "lift": {**CONFIGS["zero2"]["lift"], "policy": "cyclic", "optimizer_state": "offload"},
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("crash")
    make_model_dir(d / "model", layers=4)
    write_sentiment(d / "train.jsonl", 96)
    for name, cfg in CONFIGS.items():
        (d / f"{name}.json").write_text(json.dumps(cfg))
    return d


def launch(
    files: Path, config: str, out: Path, *extra: str, faults: str = "", restarts: int = 0, nproc: int = 2
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LIFT_DS_FAULTS": faults}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
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
        "4",
        "--keep_checkpoints",
        "3",
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


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    diff = max((a[n].float() - b[n].float()).abs().max().item() for n in a)
    assert diff <= 1e-6, diff


uninterrupted_dir: dict[str, Path] = {}


@pytest.fixture(scope="module")
def uninterrupted(files, tmp_path_factory):
    out = {}
    for config in CONFIGS:
        d = tmp_path_factory.mktemp(f"clean-{config}")
        proc = launch(files, config, d)
        assert proc.returncode == 0, proc.stderr[-5000:]
        out[config] = final_weights(d)
        uninterrupted_dir[config] = d
    return out


@pytest.mark.parametrize(
    "config,fault,resumes_from",
    [
        # zero2 mid-phase, rank 1 only (kill@6:1): test_torchrun_elastic_restart_resumes_by_itself, whose
        # restart resumes that kill from global_step4 against the same uninterrupted weights
        ("zero2", "kill@7", "global_step4"),  # right after the switch from block 2 to block 3
        ("zero2", "save_midway@8:0", "global_step4"),  # during the write of checkpoint 8
        ("fsdp", "kill@10:0", "global_step8"),  # FSDP2, right after a switch
        ("zero3", "kill@6:1", "global_step4"),  # ZeRO-3 mid-phase, rank 1 only
    ],
)
def test_sigkill_then_resume_equals_uninterrupted(files, tmp_path, uninterrupted, config, fault, resumes_from):
    out = tmp_path / "run"
    proc = launch(files, config, out, faults=fault)
    assert proc.returncode != 0, "the fault did not fire"
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == resumes_from
    if fault.startswith("save_midway"):
        assert (ckpts / ".global_step8.partial").is_dir()  # the half-written checkpoint was never published
        assert not (ckpts / "global_step8").exists()
    proc = launch(files, config, out, "--resume")
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert f"resumed from {ckpts / resumes_from} at step {resumes_from[len('global_step') :]}" in proc.stderr
    assert not list(ckpts.glob(".*.partial"))
    # the resumed run trained only the steps after the checkpoint
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps[-(16 - int(resumes_from[len("global_step") :])) :] == list(
        range(int(resumes_from[len("global_step") :]) + 1, 17)
    ), steps
    assert_same(final_weights(out), uninterrupted[config])


def initial_weights(files: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(files / "model" / "model.safetensors")


@pytest.mark.parametrize(
    "first,then,nproc,extra",
    [
        # 2 ranks -> 1 rank, 2x accumulation
        ("zero2_offload_cyclic", "zero2_offload_cyclic", 1, ["--gradient_accumulation_steps", "2"]),
        ("zero2", "zero3", 2, []),  # ZeRO-2 -> ZeRO-3
        ("zero2", "fsdp", 2, []),  # DeepSpeed -> FSDP2
        ("fsdp", "zero2", 2, []),  # FSDP2 -> DeepSpeed
    ],
)
def test_resume_on_another_layout(files, tmp_path, uninterrupted, first, then, nproc, extra):
    """Resume the uninterrupted run's mid-phase checkpoint (step 8; block 3 trains steps 8-10, or every
    step is a phase with its block's state stashed) on another number of ranks or another backend,
    keeping the global batch: the final fp32 weights are those of the uninterrupted run."""
    import shutil

    src = uninterrupted_dir[first] / "checkpoints"
    out = tmp_path / "resumed"
    shutil.copytree(src, out / "checkpoints")
    for later in ("global_step12", "global_step16"):
        shutil.rmtree(out / "checkpoints" / later)
    (out / "checkpoints" / "latest").write_text("global_step8")
    proc = launch(files, then, out, "--resume", *extra, nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert f"resumed from {out / 'checkpoints' / 'global_step8'} at step 8" in proc.stderr
    assert "with a changed layout" in proc.stderr
    final, ref, start = final_weights(out), uninterrupted[first], initial_weights(files)
    move = max((ref[n].float() - start[n].float()).abs().max().item() for n in ref)
    err = max((final[n].float() - ref[n].float()).abs().max().item() for n in ref)
    assert move > 1e-3 and err <= 1e-5 * move, (err, move)


def test_torchrun_elastic_restart_resumes_by_itself(files, tmp_path, uninterrupted):
    out = tmp_path / "elastic"
    # one restart: the restarted attempt must rendezvous with itself only (lift_ds prefixes the agent's
    # store per attempt; without it a rank could read its peer's address from the killed attempt)
    proc = launch(files, "zero2", out, "--resume", faults="kill@6:1", restarts=1)
    assert proc.returncode == 0, proc.stderr[-5000:]
    log = proc.stdout + proc.stderr
    assert "no checkpoint in" in log  # the first attempt starts from scratch
    assert "connectFullMesh" not in log
    assert f"resumed from {out / 'checkpoints' / 'global_step4'}" in log  # the restart picks up step 4
    assert_same(final_weights(out), uninterrupted["zero2"])


def test_nan_loss_is_skipped_then_divergence_stops_keeping_the_checkpoint(files, tmp_path):
    out = tmp_path / "nan"
    proc = launch(files, "zero2", out, faults="nan_loss@3:1")
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "1 optimizer steps were skipped" in proc.stdout
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [3]

    out = tmp_path / "diverge"
    bad = ",".join(f"nan_loss@{s}" for s in range(6, 17))
    proc = launch(files, "zero2", out, faults=bad)
    # torchrun exits 1; the ranks exit 3
    assert proc.returncode != 0 and "exitcode  : 3" in proc.stderr, proc.stderr[-5000:]
    assert "training diverged: 5 optimizer steps in a row (steps 6..10" in proc.stderr
    assert "The newest checkpoint is" in proc.stderr and "global_step4" in proc.stderr
    assert (out / "checkpoints" / "latest").read_text() == "global_step4"
    assert not (out / "final").exists()


#: rank 0's file operations in one save (lift_ds.checkpoint / checkpoint_io / train.Run.save): 1-6 write the
#: files (directory, weights, optimizer state, rank state, stash, lift_state.json), 7 the manifest, 8 the
#: new latest (intent), 9 the rename into place, 10 latest replaced, 11-12 the rotation of the oldest
#: checkpoint (renamed aside, removed) once more than --keep_checkpoints exist. Rank 1: its rank state and stash.
PRE_MANIFEST = [(0, n) for n in range(1, 7)] + [(1, 1), (1, 2)]


def kill_plan() -> list[tuple[int, int, int]]:
    """``(save step, rank, n)`` for one attempt each, in an order every attempt reaches: a kill before
    the manifest leaves the save to be done again (the same step can host the next kill), one after it
    leaves that checkpoint complete (the next kill is at a later save)."""
    plan = [(2, r, n) for r, n in PRE_MANIFEST] + [
        (2, 0, 7),
        (4, 0, 8),
        (6, 0, 9),
        (8, 0, 10),
        (10, 0, 11),
        (12, 0, 12),
    ]
    return plan + [(14, r, n) for r, n in PRE_MANIFEST] + [(14, 0, 7), (16, 0, 10)]


@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_sigkill_at_every_file_operation_of_a_save_resumes_exactly(files, tmp_path, uninterrupted, config):
    """SIGKILL one rank right after each file operation of a checkpoint save (24 kill points: every
    operation of rank 0's save before and after its manifest, rank 1's, a rotation's), one kill per
    attempt, each attempt restarting the run with --resume (tests/distributed/fork_restarts.py, which
    restarts like torchrun --max-restarts without paying the imports again). Every kill fires, and the
    last attempt's final weights are the uninterrupted run's, bit for bit; nothing half-written is left."""
    plan = kill_plan()
    faults = ",".join(f"save_op@{s}.{n}:{r}#{a}" for a, (s, r, n) in enumerate(plan))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LIFT_DS_FAULTS": faults}
    cmd = [
        sys.executable,
        "tests/distributed/fork_restarts.py",
        "--attempts",
        str(len(plan) + 1),
        "--log",
        str(tmp_path / "logs"),
        "--",
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
        "2",
        "--keep_checkpoints",
        "2",
        "--seq_len",
        "32",
        "--output_dir",
        str(out),
        "--resume",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    attempts = result["attempts"]
    logs = lambda a: "".join((tmp_path / "logs" / f"attempt{a}.rank{r}.log").read_text()[-3000:] for r in range(2))  # noqa: E731
    assert len(plan) >= 20 and len(attempts) == len(plan) + 1, (attempts, logs(len(attempts) - 1))
    for a, (s, r, n) in enumerate(plan):
        assert attempts[a][r] == -9, (a, (s, r, n), attempts[a], logs(a))  # the planned kill fired (SIGKILL)
    assert attempts[-1] == [0, 0], logs(len(plan))
    # nothing complete is lost: the next attempt resumes from the newest complete save
    for a, (s, r, n) in enumerate(plan):
        # after the manifest (rank 0's 7th operation) the save at s is complete
        step = s if r == 0 and n >= 7 else s - 2
        log = (tmp_path / "logs" / f"attempt{a + 1}.rank0.log").read_text()
        want = (
            f"resumed from {out / 'checkpoints' / f'global_step{step}'} at step {step}" if step else "no checkpoint in"
        )
        assert want in log, (a + 1, (s, r, n), want)
    assert_same(final_weights(out), uninterrupted[config])
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "global_step16" and not [
        p for p in ckpts.iterdir() if p.name.startswith(".")
    ]
    from lift_ds import checkpoint_io

    kept = sorted((p for p in ckpts.iterdir() if p.is_dir()), key=lambda p: int(p.name[len("global_step") :]))
    # older ones stay when the kill cut the save's rotation short
    assert [p.name for p in kept[-2:]] == ["global_step14", "global_step16"]
    assert all(checkpoint_io.verify(p) is None for p in kept), [(p.name, checkpoint_io.verify(p)) for p in kept]
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, 17)), steps
    print(
        f"{config}: {len(plan)} kill points, attempt seconds {result['seconds']}, "
        f"CPU seconds of all ranks {result['rank_cpu_seconds']}"
    )
