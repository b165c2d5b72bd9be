"""lift.loss on 2 ranks: DeepSpeed ZeRO-1/2/3 (a partitioned, tied lm_head) and FSDP2 train the same
weights with lift_ds's chunked loss as the single-process reference with the model's own loss."""

from __future__ import annotations

import copy

import pytest

from .launch import max_rel_error, reference, torchrun

pytestmark = pytest.mark.slow


def _config(backend: str, loss: str) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_clipping": 0.0,
        # embedding (tied to the head), two layers and the head, one step each: every kind of block
        "lift": {
            "backend": "deepspeed" if backend.startswith("z") else backend,
            "total_steps": 8,
            "policy": "cyclic",
            "layer_range": [3, 4],
            "include_embedding": True,
            "include_head": True,
            "loss": loss,
        },
    }
    if backend.startswith("z"):
        # ZeRO-3: every weight partitioned
        cfg["zero_optimization"] = {"stage": int(backend[1]), "stage3_param_persistence_threshold": 0}
    return cfg


def scenarios() -> dict:
    out = {}
    for backend in ("z1", "z2", "z3", "fsdp"):
        out[f"{backend}-chunked"] = {
            "config": _config(backend, "chunked"),
            "optimizer": "sgd",
            "steps": 8,
            "tie": True,
            "prompt": 5,
        }
    out["z3-model"] = {**out["z3-chunked"], "config": _config("z3", "model")}
    out["z3-chunked-untied"] = {**out["z3-chunked"], "tie": False}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return torchrun(scenarios(), tmp_path_factory.mktemp("loss"), "loss")


@pytest.mark.parametrize("name", list(scenarios()))
def test_backend_with_chunked_loss_matches_the_reference_with_the_models_loss(runs, name):
    sc = scenarios()[name]
    ref_sc = copy.deepcopy(sc)
    ref_sc["config"]["lift"]["loss"] = "model"
    start, ref = reference(ref_sc)
    err, move = max_rel_error(runs[name]["final"], ref, start)
    assert move > 1e-3, "the reference did not train"
    assert err <= 1e-4 * move, f"{name}: max |run - ref| = {err:.3g}, largest move {move:.3g}"
