"""Numerical faults, failed checkpoint writes and out-of-memory at a phase rebuild (single process)."""

import errno
import os
import shutil
from pathlib import Path

import pytest
import torch

import lift_ds
from lift_ds import faults
from lift_ds.errors import CheckpointError, DivergenceError, PhaseOutOfMemoryError

from helpers import lm_batches, snapshot, tiny_llama


def make(lift=None, opt=None, **top):
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_clipping": 0.0,
        **top,
        "lift": {"total_steps": 8, **(lift or {})},
    }
    engine, _, _, _ = lift_ds.initialize(
        model=tiny_llama(), config=cfg, optimizer=opt or (lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    )
    return engine


def one_step(engine, batch, nan=False):
    loss = engine(**batch).loss
    engine.backward(loss * float("nan") if nan else loss)
    engine.step()


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_nan_loss_step_is_skipped_and_counted(clip):
    engine = make(gradient_clipping=clip)
    batches = lm_batches(8)
    for b in batches[:3]:  # steps 1-3; step 4 is the second of block 2's phase (AdamW state exists)
        one_step(engine, b)
    before = snapshot(engine.module)
    state = {k: v["exp_avg"].clone() for k, v in engine.optimizer.state.items()}
    one_step(engine, batches[3], nan=True)
    assert engine.skipped_steps == 1 and engine.last_step_skipped and engine.consecutive_skipped_steps == 1
    assert engine.global_step == 4  # the step keeps its place in the plan
    for n, p in engine.module.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None, n
    for k, v in engine.optimizer.state.items():  # same phase, same optimizer: state untouched
        assert torch.equal(v["exp_avg"], state[k])
    one_step(engine, batches[4])
    assert engine.consecutive_skipped_steps == 0 and not engine.last_step_skipped
    assert all(torch.isfinite(p).all() for p in engine.module.parameters())


def test_nan_in_one_micro_batch_skips_the_whole_accumulated_step():
    engine = make(gradient_accumulation_steps=2)
    batches = lm_batches(4)
    before = snapshot(engine.module)
    one_step(engine, batches[0])
    one_step(engine, batches[1], nan=True)
    assert engine.skipped_steps == 1 and engine.global_step == 1
    assert all(torch.equal(p, before[n]) for n, p in engine.module.named_parameters())


def test_non_finite_gradient_with_finite_loss_is_skipped():
    engine = make()
    b = lm_batches(1)[0]
    before = snapshot(engine.module)
    p = next(p for p in engine.module.parameters() if p.requires_grad)
    handle = p.register_hook(lambda g: g * float("inf"))
    one_step(engine, b)
    handle.remove()
    assert engine.skipped_steps == 1 and not torch.isfinite(torch.tensor(engine.last_grad_norm))
    assert all(torch.equal(q, before[n]) for n, q in engine.module.named_parameters())


def test_consecutive_skips_stop_the_run_with_a_clear_message():
    engine = make(lift={"total_steps": 12, "max_consecutive_skipped_steps": 3})
    batches = lm_batches(12)
    for b in batches[:2]:
        one_step(engine, b)
    good = snapshot(engine.module)
    one_step(engine, batches[2], nan=True)
    one_step(engine, batches[3], nan=True)
    with pytest.raises(DivergenceError) as info:
        one_step(engine, batches[4], nan=True)
    msg = str(info.value)
    assert (
        "3 optimizer steps in a row (steps 3..5" in msg
        and "max_consecutive_skipped_steps" in msg
        and "learning rate" in msg
    )
    assert all(torch.equal(p, good[n]) for n, p in engine.module.named_parameters())


def test_zero_patience_never_stops():
    engine = make(lift={"total_steps": 8, "max_consecutive_skipped_steps": 0})
    for b in lm_batches(8):
        one_step(engine, b, nan=True)
    assert engine.done and engine.skipped_steps == 8


def test_skip_counters_survive_resume(tmp_path):
    engine = make()
    batches = lm_batches(8)
    one_step(engine, batches[0])
    one_step(engine, batches[1], nan=True)
    engine.save_checkpoint(tmp_path)
    other = make()
    other.load_checkpoint(tmp_path)
    assert other.skipped_steps == 1 and other.consecutive_skipped_steps == 1


# ----------------------------------------------------------------------------- checkpoints


def _trained_with_checkpoint(tmp_path):
    engine = make()
    batches = lm_batches(8)
    for b in batches[:2]:
        one_step(engine, b)
    engine.save_checkpoint(tmp_path)
    for b in batches[2:4]:
        one_step(engine, b)
    return engine


def _assert_previous_intact(tmp_path):
    assert (tmp_path / "latest").read_text() == "global_step2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step2", "latest"]  # no partial directory left
    fresh = make()
    fresh.load_checkpoint(tmp_path)
    assert fresh.global_step == 2


@pytest.mark.parametrize(
    "code,text", [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")]
)
def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch, code, text):
    engine = _trained_with_checkpoint(tmp_path)
    real = torch.save

    def failing(obj, f, *a, **k):
        if "rank0_state" in str(f):
            raise OSError(code, text, str(f))
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(CheckpointError) as info:
        engine.save_checkpoint(tmp_path)
    monkeypatch.setattr(torch, "save", real)
    msg = str(info.value)
    assert (
        text in msg
        and "global_step4" in msg
        and "global_step2 is untouched and still the newest" in msg
        and "--resume" in msg
    )
    _assert_previous_intact(tmp_path)


def test_read_only_directory_is_refused_up_front(tmp_path, monkeypatch):
    engine = _trained_with_checkpoint(tmp_path)
    real_mkdir = Path.mkdir

    def ro_mkdir(self, *a, **k):
        if self.name.endswith(".partial"):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", ro_mkdir)
    with pytest.raises(CheckpointError, match="Read-only file system"):
        engine.save_checkpoint(tmp_path)
    monkeypatch.setattr(Path, "mkdir", real_mkdir)
    _assert_previous_intact(tmp_path)


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    engine = _trained_with_checkpoint(tmp_path)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1024))
    with pytest.raises(CheckpointError, match=r"0 MiB free, the checkpoint needs about \d+ MiB"):
        engine.save_checkpoint(tmp_path)
    monkeypatch.undo()
    _assert_previous_intact(tmp_path)


def test_resume_removes_an_unpublished_partial_checkpoint(tmp_path):
    engine = _trained_with_checkpoint(tmp_path)
    (tmp_path / ".global_step4.partial").mkdir()
    (tmp_path / ".global_step4.partial" / "weights.safetensors").write_bytes(b"half-written")
    fresh = make()
    path, _ = fresh.load_checkpoint(tmp_path)
    assert path.name == "global_step2" and not (tmp_path / ".global_step4.partial").exists()
    del engine


# ----------------------------------------------------------------------------- out of memory


def test_out_of_memory_at_phase_rebuild_names_block_and_estimate(monkeypatch):
    engine = make()
    real = engine.backend.build

    def oom(params):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine.backend, "build", oom)
    batches = lm_batches(8)
    one_step(engine, batches[0])
    with pytest.raises(PhaseOutOfMemoryError) as info:
        one_step(engine, batches[1])  # the switch to block 2
    msg = str(info.value)
    assert "block model.layers.1" in msg and "lift_ds.memory estimates" in msg and "GiB of model states per rank" in msg
    assert "Tried to allocate 2.00 GiB" in msg and "zero3_offload" in msg
    monkeypatch.setattr(engine.backend, "build", real)


def test_cpu_allocator_failure_is_recognised():
    from lift_ds.engine import is_out_of_memory

    assert is_out_of_memory(
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: "
            "can't allocate memory: you tried to allocate 1 bytes"
        )
    )
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


# ----------------------------------------------------------------------------- fault injection


def test_fault_spec(monkeypatch):
    monkeypatch.setenv("LIFT_DS_FAULTS", "kill@7, nan_loss@5:1")
    assert faults.armed("kill", 7, 0) and faults.armed("kill", 7, 1) and not faults.armed("kill", 6, 0)
    assert faults.armed("nan_loss", 5, 1) and not faults.armed("nan_loss", 5, 0)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert not faults.armed("kill", 7, 0)  # an elastic restart runs clean
    monkeypatch.setenv("LIFT_DS_FAULTS", "explode@3")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")
    with pytest.raises(ValueError, match="LIFT_DS_FAULTS: bad entry 'explode@3'"):
        faults.armed("kill", 3, 0)
    assert os.environ.get("LIFT_DS_FAULTS") == "explode@3"
