"""End to end: launch/train.py under the deepspeed launcher (ZeRO-2) and torchrun (ZeRO-3), 2 CPU ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import make_model_dir, write_sentiment

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def launch(launcher: str, config: str, files: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}
    if launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "launch/train.py"]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "launch/train.py",
        ]
    cmd += [
        "--ds_config",
        config,
        "--model",
        str(files / "model"),
        "--data",
        str(files / "train.jsonl"),
        "--eval_data",
        str(files / "eval.jsonl"),
        "--format",
        "classification",
        "--max_steps",
        "16",
        "--save_every",
        "8",
        "--lr",
        "0.01",
        "--include_head",
        "--seq_len",
        "32",
        "--output_dir",
        str(out),
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("launch")
    make_model_dir(d / "model", layers=4)
    write_sentiment(d / "train.jsonl", 96)
    write_sentiment(d / "eval.jsonl", 16, seed=1)
    return d


def train_losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "launcher,config",
    [
        ("deepspeed", "ds_configs/zero2.json"),
        ("torchrun", "ds_configs/zero3.json"),
        ("torchrun", "ds_configs/fsdp.json"),
    ],
)
def test_train_resume_and_export(files, tmp_path, launcher, config):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    proc = launch(launcher, config, files, out)
    assert "held-out accuracy: before" in proc.stdout + proc.stderr
    losses = train_losses(out)
    assert len(losses) == 16 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3, losses
    final = final_weights(out)
    # the exported model is the engine's: every weight the last checkpoint holds is in final/ unchanged
    ckpt = load_file(out / "checkpoints" / "global_step16" / "weights.safetensors")
    assert len(ckpt) > 0
    for n, t in ckpt.items():
        assert torch.equal(final[n].to(t.dtype), t), n

    # resume from the mid-run checkpoint (step 8, mid-plan) in a copy: the result is the same model
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints", resumed / "checkpoints")
    shutil.rmtree(resumed / "checkpoints" / "global_step16")
    (resumed / "checkpoints" / "latest").write_text("global_step8")
    proc = launch(launcher, config, files, resumed, "--resume")
    assert "resumed from" in proc.stdout + proc.stderr
    assert len(train_losses(resumed)) == 8
    again = final_weights(resumed)
    for n in final:
        assert torch.equal(final[n], again[n]), n
    if launcher == "deepspeed":
        # one rank instead of two halves the global batch: refused with exit 2 (--allow_batch_change accepts it)
        cmd = [
            sys.executable,
            "launch/train.py",
            "--ds_config",
            config,
            "--model",
            str(files / "model"),
            "--data",
            str(files / "train.jsonl"),
            "--format",
            "classification",
            "--max_steps",
            "16",
            "--lr",
            "0.01",
            "--include_head",
            "--seq_len",
            "32",
            "--output_dir",
            str(out),
            "--resume",
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO
        )
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert (
            "the global batch changes from 8 to 4 samples per optimizer step" in proc.stderr
            and "--allow_batch_change" in proc.stderr
        )
        assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("baseline", ["full", "lora"])
def test_baselines_in_the_same_harness(files, tmp_path, baseline):
    from transformers import AutoModelForCausalLM

    out = tmp_path / baseline
    launch("deepspeed", "ds_configs/zero2.json", files, out, "--baseline", baseline, "--save_every", "0")
    losses = train_losses(out)
    drop = {"full": 0.3, "lora": 0.1}[baseline]  # rank-8 adapters (B starts at zero) move more slowly
    assert len(losses) == 16 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - drop, losses
    start = AutoModelForCausalLM.from_pretrained(files / "model")
    final = final_weights(out)
    assert not any("lora" in n for n in final)
    # zero2.json trains in bf16: compare at that precision (frozen weights are only rounded)
    changed = {n for n, p in start.named_parameters() if not torch.equal(p.detach().bfloat16(), final[n].bfloat16())}
    if baseline == "full":
        assert len(changed) == len(final)  # every tensor trained
    else:
        # merged adapters only
        assert changed and all(any(k in n for k in ("q_proj", "k_proj", "v_proj", "o_proj")) for n in changed)


def test_quantized_frozen_layers_through_the_launcher(files, tmp_path):
    """Q-LIFT end to end: torchrun, ZeRO-2, nf4, a disk block store per rank, the model built layer by
    layer from the checkpoint; the store holds the trained layers only. Layers 1 and 4 never train: the
    export holds them bit-identical to the checkpoint (in zero2.json's bf16, the training dtype, as without
    Q-LIFT); the trained layers moved; the loss falls."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    proc = launch(
        "torchrun",
        "ds_configs/zero2.json",
        files,
        out,
        "--frozen_weights",
        "nf4",
        "--block_store",
        "disk",
        "--block_store_dir",
        str(tmp_path / "store"),
        "--layer_range",
        "2,3",
    )
    assert "built LlamaForCausalLM layer by layer: 4 layers in nf4" in proc.stdout + proc.stderr
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["rank0", "rank1"]
    # backed by its origin (the checkpoint's shards), the store writes only the layers that trained (issue 29)
    assert sorted(p.name for p in (tmp_path / "store" / "rank0").glob("*.safetensors")) == [
        "model.layers.1.safetensors",
        "model.layers.2.safetensors",
    ]
    losses = train_losses(out)
    assert len(losses) == 16 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3, losses
    start = {
        n: p.detach().to(torch.bfloat16)
        for n, p in AutoModelForCausalLM.from_pretrained(files / "model").named_parameters()
    }
    final = {n: t.to(torch.bfloat16) for n, t in final_weights(out).items()}
    assert sorted(final) == sorted(start)
    for n in start:
        if n.startswith(("model.layers.0.", "model.layers.3.", "model.embed_tokens")):
            assert torch.equal(final[n], start[n]), n
        if n.startswith(("model.layers.1.", "model.layers.2.")) and n.endswith("proj.weight"):
            assert not torch.equal(final[n], start[n]), n
