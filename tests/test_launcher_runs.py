"""launch/train.py's outputs across runs in one directory, a changed setting on resume, hub ids from
the local Hugging Face cache, and the memory check (in-process ``lift_ds.train.main``, torch backend,
one process: no process group)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lift_ds.train import main

from helpers import make_model_dir, write_sentiment

CFG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
    "lift": {"backend": "torch"},
}


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    make_model_dir(d / "model", layers=2)
    write_sentiment(d / "train.jsonl", 16)
    (d / "cfg.json").write_text(json.dumps(CFG))
    return d


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


def run(d, out, *extra, capsys=None, model=None):
    argv = [
        "--model",
        str(model or d / "model"),
        "--data",
        str(d / "train.jsonl"),
        "--format",
        "classification",
        "--ds_config",
        str(d / "cfg.json"),
        "--max_steps",
        "6",
        "--save_every",
        "3",
        "--seq_len",
        "32",
        "--eval_batch_size",
        "4",
        "--output_dir",
        str(out),
        "--no_final_model",
        *extra,
    ]
    code = main(argv)
    return code, capsys.readouterr().err if capsys is not None else ""


def steps(out: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_one_output_directory_across_runs(d, tmp_path, capsys, caplog):
    """A second run in a used directory needs --resume (exit 2 otherwise); --resume at the end trains
    nothing and writes nothing; metrics.jsonl stays one run; the end-of-run save does not write the
    step just saved again; a stray global_step_* directory does not break rotation; --overwrite_output_dir
    starts over; another --seed on resume is refused naming it; another --lr is applied."""
    out = tmp_path / "run"
    caplog.set_level("INFO")
    code, err = run(d, out, capsys=capsys)
    assert code == 0, err[-3000:]
    assert caplog.text.count("saved checkpoint") == 2  # steps 3 and 6; the end of the run is step 6, already saved
    assert steps(out) == [1, 2, 3, 4, 5, 6]
    caplog.clear()

    code, err = run(d, out, capsys=capsys)
    assert (
        code == 2 and "is not empty (checkpoints, metrics.jsonl" in err and "--resume" in err and "Traceback" not in err
    )

    (out / "checkpoints" / "global_step_backup").mkdir()
    code, err = run(d, out, "--resume", capsys=capsys)
    assert code == 0, err[-3000:]
    assert "saved checkpoint" not in caplog.text and steps(out) == [1, 2, 3, 4, 5, 6]
    caplog.clear()

    # a run killed after step 4 (its metrics logged, no checkpoint
    # after step 3): resume drops steps 4.. and runs them again
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 7, "loss": 0.0}) + "\n")
    (out / "checkpoints" / "latest").write_text("global_step3")
    code, err = run(d, out, "--resume", "--keep_checkpoints", "1", capsys=capsys)
    assert code == 0, err[-3000:]
    assert steps(out) == [1, 2, 3, 4, 5, 6] and "resumed from" in caplog.text
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["global_step6", "global_step_backup", "latest"]
    caplog.clear()

    code, err = run(d, out, "--resume", "--seed", "1", capsys=capsys)
    assert code == 2 and "data_seed: 0 -> 1 (--seed (the data order))" in err and "Traceback" not in err
    (out / "checkpoints" / "latest").write_text("global_step6")

    code, err = run(d, out, "--overwrite_output_dir", "--max_steps", "4", "--save_every", "0", capsys=capsys)
    assert code == 0, err[-3000:]
    assert "--overwrite_output_dir: removed checkpoints, metrics.jsonl" in caplog.text
    assert steps(out) == [1, 2, 3, 4] and sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "global_step4",
        "latest",
    ]


def test_another_lr_on_resume_is_applied(d, tmp_path, capsys, caplog):
    out = tmp_path / "lr"
    assert run(d, out, "--max_steps", "6", capsys=capsys)[0] == 0
    (out / "checkpoints" / "latest").write_text("global_step3")
    caplog.set_level("INFO")
    code, err = run(d, out, "--resume", "--lr", "5e-4", capsys=capsys)
    assert code == 0, err[-3000:]
    assert "the learning rate changed from 0.001 to 0.0005 since the checkpoint: applied" in caplog.text
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    assert lrs[3] == pytest.approx(1e-3) and lrs[4] == pytest.approx(5e-4)


def test_a_hub_id_found_in_the_local_cache(d, tmp_path, monkeypatch, capsys):
    """--model org/name resolves through huggingface_hub: from the cache under HF_HUB_OFFLINE=1 (the
    way it is downloaded where the hub is reachable); not cached, a clear error."""
    import shutil

    cache = tmp_path / "hf"
    snap = cache / "hub" / "models--lift-ds-test--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(d / "model", snap)
    (cache / "hub" / "models--lift-ds-test--tiny" / "refs").mkdir(parents=True)
    (cache / "hub" / "models--lift-ds-test--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HOME", str(cache))
    code, err = run(
        d,
        tmp_path / "hub",
        "--max_steps",
        "2",
        "--save_every",
        "0",
        "--no_checkpoint",
        capsys=capsys,
        model="lift-ds-test/tiny",
    )
    assert code == 0, err[-3000:]
    code, err = run(d, tmp_path / "hub2", capsys=capsys, model="lift-ds-test/absent")
    assert (
        code == 2
        and "'lift-ds-test/absent' is not a local directory" in err
        and "only the local cache was searched" in err
    )


def test_a_run_that_does_not_fit_in_memory_is_refused_before_loading(d, tmp_path, monkeypatch, capsys):
    """LLaMA-2-7B shapes, Q-LIFT nf4 with the exact weights in host memory, fp32: about 33 GiB, which
    a 24 GiB machine cannot hold (the issue's run grew past 18 GiB and was killed). Refused before any
    weight exists, naming the estimate and the fix; with the store on disk it fits; the tiny model
    against a tiny machine is refused and --skip_memory_check runs it."""
    from lift_ds import preflight

    big = tmp_path / "llama7b"
    big.mkdir()
    cfg = json.loads((d / "model" / "config.json").read_text())
    cfg.update(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        head_dim=128,
    )
    (big / "config.json").write_text(json.dumps(cfg))
    for f in (d / "model").iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            (big / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(preflight, "machine_memory", lambda: (24 * 2**30, "physical memory"))
    import lift_ds.quant_load

    def never(*a, **k):
        raise AssertionError("the 7B model was being built: the memory check did not refuse it")

    monkeypatch.setattr(lift_ds.quant_load, "build_quantized_model", never)
    code, err = run(
        d, tmp_path / "big", "--random_init", "--frozen_weights", "nf4", "--max_steps", "40", capsys=capsys, model=big
    )
    assert code == 2, err[-3000:]
    assert (
        "memory: the estimated peak host memory is 3" in err
        and "GiB (1 rank(s) on this node" in err
        and "Q-LIFT block store in memory 2" in err
    )
    assert (
        "more than this machine's 24.0 GiB (physical memory)" in err
        and "--block_store disk" in err
        and "--skip_memory_check" in err
    )
    from lift_ds.memory import model_shape

    shape = model_shape(str(big))
    args = dict(
        method="lift",
        ranks=1,
        local_ranks=1,
        zero=0,
        precision="fp32",
        offload=False,
        micro_batch=2,
        seq_len=32,
        lora_r=8,
        checkpointing=False,
        frozen="nf4",
        on_gpu=False,
    )
    assert preflight.host_estimate(shape, store="memory", **args)[0] > 30 * 2**30
    # measured: 7.85 GiB (docs/qlift/llama2_7b_nf4.json)
    assert 6 * 2**30 < preflight.host_estimate(shape, store="disk", **args)[0] < 9 * 2**30
    monkeypatch.setattr(preflight, "machine_memory", lambda: (1024, "cgroup memory limit"))
    code, err = run(d, tmp_path / "small", capsys=capsys)
    assert (
        code == 2
        and "more than this machine's 0.0 GiB (cgroup memory limit)" in err
        and "model as loaded (fp32)" in err
    )
    code, err = run(
        d,
        tmp_path / "small2",
        "--skip_memory_check",
        "--max_steps",
        "2",
        "--save_every",
        "0",
        "--no_checkpoint",
        capsys=capsys,
    )
    assert code == 0, err[-3000:]


def test_a_run_too_large_for_the_gpu_is_refused_before_loading(d, tmp_path, monkeypatch, capsys):
    """On a GPU the device estimate per rank is compared with the GPU's memory too (a GPU of 1 KiB
    here, made up: no CUDA call is reached before the refusal)."""
    import types

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=1024, name="tiny GPU")
    )
    code, err = run(d, tmp_path / "gpu", capsys=capsys)
    assert (
        code == 2
        and "memory: the estimated peak device memory per rank is" in err
        and "more than the GPU's 0.0 GiB" in err
    )
    assert "ZeRO-3 or optimizer offload" in err and "Traceback" not in err
