"""One test per DeepSpeed private detail that lift_ds.backends.compat works around.

Each test fails if a DeepSpeed release changes the detail: the workaround would then be wrong, or no
longer needed. Live facts come from one 1-rank job (compat_probe.py); the rest read DeepSpeed's
source, where the detail is a line of code.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest

from lift_ds.backends import compat, compat_zero3

from .launch import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    out = tmp_path_factory.mktemp("compat") / "facts.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "1",
        str(REPO / "tests" / "distributed" / "compat_probe.py"),
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert out.is_file(), proc.stderr[-5000:]
    return json.loads(out.read_text())


def test_installed_version_is_verified(facts):
    assert facts["version_verified"] and compat.check_version()


def test_release_engine_destroy_leaves_hooks_that_release_removes(facts):
    """engine.destroy() leaves module_forward_pre/post_hook registered (a leak of every old engine);
    release_engine removes them and frees the optimizer state by reference counting."""
    assert facts["engine_hook_attributes_are_handles"], (
        "DeepSpeed renamed its forward hook attributes: release_engine misses them"
    )
    assert facts["destroy_leaves_forward_hooks"], "destroy() now removes its hooks: release_engine's removal can go"
    assert facts["hooks_after_release"] == 0
    assert facts["release_frees_optimizer_state_without_gc"], "the engine's state now needs gc.collect() to be freed"
    assert facts["engine_collected"]


def test_release_engine_parameter_backrefs():
    """ZeRO-1/2 set ``lp._zero_optimizer`` and ZeRO-3 ``p._z3_optimizer`` on parameters."""
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    assert "lp._zero_optimizer = self" in inspect.getsource(stage_1_and_2)
    assert "p._z3_optimizer = self" in inspect.getsource(stage3)
    assert set(compat._PARAM_BACKREFS) == {"_zero_optimizer", "_z3_optimizer"}


def test_release_engine_removes_zero3_backrefs(facts):
    assert facts["zero3_backref_on_params"], "ZeRO-3 no longer sets _z3_optimizer on parameters"
    assert not facts["zero3_backref_after_release"]


def test_release_engine_removes_zero3_module_backward_functions(facts):
    """ZeRO-3 caches its pre-/post-backward autograd Functions in each module's __dict__ and reuses them
    in a later engine: their closures would call the first engine's coordinator (a CheckpointError in
    non-reentrant checkpoint recompute of frozen layers, tests/distributed/test_clients.py)."""
    from deepspeed.runtime.zero import parameter_offload

    src = inspect.getsource(parameter_offload)
    assert 'if "pre_bwd_fn" not in module.__dict__' in src and 'if "post_bwd_fn" not in module.__dict__' in src, (
        "ZeRO-3 no longer reuses a module's cached backward Functions: release_engine's removal can go"
    )
    assert facts["zero3_module_functions_cached"] > 0
    assert facts["zero3_module_functions_after_release"] == 0


def test_skip_model_broadcast(facts):
    """Every build calls DeepSpeedEngine._broadcast_model; skip_model_broadcast stops it."""
    assert facts["broadcast_calls_plain_build"] >= 1, "DeepSpeed no longer broadcasts through _broadcast_model"
    assert facts["broadcast_calls_skipped_build"] == 0


def test_cheap_zero3_build_details():
    """ZeRO-3's optimizer formats locals() for a log line; zero.utils.defragment (DeepSpeed 0.19; stage3
    itself before) runs gc.collect()."""
    import deepspeed.runtime.zero.stage3 as stage3
    import deepspeed.runtime.zero.utils as zero_utils
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    assert "{locals()}" in inspect.getsource(DeepSpeedZeroOptimizer_Stage3.__init__)
    defragmenter = zero_utils if hasattr(zero_utils, "defragment") else stage3
    assert "gc.collect()" in inspect.getsource(defragmenter) and defragmenter in compat.zero3_gc_holders()
    import torch

    before = torch.nn.Parameter.__repr__
    with compat.cheap_zero3_build(True):
        assert all(m.gc.collect() == 0 for m in compat.zero3_gc_holders())
        assert repr(torch.nn.Parameter(torch.zeros(2, 3))) == "Parameter(shape=(2, 3), dtype=torch.float32)"
    assert torch.nn.Parameter.__repr__ is before and all(
        m.gc.collect is not None and m.gc.collect() >= 0 for m in compat.zero3_gc_holders()
    )


def test_disable_shm_comm_op():
    import deepspeed

    assert "deepspeed_shm_comm" in deepspeed.ops.__compatible_ops__


def test_innermost_optimizer_holds_the_partitioned_state(facts):
    assert facts["innermost_is_torch_optimizer"]
    # AdamW's two moments over this rank's (here: the only rank's) partition of the layer
    assert facts["innermost_state_numel"] >= 2 * facts["layer_numel"]


def test_zero3_parameter_attributes(facts):
    assert facts["zero3_param_has_ds_id"]
    assert facts["zero3_local_numel"] == 0 or facts["zero3_local_numel"] < facts["zero3_full_numel"]
    assert facts["zero3_full_numel"] == facts["zero3_expected_numel"] > 0


@pytest.mark.parametrize("stage", [2, 3])
def test_portable_optimizer_state_round_trip(facts, stage):
    """zero_step_and_keys reads the base optimizer's step and keys; a fresh engine has no state
    (torch optimizers create it at the first step), so materialize_zero_state creates it and
    DeepSpeed's safe_set_full_* fill it: the next step from the restored state equals the original's."""
    assert facts[f"z{stage}_fresh_state"] == [None, []]
    assert facts[f"z{stage}_step"] == 2.0 and facts[f"z{stage}_keys"] == ["exp_avg", "exp_avg_sq"]
    assert facts[f"z{stage}_has_fp32_master"]
    assert facts[f"z{stage}_round_trip_same_next_step"]


def test_installed_op_reads_installed_ops():
    from deepspeed.git_version_info import installed_ops

    for op in ("cpu_adam", "fused_adam"):
        assert op in installed_ops and compat.installed_op(op) == bool(installed_ops[op])


def test_zero_init_replaces_functional_linear_and_aten_linear_is_the_original(monkeypatch):
    """deepspeed.zero.Init (mem_efficient_linear, its default) sets torch.nn.functional.linear to its
    zero3_linear_wrap and leaves it so (the warning says "persist"); aten_linear is aten's own, which
    Q-LIFT's frozen chunks call, and computes x W^T + b."""
    import torch
    from deepspeed.runtime.zero import partition_parameters as pp

    source = inspect.getsource(pp)
    assert "torch.nn.functional.linear = zero3_linear_wrap" in source
    assert "This will persist unless manually reset" in source
    assert inspect.signature(pp.Init.__init__).parameters["mem_efficient_linear"].default is True
    monkeypatch.setattr(torch.nn.functional, "linear", pp.zero3_linear_wrap)  # as zero.Init leaves it
    linear = compat.aten_linear()
    assert linear is not pp.zero3_linear_wrap
    x, w, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5)
    assert torch.allclose(linear(x, w, b), x @ w.t() + b)


def test_zero_reduce_bucket_size(facts):
    assert facts["reduce_bucket_size"] == 12345


def test_zero3_offload_kept_across_phases(facts):
    """One DeepSpeedZeRoOffload for the run: built once, handed to every later phase's optimizer, its
    hooks neither removed by engine.destroy() nor registered twice; close() removes them."""
    assert facts["z3_phases"] == 4
    assert facts["z3_offloads_built"] == 1, "initialize_ds_offload was not intercepted: a new offload per phase again"
    assert facts["z3_offload_reused"] == 3
    assert len(set(facts["z3_hooks_per_step"])) == 1 and facts["z3_hooks_per_step"][0] > 0, facts["z3_hooks_per_step"]
    assert facts["z3_hooks_after_close"] == 0 and facts["z3_all_partitioned_after_close"]


def test_zero3_offload_keeper_details():
    """The details Zero3OffloadKeeper relies on: the optimizer gets its offload from
    initialize_ds_offload, by keywords; destroy() removes its module hooks; the coordinator's trace can
    be invalidated."""
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    init = inspect.getsource(DeepSpeedZeroOptimizer_Stage3.__init__)
    assert "self.parameter_offload = self.initialize_ds_offload(\n            module=module," in init
    assert "self.parameter_offload.destroy()" in inspect.getsource(DeepSpeedZeroOptimizer_Stage3.destroy)
    assert "_remove_module_hooks" in inspect.getsource(DeepSpeedZeRoOffload.destroy)
    assert callable(PartitionedParameterCoordinator._invalidate_trace) and callable(
        PartitionedParameterCoordinator.is_invalid_trace
    )
    assert set(compat_zero3._PER_ENGINE_OFFLOAD_ARGS) <= set(
        inspect.signature(DeepSpeedZeroOptimizer_Stage3.initialize_ds_offload).parameters
    )
