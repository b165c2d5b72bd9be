"""LiftPlugin inside axolotl 0.19.0: ``axolotl train`` on 2 CPU ranks, in axolotl's own venv
(scripts/axolotl_venv.sh, built once under .cache/ and reused), a tiny local LLaMA, a local JSONL dataset.

Four processes in all: LISA under ZeRO-2 with the ``"lift"`` section in the DeepSpeed JSON; the same
run from ``lift:`` keys in the YAML, killed after step 5, then resumed from checkpoint-3 (mid-period) by
``auto_resume_from_checkpoints`` (it must end bit for bit where the first one did); and a config with
conflicting axolotl keys that must be refused at validation (axolotl's python launcher, one process).
A second plugin (axolotl_probe.py) records per rank the optimizer state held and what is trainable
at every step. Telemetry is off (axolotl's do-not-track variables, HF offline, wandb disabled) and,
where ``unshare`` works, every run is in a network namespace of its own with loopback only, so
nothing can reach an outside address.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from .launch import REPO, WORLD

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
VENV = Path(os.environ.get("AXOLOTL_VENV", REPO / ".cache" / "axolotl-venv"))
PLUGIN = "lift_ds.integrations.axolotl.LiftPlugin"
#: what docs/axolotl.md tells users to set: axolotl's do-not-track switch and every hub / tracker off
OFFLINE = {
    "AXOLOTL_DO_NOT_TRACK": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "WANDB_MODE": "disabled",
    "WANDB_DISABLED": "true",
    "GRADIO_ANALYTICS_ENABLED": "False",
}
# checkpoint-3 falls mid-period (LISA switches every 2 steps): optimizer state is saved
STEPS, SAVE_EVERY, KILL_AT = 8, 3, 5
AUTO = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
}


def _isolated() -> list[str]:
    """``unshare -n`` with loopback up, where this machine allows it (root in CI); else nothing."""
    if shutil.which("unshare") and shutil.which("ip"):
        probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True)
        if probe.returncode == 0:
            return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    return []


def _yaml(tmp: Path, name: str, **extra) -> Path:
    import yaml

    cfg = {
        "base_model": str(tmp / "model"),
        "plugins": [PLUGIN, "axolotl_probe.ProbePlugin"],
        "datasets": [{"path": str(tmp / "train.jsonl"), "ds_type": "json", "type": "completion"}],
        "dataset_prepared_path": str(tmp / "prepared"),
        "val_set_size": 0,
        "sequence_len": 64,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": STEPS,
        "learning_rate": 0.01,
        "lr_scheduler": "linear",
        "warmup_steps": 2,
        "optimizer": "adamw_torch",
        "adam_epsilon": 1e-3,
        "weight_decay": 0.0,
        "logging_steps": 1,
        "save_steps": SAVE_EVERY,
        "output_dir": str(tmp / name),
        "seed": 0,
        "bf16": False,
        "fp16": False,
        **extra,
    }
    path = tmp / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def axolotl(
    cfg: Path, probe: Path, kill_at: int | None = None, ranks: int = WORLD
) -> tuple[subprocess.CompletedProcess, Path]:
    """``axolotl train CFG`` (torchrun on ``ranks`` CPU ranks, or axolotl's python launcher); the probe writes
    to ``probe``."""
    env = {
        **os.environ,
        **OFFLINE,
        "OMP_NUM_THREADS": "1",
        "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(HERE),
        "LIFT_PROBE_OUT": str(probe),
        "LIFT_PROBE_KILL_AT": str(kill_at or 0),
    }
    launch = (
        ["--launcher", "torchrun", "--", "--standalone", "--nproc_per_node", str(ranks)]
        if ranks > 1
        else ["--launcher", "python"]
    )
    proc = subprocess.run(
        [*_isolated(), str(VENV / "bin" / "axolotl"), "train", str(cfg), *launch],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=cfg.parent,
    )
    return proc, probe


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from helpers import NEGATIVE, POSITIVE, make_model_dir

    build = subprocess.run(
        ["bash", str(REPO / "scripts" / "axolotl_venv.sh")],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "AXOLOTL_VENV": str(VENV)},
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    tmp = tmp_path_factory.mktemp("axolotl")
    make_model_dir(tmp / "model", layers=4, hidden=32)
    rows = [
        {
            "text": (
                f"Review: {(POSITIVE if i % 2 == 0 else NEGATIVE)[i % 6]} Sentiment: "
                f"{'positive' if i % 2 == 0 else 'negative'}"
            )
        }
        for i in range(64)
    ]
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lisa = {"method": "lisa", "lisa_layers": 2, "switch_every": 2, "layer_range": [2, 4]}
    (tmp / "zero2.json").write_text(json.dumps({**AUTO, "zero_optimization": {"stage": 2}, "lift": lisa}))
    (tmp / "zero2-plain.json").write_text(json.dumps({**AUTO, "zero_optimization": {"stage": 2}}))
    res = {"tmp": tmp}
    res["lisa"] = axolotl(_yaml(tmp, "lisa", deepspeed=str(tmp / "zero2.json")), tmp / "lisa.probe")
    # the same run from lift: keys in the YAML (the JSON without a "lift" section), killed, then resumed
    again = _yaml(tmp, "killed", deepspeed=str(tmp / "zero2-plain.json"), lift=lisa, auto_resume_from_checkpoints=True)
    res["killed"] = axolotl(again, tmp / "killed.probe", kill_at=KILL_AT)
    res["killed_dir"] = sorted(p.name for p in (tmp / "killed").iterdir())
    res["resumed"] = axolotl(again, tmp / "resumed.probe")
    res["refused"] = axolotl(
        _yaml(
            tmp,
            "refused",
            lisa_n_layers=2,
            lisa_step_interval=5,
            adapter="lora",
            unfrozen_parameters=["lm_head.*"],
            layer_offloading=True,
            lift={"method": "lisa", "policy": "cyclic"},
            dataset_prepared_path=str(tmp / "refused-prepared"),
        ),
        tmp / "refused.probe",
        ranks=1,
    )
    return res


def ok(res: dict, name: str, out: str | None = None) -> tuple[Path, list[dict]]:
    """The run's output directory and every rank's probe record; the run must have succeeded."""
    proc, probe = res[name]
    assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return res["tmp"] / (out or name), [json.loads((probe / f"rank{r}.json").read_text()) for r in range(WORLD)]


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_axolotl_trainer_runs_through_lift_and_only_the_plan_moves(runs):
    out, ranks = ok(runs, "lisa")
    r0 = ranks[0]
    assert r0["trainer_class"][:4] == ["LiftAxolotlTrainer", "_AxolotlLift", "LiftTrainerMixin", "AxolotlTrainer"], r0[
        "trainer_class"
    ]
    assert r0["method"] == "lisa" and r0["global_step"] == STEPS
    # every step trains exactly what the plan says for it, and nothing else moved from the initial weights
    assert [sorted(t) for t in r0["trainable"]] == [r0["planned"][u] for u in r0["plan_steps"]]
    start, final = weights(runs["tmp"] / "model"), weights(out)
    moved = {n for n in start if not torch.equal(start[n], final[n])}
    assert moved == set().union(*r0["trainable"]), sorted(moved ^ set().union(*r0["trainable"]))
    assert not any(n.startswith("model.layers.0.") for n in moved)  # outside layer_range [2, 4]: frozen throughout
    for names in r0["trainable"]:  # LISA: embedding and head in every period, two of layers 2-4 drawn per period
        layers = {n.split(".")[2] for n in names if n.startswith("model.layers.")}
        assert len(layers) == 2 and "model.embed_tokens.weight" in names and "lm_head.weight" in names, names
    losses = r0["losses"]
    assert (
        len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses))) and sum(losses[-2:]) < sum(losses[:2]) - 0.1
    ), losses
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)  # the saved model loads with plain transformers
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), final[n]), n


@pytest.mark.parametrize("name", ["lisa", "resumed"])
def test_each_rank_holds_optimizer_state_for_its_share_of_the_active_unit(runs, name):
    """What axolotl's own LISA cannot do on several ranks: the ZeRO-2 engine is rebuilt over the active
    unit, so each rank holds AdamW moments for its partition of it, nothing for the rest."""
    _, ranks = ok(runs, name)
    for r in ranks:
        assert r["world"] == WORLD
        for k, (step, held, active) in enumerate(zip(r["steps"], r["state_numel"], r["trainable_numel"])):
            if step % 2 == 0:  # a unit's first step: a fresh engine, no state yet
                assert held == 0, (name, r["rank"], k, held)
            else:
                assert 2 * active / WORLD <= held <= 2 * active / WORLD + 2 * 64, (name, r["rank"], k, held, active)
                assert held < 2 * r["total_numel"] / WORLD * 0.8, (name, k, held, r["total_numel"])


def test_kill_and_auto_resume_equal_the_uninterrupted_run(runs):
    killed, _ = runs["killed"]
    assert (
        killed.returncode != 0
        and "checkpoint-3" in runs["killed_dir"]
        and "model.safetensors" not in runs["killed_dir"]
    ), (killed.returncode, runs["killed_dir"], killed.stderr[-3000:])
    out, ranks = ok(runs, "resumed", out="killed")
    # resumed at step 3 (auto_resume_from_checkpoints)
    assert ranks[0]["steps"] == list(range(SAVE_EVERY, STEPS)), ranks[0]["steps"]
    whole, _ = ok(runs, "lisa")
    ref, got = weights(whole), weights(out)
    assert set(ref) == set(got) and all(torch.equal(ref[n], got[n]) for n in ref), [
        n for n in ref if not torch.equal(ref[n], got[n])
    ]
    assert ranks[0]["losses"] == ok(runs, "lisa")[1][0]["losses"][SAVE_EVERY:]


def test_conflicting_axolotl_settings_are_refused_at_config_validation(runs):
    proc, _ = runs["refused"]
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    for key in (
        "lisa_n_layers",
        "lisa_step_interval",
        "adapter",
        "unfrozen_parameters",
        "layer_offloading",
        "lift.policy",
    ):
        assert f"{key}:" in text, (key, text[-4000:])
    assert PLUGIN in text
    # before any dataset or model work
    assert not (runs["tmp"] / "refused-prepared").exists() and not (runs["tmp"] / "refused").exists()
