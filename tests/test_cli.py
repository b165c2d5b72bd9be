"""launch/train.py refuses bad input with exit code 2 and a message naming the field, before any process group."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_model_dir, write_sentiment

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    make_model_dir(d / "model", layers=4)
    write_sentiment(d / "train.jsonl", 16)
    (d / "broken.jsonl").write_text('{"text": "fine", "label": "positive"}\n{"text": "broken", "label": \n')
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "lift": {"backend": "torch"},
    }
    (d / "ok.json").write_text(json.dumps(cfg))
    (d / "typo.json").write_text(json.dumps({**cfg, "lift": {"backend": "torch", "shedule": "random"}}))
    (d / "bad.json").write_text('{"lift": {"backend": "torch",}}')
    return d


def run(args, files, flags=()):
    base = [
        "--model",
        str(files / "model"),
        "--data",
        str(files / "train.jsonl"),
        "--format",
        "classification",
        "--ds_config",
        str(files / "ok.json"),
        "--max_steps",
        "8",
        "--output_dir",
        str(files / "out"),
    ]
    merged = dict(zip(base[::2], base[1::2]))
    merged.update(dict(zip(args[::2], args[1::2])))
    argv = [x for kv in merged.items() for x in kv]
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), *argv, *flags],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--data", "/nonexistent/train.jsonl"], ["--data", "/nonexistent/train.jsonl", "does not exist"]),
        (["--ds_config", "/nonexistent.json"], ["--ds_config", "does not exist"]),
        (["--ds_config", "{files}/bad.json"], ["not valid JSON at line 1"]),
        (["--ds_config", "{files}/typo.json"], ["lift.shedule: unknown key", "schedule"]),
        (["--data", "{files}/broken.jsonl"], ["broken.jsonl:2: invalid JSON"]),
        (
            ["--max_steps", "3"],
            ["--max_steps: 3 is below the 4 candidate blocks", "1 blocks would never train", "--layer_range"],
        ),
        (["--layer_range", "2,9"], ["lift.layer_range", "past the model's 4 layers"]),
        (["--max_steps", "0"], ["lift.total_steps: must be an integer >= 1", "[set by --max_steps]"]),
    ],
)
def test_bad_input_exit_2_with_clear_message(files, args, needles):
    args = [a.replace("{files}", str(files)) for a in args]
    proc = run(args, files)
    assert proc.returncode == 2, proc.stderr[-2000:]
    for n in needles:
        assert n in proc.stderr, (n, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    assert "init_distributed" not in proc.stderr and "process group" not in proc.stderr.lower()


def test_unknown_format_is_refused_by_argparse(files):
    proc = run(["--format", "csv"], files)
    assert proc.returncode == 2 and "--format" in proc.stderr and "invalid choice" in proc.stderr


def test_classifier_head_run_single_process(files, tmp_path):
    """--classifier_head: a new sequence-classification head trains in every phase; final/ loads as such.
    With --no_checkpoint (a study's run) nothing but final/ is written: no checkpoint, not even the last."""
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "head"
    proc = run(
        ["--eval_data", str(files / "train.jsonl"), "--max_steps", "8", "--output_dir", str(out), "--lr", "0.01"],
        files,
        flags=["--classifier_head", "--no_checkpoint"],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out accuracy: before" in proc.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"eval_accuracy", "eval_loss"} <= set(records[0]) and records[1]["phase"] == 1
    assert sum("loss" in r for r in records) == 8
    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert model.score.weight.shape[0] == 2
    assert not (out / "checkpoints").exists() and "saved checkpoint" not in proc.stderr
    assert "always_trainable" in proc.stderr and '"score"' in proc.stderr  # logged merged config names the head


def test_classifier_head_needs_classification_format(files):
    proc = run(["--format", "text"], files, flags=["--classifier_head"])
    assert proc.returncode == 2 and "--classifier_head: needs --format classification" in proc.stderr


@pytest.mark.slow
def test_zero_section_without_backend_runs_on_deepspeed(files, tmp_path):
    """A DeepSpeed config with zero_optimization and a lift section without "backend" runs on
    DeepSpeed (one process, no launcher) and the log says why."""
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 2},
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "lift": {"include_head": True},
    }
    (files / "zero_no_backend.json").write_text(json.dumps(cfg))
    proc = run(
        ["--ds_config", str(files / "zero_no_backend.json"), "--max_steps", "5", "--output_dir", str(tmp_path / "out")],
        files,
        flags=["--no_final_model"],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "backend deepspeed, chosen by the config's zero_optimization section" in proc.stderr
    assert "backend=deepspeed" in proc.stderr and "saved checkpoint" in proc.stderr


@pytest.mark.parametrize("baseline", ["full", "lora"])
def test_the_old_spelling_of_a_baseline_names_its_flag(files, capsys, baseline):
    """``--method full`` / ``--method lora`` (a baseline under lift.method's flag, as before issue 25):
    exit code 2 before anything starts, the message naming ``--baseline``."""
    from lift_ds.train import main

    with pytest.raises(SystemExit) as e:
        main(["--model", str(files / "model"), "--data", str(files / "train.jsonl"), "--method", baseline])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert f"--method: '{baseline}' is a baseline, not a lift.method; use --baseline {baseline}" in err, err


@pytest.mark.parametrize("baseline", ["full", "lora"])
def test_a_baseline_run_single_process(files, tmp_path, monkeypatch, capsys, baseline):
    """``--baseline full`` trains every tensor, ``--baseline lora`` only the attention projections
    (adapters merged into final/); result.json records the baseline as its "method", as before."""
    import torch
    from transformers import AutoModelForCausalLM

    from lift_ds.train import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    out = tmp_path / baseline
    code = main(
        [
            "--model",
            str(files / "model"),
            "--data",
            str(files / "train.jsonl"),
            "--format",
            "classification",
            "--ds_config",
            str(files / "ok.json"),
            "--baseline",
            baseline,
            "--max_steps",
            "2",
            "--seq_len",
            "32",
            "--output_dir",
            str(out),
            "--no_checkpoint",
        ]
    )
    assert code == 0, capsys.readouterr().err[-3000:]
    assert json.loads((out / "result.json").read_text())["method"] == baseline
    start = dict(AutoModelForCausalLM.from_pretrained(files / "model").named_parameters())
    final = dict(AutoModelForCausalLM.from_pretrained(out / "final").named_parameters())
    assert start.keys() == final.keys()
    changed = {n for n in start if not torch.equal(start[n], final[n])}
    if baseline == "full":
        assert changed == set(start)
    else:
        assert changed and all(n.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj", "o_proj") for n in changed), (
            changed
        )


def test_the_comparison_study_spells_each_method_with_its_flag():
    """lift_ds.analysis compare's launcher flags per label parse: the baselines through --baseline."""
    from lift_ds.analysis.compare import METHOD_FLAGS
    from lift_ds.cli import build_parser

    for label, flags in METHOD_FLAGS.items():
        args = build_parser().parse_args(flags)
        assert (args.baseline, args.method) == (
            (label, None) if label in ("full", "lora") else (None, label.split("-")[0])
        ), label
