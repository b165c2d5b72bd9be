"""2-rank CPU tests: no leak over many phases, kill and resume, optimizer-state offload, bf16/fp16,
models built under zero.Init, and every file in ds_configs/.

fp16 depends on the machine (DeepSpeed's CPU accelerator supports it only with AVX-512 FP16 / AMX):
the fp16 scenario runs where the accelerator says yes, and the error path runs where it says no."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import lift_ds
from lift_ds.backends import hardware
from lift_ds.errors import ConfigError

from .launch import REPO, assert_same_state, max_rel_error, reference, torchrun
from helpers import tiny_llama

pytestmark = pytest.mark.slow


def cfg(stage: int, lift: dict, **top) -> dict:
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        **top,
        "lift": {"backend": "deepspeed", **lift},
    }


SCHED = {
    "type": "WarmupDecayLR",
    "params": {"warmup_min_lr": 0.0, "warmup_max_lr": "auto", "warmup_num_steps": 3, "total_num_steps": "auto"},
}
CONFIG_FILES = ["zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"]


def all_features(save_dir: Path) -> dict:
    sc = {}
    for stage in (2, 3):
        sc[f"leak-z{stage}"] = {
            "config": cfg(stage, {"total_steps": 24, "policy": "cyclic", "layer_range": [1, 4]}),
            "optimizer": "adamw",
            "steps": 24,
            "hidden": 128,
            "vocab": 512,
            "track": True,
        }
        # bf16: the engine shell can outlive its phase in a reference cycle; it must hold no tensor
        sc[f"leak-z{stage}-bf16"] = {
            "config": cfg(
                stage, {"total_steps": 12, "policy": "cyclic", "layer_range": [1, 4]}, bf16={"enabled": True}
            ),
            "optimizer": "adamw",
            "steps": 12,
            "hidden": 128,
            "vocab": 512,
            "track": True,
        }
        sc[f"full-z{stage}"] = {
            "config": cfg(stage, {"total_steps": 12, "include_head": True}, scheduler=SCHED, gradient_clipping=1.0),
            "optimizer": "adamw",
            "steps": 12,
            "export_dir": str(save_dir.parent / f"hf-z{stage}"),
        }
    for stage in (1, 2, 3):
        sc[f"offload-state-z{stage}"] = {
            "config": cfg(
                stage, {"total_steps": 12, "policy": "cyclic", "optimizer_state": "offload", "layer_range": [2, 4]}
            ),
            "optimizer": "adamw",
            "steps": 12,
        }
    # truncated backward under ZeRO-3: cyclic over layers 2-4, hooks on every layer
    sc["backward-z3"] = {
        "config": cfg(3, {"total_steps": 6, "policy": "cyclic", "layer_range": [2, 4]}),
        "optimizer": "sgd",
        "steps": 6,
        "track_backward": True,
    }
    sc["zinit-z3"] = {
        "config": cfg(3, {"total_steps": 8, "schedule": "random", "seed": 2}),
        "optimizer": "sgd",
        "steps": 8,
        "zero_init": True,
        "report_start": True,
    }
    # loss-reduction runs: the last layer and the head, 8 steps each
    fast = {"total_steps": 16, "layer_range": [4, 4], "include_head": True}
    sc["bf16-z2"] = {"config": cfg(2, fast, bf16={"enabled": True}), "optimizer": "adamw", "steps": 16}
    sc["bf16-z3"] = {"config": cfg(3, fast, bf16={"enabled": True}), "optimizer": "adamw", "steps": 16}
    sc["fp16-z2"] = {
        "config": cfg(2, fast, fp16={"enabled": True, "initial_scale_power": 8}),
        "optimizer": "adamw",
        "steps": 16,
    }
    # Q-LIFT: frozen layers quantized (torchao), the active one from the block store. NF4: cyclic, every
    # layer active three times, offload stash. int8: one layer (int8's rounding steps are fine enough that
    # the 2-rank gradient average's float noise flips a rounding when a trained layer is quantized again,
    # and a later phase then sees another forward: 3% of the move was measured over 12 cyclic steps)
    sc["qlift-nf4-z2"] = {
        "config": cfg(
            2, {"total_steps": 12, "policy": "cyclic", "frozen_weights": "nf4", "optimizer_state": "offload"}
        ),
        "optimizer": "adamw",
        "steps": 12,
    }
    sc["qlift-int8-z1"] = {
        "config": cfg(1, {"total_steps": 6, "layer_range": [3, 3], "frozen_weights": "int8"}),
        "optimizer": "adamw",
        "steps": 6,
    }
    # streamed frozen layers (lift.stream_frozen): each rank reads its own layer files
    sc["stream-nf4-z2"] = {
        "config": cfg(2, {"total_steps": 8, "policy": "cyclic", "frozen_weights": "nf4", "stream_frozen": True}),
        "optimizer": "adamw",
        "steps": 8,
    }
    for name in CONFIG_FILES:
        c = json.loads((REPO / "ds_configs" / f"{name}.json").read_text())
        c["lift"].update(total_steps=16, layer_range=[4, 4], include_head=True)
        c["optimizer"]["params"]["lr"] = 1e-2
        c["train_micro_batch_size_per_gpu"] = 2
        c["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        # offload files run as a user runs them (DeepSpeedCPUAdam from the config, compiled once);
        # the others take a torch AdamW so that CI does not compile FusedAdam for CPU
        opt = "config" if "offload" in name else "adamw"
        sc[f"file-{name}"] = {"config": c, "optimizer": opt, "steps": 16}
    return sc


def features(save_dir: Path) -> dict:
    """The scenarios this machine can run (the others are checked by :func:`result_or_refusal`)."""
    return {k: v for k, v in all_features(save_dir).items() if runnable(v)}


def precision(sc: dict) -> str:
    c = sc["config"]
    return next((k for k in ("bf16", "fp16") if (c.get(k) or {}).get("enabled") is True), "fp32")


def runnable(sc: dict) -> bool:
    """The product's own question (DeepSpeed's accelerator): can this machine train in the scenario's precision?"""
    return hardware.supports("deepspeed", precision(sc))[0]


def result_or_refusal(request, name: str) -> dict | None:
    """The scenario's result where this machine runs its precision (fp16 needs AVX-512 FP16 / AMX on
    CPU); elsewhere check that the same config is refused up front, naming the key and the hardware
    fact, before any process group, and return None. One of the two runs on every machine."""
    sc = all_features(Path("unused"))[name]
    dtype = precision(sc)
    ok, fact = hardware.supports("deepspeed", dtype)
    if ok:
        return request.getfixturevalue("runs")[1][name]
    with pytest.raises(ConfigError) as info:
        lift_ds.initialize(model=tiny_llama(), config=sc["config"], optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    msg = str(info.value)
    assert (
        f"{dtype}.enabled: true, but this machine cannot train in {dtype}" in msg and fact in msg and "fp32" in msg
    ), msg
    assert not dist.is_initialized()
    return None


def partial(save_dir: Path) -> dict:
    f = features(save_dir)
    return {
        "partial-z2": {**f["full-z2"], "save_at": 5, "save_dir": str(save_dir / "z2"), "export_dir": None},
        "partial-q": {**f["qlift-nf4-z2"], "save_at": 5, "save_dir": str(save_dir / "q")},
        # dies (os._exit, no clean-up) right after the checkpoint, mid-phase (3 steps per phase): last
        "partial-z3": {
            **f["full-z3"],
            "save_at": 5,
            "save_dir": str(save_dir / "z3"),
            "die_after_save": True,
            "export_dir": None,
        },
    }


def resume(save_dir: Path) -> dict:
    f = features(save_dir)
    out = {
        f"resume-z{s}": {**f[f"full-z{s}"], "resume_from": str(save_dir / f"z{s}"), "export_dir": None} for s in (2, 3)
    }
    out["resume-q"] = {**f["qlift-nf4-z2"], "resume_from": str(save_dir / "q")}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dsf")
    save = tmp / "ckpt"
    res = torchrun(features(save), tmp, "features", timeout=1500)
    saved = torchrun(partial(save), tmp, "partial", expect_results=False)
    resumed = torchrun(resume(save), tmp, "resume")
    for part, res_name in (("partial-z2", "resume-z2"), ("partial-z3", "resume-z3"), ("partial-q", "resume-q")):
        if saved.error(part):
            resumed.fail(res_name, f"the run that wrote its checkpoint failed: {saved.error(part)}")
    res.update(resumed)
    return features(save), res, save


@pytest.mark.parametrize("stage", [2, 3])
def test_no_leak_over_many_phases(request, runs, stage):
    _, res, _ = runs
    out = res[f"leak-z{stage}"]
    # measured after every optimizer step: 23 phase switches; the last engine stays until close()
    assert out["engines"] == [1] * 24, out["engines"]
    assert len(set(out["hooks"])) == 1, f"module hooks accumulate: {out['hooks']}"
    assert out["hooks_after_close"] == 0, "hooks left on the model after close()"
    # ZeRO's reduce bucket is sized to the active block, not DeepSpeed's 5e8-element default
    assert max(out["bucket"]) <= max(out["trainable_numel"]), (out["bucket"], out["trainable_numel"])
    assert out["engines_after_close"] == 0
    # Nothing is collected during the run (a phase switch runs no gc.collect(), and neither does the
    # worker): the old engine's tensors (fp32 master and Adam moments, 12 bytes per trained element,
    # split over 2 ranks: ~0.9 MB per block here) must go by reference counting. Leaking one block's
    # state per phase would add that much per phase; the bounds sit below one block's state.
    for name in (f"leak-z{stage}", f"leak-z{stage}-bf16"):
        leak = result_or_refusal(request, name)
        if leak is None:
            continue
        state_bytes = 12 * min(leak["trainable_numel"]) / 2
        live = leak["live_tensor_bytes"]
        # from phase 4 (every block built once) to the step before the last (whose phase is kept until close())
        growth = max(live[3:-1]) - live[3]
        assert growth < state_bytes, (name, growth, state_bytes, live)
        # what only Python's cycle collector frees, after the whole run: ZeRO-2 nothing; ZeRO-3 now and
        # then one small tensor (seen: 256 B to 64 KB)
        assert leak["uncollected_at_end"] < state_bytes / 8, (name, leak["uncollected_at_end"], state_bytes)
        if stage == 2:
            assert leak["uncollected_at_end"] == 0, name
    rss = out["rss"]
    per_phase = 12 * min(out["trainable_numel"]) / 2 / 2**20
    growth = statistics.mean(rss[-4:]) - statistics.mean(rss[4:8])
    # over 16 phases, leaking one block's state per phase would add 16 x per_phase MB (~14 MB)
    assert growth < 8 * per_phase, (
        f"RSS grew {growth:.1f} MB from phase 5-8 to 21-24 (one block's state: {per_phase:.2f} MB): {rss}"
    )


@pytest.mark.parametrize("stage", [2, 3])
def test_scheduler_across_rebuilds_matches_reference(runs, stage):
    sc, res, _ = runs
    start, ref = reference(sc[f"full-z{stage}"])
    err, move = max_rel_error(res[f"full-z{stage}"]["final"], ref, start)
    assert err <= 1e-3 * move, (err, move)


@pytest.mark.parametrize("stage", [2, 3])
def test_kill_and_resume_equals_uninterrupted(runs, stage):
    _, res, save = runs
    assert (save / f"z{stage}" / "latest").read_text() == "global_step5"
    out = res[f"resume-z{stage}"]
    # the resumed run continued from the checkpoint: step 5 of 12, 7 steps run, the saved optimizer state
    assert (
        out["resumed_from"] == str(save / f"z{stage}" / "global_step5")
        and out["resumed_at"] == 5
        and out["steps_run"] == 7
    )
    assert_same_state(
        out["loaded_state"], torch.load(save / f"z{stage}" / "probe_saved_state.pt", weights_only=False)["state"]
    )
    full, resumed = res[f"full-z{stage}"]["final"], out["final"]
    for n in full:
        assert torch.equal(full[n], resumed[n]), (n, (full[n] - resumed[n]).abs().max().item())


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_optimizer_state_offload_matches_reference(runs, stage):
    sc, res, _ = runs
    start, ref = reference(sc[f"offload-state-z{stage}"])
    err, move = max_rel_error(res[f"offload-state-z{stage}"]["final"], ref, start)
    assert err <= 1e-3 * move, (err, move)
    # and it is not the same as resetting (the cyclic plan revisits every block)
    reset_sc = json.loads(json.dumps(sc[f"offload-state-z{stage}"]))
    reset_sc["config"]["lift"]["optimizer_state"] = "reset"
    _, ref_reset = reference(reset_sc)
    assert max((ref[n] - ref_reset[n]).abs().max().item() for n in ref) > 10 * err


def test_zero_init_model_matches_reference(runs):
    sc, res, _ = runs
    out = res["zinit-z3"]
    start, ref = reference(sc["zinit-z3"], start_state=out["start"])
    for n in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(out["final"][n], start[n]), f"{n} is frozen but changed"
    err, move = max_rel_error(res["zinit-z3"]["final"], ref, start)
    assert err <= 1e-3 * move, (err, move)


@pytest.mark.parametrize("name", ["bf16-z2", "bf16-z3", "fp16-z2"] + [f"file-{n}" for n in CONFIG_FILES])
def test_runs_and_reduces_loss(request, name):
    """Each precision trains where DeepSpeed's accelerator supports it (fp16 on CPU only with
    AVX-512 FP16 / AMX); elsewhere the same config must be refused up front (result_or_refusal)."""
    out = result_or_refusal(request, name)
    if out is None:
        return
    losses = out["losses"]
    assert len(losses) == 16 and all(x == x for x in losses)
    assert statistics.mean(losses[-4:]) < statistics.mean(losses[:4]) - 0.05, losses


@pytest.mark.parametrize("stage", [2, 3])
def test_hf_export_loads_with_from_pretrained(runs, stage):
    from transformers import AutoModelForCausalLM

    _, res, save = runs
    export = save.parent / f"hf-z{stage}"
    assert (export / "model.safetensors").is_file() and (export / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(export)
    final = res[f"full-z{stage}"]["final"]
    for n, p in model.named_parameters():
        assert torch.equal(p.detach().float(), final[n]), n


def test_truncated_backward_under_zero3(runs):
    """Blocks before the active one see no backward at all (their backward hooks never fire); the
    active block and those after it do (the loss is computed after them)."""
    _, res, _ = runs
    for block, fired in res["backward-z3"]["backward_fired"]:
        active = block + 1  # candidates are layers 2-4 (0-based 1-3): candidate k is layer k + 1
        assert fired == list(range(active, 4)), (active, fired)


@pytest.mark.parametrize("name", ["qlift-nf4-z2", "qlift-int8-z1", "stream-nf4-z2"])
def test_quantized_frozen_layers_match_reference(runs, name):
    """Q-LIFT under ZeRO-1/2 on 2 ranks equals the single-process torch backend with the same
    quantized frozen layers (exact weights from the block store; NF4 measured 1.2e-7 of the move),
    streamed ones too (``stream_frozen``)."""
    sc, res, _ = runs
    start, ref = reference(sc[name])
    final = res[name]["final"]
    assert sorted(final) == sorted(ref)
    err, move = max_rel_error(final, ref, start)
    assert move > 0 and err <= 1e-3 * move, (err, move)


def test_quantized_kill_and_resume_equals_uninterrupted(runs):
    """Q-LIFT resumed mid-run (step 5 of 12) from a checkpoint holding the block store's trained layers."""
    _, res, save = runs
    out = res["resume-q"]
    assert (
        out["resumed_at"] == 5
        and out["steps_run"] == 7
        and (save / "q" / "global_step5" / "block_store.safetensors").is_file()
    )
    full, resumed = res["qlift-nf4-z2"]["final"], out["final"]
    assert sorted(full) == sorted(resumed)
    for n in full:
        assert torch.equal(full[n], resumed[n]), (n, (full[n] - resumed[n]).abs().max().item())
