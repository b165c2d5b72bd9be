"""The drop-in promise, shown with the loops people run, on 2 CPU ranks and a tiny LLaMA: a
DeepSpeed-Chat step-1 shaped loop (``lift_ds.initialize`` for ``deepspeed.initialize``), a ``run_clm.py``
shaped script (``LiftTrainer`` for ``Trainer``), and TRL's shipped ``trl/scripts/sft.py`` with
``SFTTrainer`` swapped for ``LiftSFTTrainer`` (``tests/distributed/clients/``), each with a ``"lift"``
section in its DeepSpeed config and nothing else changed.

Checked for each: only the planned blocks move (the embedding and layer 1 stay bit-identical), the loss
falls, every parameter's weight decay is what the script asked (no decay for norms and biases) in every
phase's optimizer, and a run killed after a checkpoint and resumed equals the uninterrupted run within
1e-6 of the largest move. DeepSpeed-Chat's loop also runs ZeRO-3 + gradient checkpointing (equal to
ZeRO-3 without it), ZeRO-1/2 + checkpointing and FSDP2 + checkpointing (equal to ZeRO-2 without it), and
its built ``get_scheduler`` curve equals the same scheduler stepped on a plain loop. Runs share 4
launches (``clients/run_many.py``).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .launch import REPO
from helpers import NEGATIVE, POSITIVE, lm_batches, make_model_dir

pytestmark = pytest.mark.slow

CLIENTS = Path(__file__).with_name("clients")
DSCHAT, CLM, SFT = CLIENTS / "dschat_step1.py", CLIENTS / "run_clm_lift.py", CLIENTS / "trl_sft_swapped.py"
# model.layers.1-3 and the head; the embedding and model.layers.0 never train
LIFT = {"layer_range": [2, 4], "include_head": True}
FROZEN = ("model.embed_tokens.", "model.layers.0.")
NO_DECAY = ("norm.weight", "bias")
AUTO = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
KILL, SAVE_EVERY = 6, 4
#: launch name -> (exit code, output tail), filled by the fixture
LAUNCHED: dict[str, tuple[int, str]] = {}


def write_files(d: Path) -> None:
    make_model_dir(d / "model", layers=4)
    rows = lm_batches(72, batch=1, seq=16, vocab=16, seed=3)  # few distinct tokens: the loss falls within a few steps
    (d / "tokens.jsonl").write_text("".join(json.dumps({"input_ids": r["input_ids"][0].tolist()}) + "\n" for r in rows))
    rng = random.Random(0)
    lines = [rng.choice(POSITIVE + NEGATIVE) for _ in range(240)]
    (d / "train.txt").write_text("\n".join(lines[:200]) + "\n")
    (d / "validation.txt").write_text("\n".join(lines[200:]) + "\n")
    (d / "sft-data").mkdir()
    for split, part in (("train", lines[:200]), ("test", lines[200:])):
        (d / "sft-data" / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    # run_clm: ZeRO-3 with Trainer's --gradient_checkpointing; sft.py:
    # ZeRO-2 with no bf16 key (SFTConfig's bf16 default then holds)
    (d / "clm_zero3.json").write_text(
        json.dumps(
            {
                **AUTO,
                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                "lift": {"backend": "deepspeed", **LIFT},
            }
        )
    )
    (d / "sft_zero2.json").write_text(
        json.dumps({**AUTO, "zero_optimization": {"stage": 2}, "lift": {"backend": "deepspeed", **LIFT}})
    )


def dschat(d: Path, name: str, *extra: str, lift: dict | None = None) -> dict:
    # DeepSpeed-Chat builds its DeepSpeed config in code: the "lift" section (no total_steps: the built schedule's
    # num_training_steps) goes in a file given to DeepSpeed's --deepspeed_config flag
    (d / f"{name}.lift.json").write_text(json.dumps({"lift": {**LIFT, **(lift or {})}}))
    argv = [
        "--data_path",
        str(d / "tokens.jsonl"),
        "--model_name_or_path",
        str(d / "model"),
        "--weight_decay",
        "0.1",
        "--learning_rate",
        "1e-2",
        "--num_warmup_steps",
        "2",
        "--deepspeed_config",
        str(d / f"{name}.lift.json"),
        "--record",
        str(d / f"{name}.pt"),
        *extra,
    ]
    return {"script": str(DSCHAT), "argv": argv, "env": {"LIFT_DS_TRACE": str(d / f"{name}.trace")}}


def clm(d: Path, name: str, *extra: str, env: dict | None = None) -> dict:
    argv = [
        "--model_name_or_path",
        str(d / "model"),
        "--train_file",
        str(d / "train.txt"),
        "--validation_file",
        str(d / "validation.txt"),
        "--block_size",
        "16",
        "--do_train",
        "--do_eval",
        "--output_dir",
        str(d / name),
        "--deepspeed",
        str(d / "clm_zero3.json"),
        "--gradient_checkpointing",
        "--per_device_train_batch_size",
        "2",
        "--per_device_eval_batch_size",
        "4",
        "--max_steps",
        "8",
        "--learning_rate",
        "3e-2",
        "--weight_decay",
        "0.1",
        "--save_steps",
        str(SAVE_EVERY),
        "--logging_steps",
        "1",
        "--report_to",
        "none",
        "--use_cpu",
        "--seed",
        "0",
        "--disable_tqdm",
        "true",
        *extra,
    ]
    return {"script": str(CLM), "argv": argv, "env": {"LIFT_DS_TRACE": str(d / f"{name}.trace"), **(env or {})}}


def sft(d: Path, name: str, *extra: str, env: dict | None = None) -> dict:
    argv = [
        "--model_name_or_path",
        str(d / "model"),
        "--dataset_name",
        str(d / "sft-data"),
        "--deepspeed",
        str(d / "sft_zero2.json"),
        "--output_dir",
        str(d / name),
        "--max_steps",
        "8",
        "--per_device_train_batch_size",
        "2",
        "--per_device_eval_batch_size",
        "4",
        "--learning_rate",
        "3e-2",
        "--weight_decay",
        "0.1",
        "--logging_steps",
        "1",
        "--save_steps",
        str(SAVE_EVERY),
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "4",
        "--max_length",
        "32",
        "--report_to",
        "none",
        "--use_cpu",
        "--seed",
        "0",
        "--disable_tqdm",
        "true",
        *extra,
    ]
    return {"script": str(SFT), "argv": argv, "env": {"LIFT_DS_TRACE": str(d / f"{name}.trace"), **(env or {})}}


def launch(d: Path, name: str, runs: dict) -> tuple[int, str]:
    (d / f"{name}.runs.json").write_text(json.dumps(runs))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{REPO}:{REPO / 'tests'}",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_DATASETS_CACHE": str(d / "hf-datasets"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(CLIENTS / "run_many.py"),
        str(d / f"{name}.runs.json"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env, cwd=REPO)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    d = tmp_path_factory.mktemp("clients")
    write_files(d)
    kill = {"LIFT_DS_FAULTS": f"kill@{KILL}"}
    launches = {
        "one": {
            "z3": dschat(d, "z3", "--zero_stage", "3"),
            "z3gc": dschat(d, "z3gc", "--zero_stage", "3", "--gradient_checkpointing"),
            "z3gc_offload": dschat(d, "z3gc_offload", "--zero_stage", "3", "--gradient_checkpointing", "--offload"),
            "z3gc_stop": dschat(
                d,
                "z3gc_stop",
                "--zero_stage",
                "3",
                "--gradient_checkpointing",
                "--stop_after",
                str(KILL),
                "--save_dir",
                str(d / "ds-ckpt"),
            ),
            "z3gc_resume": dschat(
                d, "z3gc_resume", "--zero_stage", "3", "--gradient_checkpointing", "--resume_dir", str(d / "ds-ckpt")
            ),
            "z2": dschat(d, "z2", "--zero_stage", "2"),
            "z2gc": dschat(d, "z2gc", "--zero_stage", "2", "--gradient_checkpointing"),
            "z1gc": dschat(d, "z1gc", "--zero_stage", "1", "--gradient_checkpointing"),
            "fsdpgc": dschat(d, "fsdpgc", "--zero_stage", "0", "--gradient_checkpointing", lift={"backend": "fsdp"}),
            "z2bf16": dschat(
                d,
                "z2bf16",
                "--zero_stage",
                "2",
                "--dtype",
                "bf16",
                "--output_dir",
                str(d / "dschat-out"),
                "--csv_monitor",
                str(d / "monitor"),
            ),
            "clm": clm(d, "clm"),
            "clm_killed": clm(d, "clm_killed", env=kill),
        },
        "two": {
            "clm_resumed": clm(
                d, "clm_killed", "--resume_from_checkpoint", str(d / "clm_killed" / f"checkpoint-{SAVE_EVERY}")
            ),
            "sft": sft(d, "sft"),
        },
        "three": {"sft_killed": sft(d, "sft_killed", env=kill)},
        "four": {
            "sft_resumed": sft(
                d, "sft_killed", "--resume_from_checkpoint", str(d / "sft_killed" / f"checkpoint-{SAVE_EVERY}")
            )
        },
    }
    for name, runs in launches.items():
        LAUNCHED[name] = launch(d, name, runs)
    return d


def _launch_ok(d: Path, name: str, killed: bool = False) -> None:
    """The launch ran every run; a killed one ended by LIFT_DS_FAULTS' SIGKILL in its last run, not by an error."""
    code, out = LAUNCHED[name]
    fine = not re.search(r"\[rank\d+\]: Traceback", out) and (
        (code != 0 and "exitcode: -9" in out) if killed else code == 0
    )
    assert fine, f"launch {name}: exit {code}\n{out[-8000:]}"


def record(d: Path, name: str) -> dict:
    _launch_ok(d, "one", killed=True)
    assert (d / f"{name}.pt").is_file(), f"{name} wrote no record\n{LAUNCHED['one'][1][-8000:]}"
    return torch.load(d / f"{name}.pt", weights_only=False)


def base_weights(d: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(d / "model" / "model.safetensors")).items()}


def saved_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()}


def assert_only_planned_blocks_moved(start: dict, final: dict, dtype: torch.dtype = torch.float32) -> None:
    """The never-trained blocks are bit-identical; every trained tensor moved (in bf16, where an update below
    half a bf16 step leaves a weight as it was while its fp32 master moves, every trained block moved)."""
    moved_blocks: dict[str, bool] = {}
    for n, t in start.items():
        same = torch.equal(t.to(dtype).float(), final[n].float())
        if n.startswith(FROZEN):
            assert same, (n, "moved")
            continue
        block = ".".join(n.split(".")[:3]) if n.startswith("model.layers.") else "head"
        moved_blocks[block] = moved_blocks.get(block, False) or not same
        assert not same or dtype != torch.float32, (n, "did not move")
    assert moved_blocks == {b: True for b in ("model.layers.1", "model.layers.2", "model.layers.3", "head")}, (
        moved_blocks
    )


def assert_close_to(got: dict, want: dict, start: dict, rel: float) -> None:
    err = max((got[n].float() - want[n].float()).abs().max().item() for n in want)
    move = max((want[n].float() - start[n].float()).abs().max().item() for n in want)
    assert move > 1e-3 and err <= rel * move, (err, move)


def assert_weight_decay_per_group(trace: Path, weight_decay: float, blocks: int = 4) -> None:
    """Every phase's optimizer: decay for all but norms and biases, none for those."""
    phases = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len({p["block"] for p in phases}) == blocks, [p["block"] for p in phases]
    for p in phases:
        seen = {n: g["weight_decay"] for g in p["groups"] for n in g["params"]}
        assert seen and all(wd == (0.0 if n.endswith(NO_DECAY) else weight_decay) for n, wd in seen.items()), (
            p["block"],
            seen,
        )
        assert any(wd == 0.0 for wd in seen.values()) and any(wd == weight_decay for wd in seen.values()), p


# ----------------------------------------------------------------- DeepSpeed-Chat step 1


def test_dschat_zero3_with_gradient_checkpointing_equals_without(d):
    z3, gc = record(d, "z3"), record(d, "z3gc")
    assert_only_planned_blocks_moved(z3["start"], gc["final"])
    assert_close_to(gc["final"], z3["final"], z3["start"], rel=1e-5)  # float noise at most
    assert gc["eval"][-1] < gc["eval"][0] - 0.1, gc["eval"]
    # --offload: DeepSpeed-Chat's built DeepSpeedCPUAdam over offloaded partitions (no optimizer section in the config)
    off = record(d, "z3gc_offload")
    assert_only_planned_blocks_moved(z3["start"], off["final"])
    # CPU Adam kernel vs torch AdamW: 1.8e-4 seen; a lost weight decay is ~1e-2
    assert_close_to(off["final"], z3["final"], z3["start"], rel=1e-3)


def test_dschat_zero1_zero2_and_fsdp2_with_gradient_checkpointing_equal_zero2_without(d):
    z2 = record(d, "z2")
    assert_only_planned_blocks_moved(z2["start"], z2["final"])
    for name in ("z1gc", "z2gc", "fsdpgc"):
        r = record(d, name)
        assert_only_planned_blocks_moved(z2["start"], r["final"])
        assert_close_to(r["final"], z2["final"], z2["start"], rel=1e-5)


def test_dschat_resume_equals_uninterrupted(d):
    """DeepSpeed's save_checkpoint / load_checkpoint in the same loop, ZeRO-3 + checkpointing: the
    resumed run's weights equal the uninterrupted run's, and it ran only the remaining steps."""
    full, stopped, resumed = record(d, "z3gc"), record(d, "z3gc_stop"), record(d, "z3gc_resume")
    assert stopped["global_steps"] == KILL and resumed["global_steps"] == full["global_steps"] == 16
    assert len(resumed["losses"]) == 16 - KILL
    assert resumed["losses"] == pytest.approx(full["losses"][KILL:], abs=1e-6)
    assert_close_to(resumed["final"], full["final"], full["start"], rel=1e-6)


def test_dschat_parameter_groups_schedule_and_engine_members(d):
    """The optimizer DeepSpeed steps in each phase holds the script's two groups (weight decay 0.1, and
    0.0 for norms), the built get_scheduler curve equals the same scheduler on a plain loop, bf16 from
    DeepSpeed-Chat's "bfloat16" section, the engine members it reads (model.model, tput_timer,
    named_modules, module.state_dict) worked: it saved a Hugging Face format model, and DeepSpeed's
    monitor wrote one lr curve against the run's sample count."""
    from transformers import get_scheduler

    r = record(d, "z2bf16")
    assert_only_planned_blocks_moved(r["start"], r["final"], dtype=torch.bfloat16)
    # DeepSpeed's own groups (ZeRO-2's bit16_groups), as the phase's engine holds them
    for step, groups in enumerate(r["groups"]):
        assert groups and all(wd == (0.0 if n.endswith(NO_DECAY) else 0.1) for n, (wd, _) in groups.items()), (
            step,
            groups,
        )
    assert_weight_decay_per_group(d / "z2bf16.trace", 0.1)
    plain = torch.optim.AdamW(
        [
            {"params": [torch.nn.Parameter(torch.zeros(1))], "weight_decay": 0.1},
            {"params": [torch.nn.Parameter(torch.zeros(1))], "weight_decay": 0.0},
        ],
        lr=1e-2,
    )
    sched = get_scheduler("cosine", optimizer=plain, num_warmup_steps=2, num_training_steps=16)
    want = []
    for _ in range(16):
        plain.step()
        sched.step()
        want.append(sched.get_last_lr())
    assert [lr for step in r["lrs"] for lr in step] == pytest.approx([lr for step in want for lr in step], abs=1e-12)
    # the lr each phase optimizer used at each step is the plain loop's lr before that step
    used = [sorted({lr for _, lr in g.values()}) for g in r["groups"]]
    assert used == [[lr] for lr in [1e-2 * 0.0] + [w[0] for w in want[:-1]]], used
    assert r["epochs"] == 1 and r["samples_per_sec"] > 0
    # the engine's monitor: one for the run, its x axis the run's
    # samples (each phase's DeepSpeed engine would restart at 0)
    rows = [line.split(",") for line in (d / "monitor" / "step1" / "Train_Samples_lr.csv").read_text().splitlines()[1:]]
    assert [int(s) for s, _ in rows] == [4 * k for k in range(1, 17)] and [float(v) for _, v in rows] == pytest.approx(
        [w[0] for w in want]
    )
    saved = torch.load(d / "dschat-out" / "pytorch_model.bin", weights_only=True)
    assert torch.equal(
        saved["model.layers.1.mlp.up_proj.weight"].float(), r["final"]["model.layers.1.mlp.up_proj.weight"]
    )
    assert json.loads((d / "dschat-out" / "config.json").read_text())["num_hidden_layers"] == 4


# ----------------------------------------------------------------- run_clm.py


def test_run_clm_trains_evaluates_and_resumes(d):
    """--do_train --do_eval: compute_metrics' accuracy and the perplexity are reported, train_results.json
    has train_loss, checkpoint-4 loads with from_pretrained, and a run killed at step 6 and resumed from
    checkpoint-4 ends with the uninterrupted run's weights."""
    from transformers import AutoModelForCausalLM

    _launch_ok(d, "one", killed=True)
    _launch_ok(d, "two")
    start, full, resumed = base_weights(d), saved_weights(d / "clm"), saved_weights(d / "clm_killed")
    assert_only_planned_blocks_moved(start, full)
    assert_close_to(resumed, full, start, rel=1e-6)
    train = json.loads((d / "clm" / "train_results.json").read_text())
    evaluated = json.loads((d / "clm" / "eval_results.json").read_text())
    assert train["train_loss"] > 0 and train["train_samples"] > 0 and "train_runtime" in train
    assert 0 <= evaluated["eval_accuracy"] <= 1 and evaluated["perplexity"] > 1
    history = json.loads((d / "clm" / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 8 and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, losses
    ckpt = d / "clm_killed" / f"checkpoint-{SAVE_EVERY}"
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert (ckpt / "trainer_state.json").is_file() and (ckpt / "lift_state.json").is_file()
    assert model.config.num_hidden_layers == 4
    assert_weight_decay_per_group(d / "clm.trace", 0.1)
    assert (d / "clm" / "README.md").is_file()  # create_model_card (push_to_hub off)


# ----------------------------------------------------------------- TRL's sft.py


def test_trl_sft_script_with_the_class_swapped(d):
    """TRL's own sft.py (model= a string, an eval dataset, peft_config None, trainer.end()), ZeRO-2 with no
    bf16 key: SFTConfig's bf16 holds, only the planned blocks move, evaluation runs, and the resumed run
    equals the uninterrupted one."""
    _launch_ok(d, "two")
    _launch_ok(d, "three", killed=True)
    _launch_ok(d, "four")
    start, full, resumed = base_weights(d), saved_weights(d / "sft"), saved_weights(d / "sft_killed")
    from safetensors.torch import load_file

    # SFTConfig's bf16
    assert load_file(str(d / "sft" / "model.safetensors"))["model.layers.1.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert_only_planned_blocks_moved(start, full, dtype=torch.bfloat16)
    assert_close_to(resumed, full, start, rel=1e-6)
    state = json.loads((d / "sft" / "checkpoint-8" / "trainer_state.json").read_text())
    history = state["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 8 and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, losses
    assert [h["step"] for h in history if "eval_loss" in h] == [4, 8]
    assert_weight_decay_per_group(d / "sft.trace", 0.1)
