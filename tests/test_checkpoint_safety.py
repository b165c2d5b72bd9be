"""Untrusted and damaged checkpoints, and a save interrupted at every file operation (one process,
the torch backend; tests/distributed/test_crash_resume.py kills real 2-rank ZeRO-2/3 saves).

- a checkpoint file holding a pickled object is refused naming the file, and the object never runs;
- ``latest`` is only a tag of a directory inside the save directory;
- a truncated or corrupt file in the newest checkpoint falls back to the newest complete one, saying
  so, and deletes nothing;
- a save abandoned after any one of its file operations (as a SIGKILL would leave it) resumes to the
  uninterrupted run's weights;
- a resume that would change the result is refused naming the setting; the learning rate is applied.
"""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import pytest
import torch

import lift_ds
from lift_ds import checkpoint_io, faults
from lift_ds.errors import ConfigError, ResumeError

from helpers import lm_batches, tiny_llama

PACKAGE = Path(__file__).resolve().parents[1] / "lift_ds"
STEPS = 8


def make(lift=None, lr=1e-2, wd=0.0, sched=None, **top):
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_clipping": 1.0,
        **top,
        "lift": {"backend": "torch", "total_steps": STEPS, "include_head": True, **(lift or {})},
    }
    engine, _, _, _ = lift_ds.initialize(
        model=tiny_llama(),
        config=cfg,
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=wd),
        lr_scheduler=sched,
    )
    return engine


def train(engine, data, upto=None):
    for b in data[engine.global_step : upto]:
        loss = engine(**b).loss
        engine.backward(loss)
        engine.step()


def weights(engine):
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


@pytest.fixture(scope="module")
def reference():
    engine = make(lift={"optimizer_state": "offload", "policy": "cyclic"})
    train(engine, lm_batches(STEPS))
    return weights(engine)


def saved(tmp_path, steps=(2, 5)):
    """An engine trained to the last of ``steps``, checkpointed at each (offload + cyclic: every file kind is
    written)."""
    engine = make(lift={"optimizer_state": "offload", "policy": "cyclic"})
    data = lm_batches(STEPS)
    for s in steps:
        train(engine, data, s)
        engine.save_checkpoint(tmp_path)
    return engine


def resume(tmp_path):
    engine = make(lift={"optimizer_state": "offload", "policy": "cyclic"})
    path, _ = engine.load_checkpoint(tmp_path)
    return engine, path


def refresh_manifest(d: Path) -> None:
    """What someone who tampers with a checkpoint can do too: make its manifest match the files."""
    (d / checkpoint_io.MANIFEST).unlink()
    checkpoint_io.write_manifest(d, checkpoint_io.manifest_step(d) or 0)


class Payload:
    """Creates a file when unpickled (if any load ever ran pickled code, the file would exist)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ----------------------------------------------------------------------------- untrusted files


def test_every_torch_load_in_the_package_is_weights_only():
    calls = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", None)) == "load"
                and getattr(getattr(node.func, "value", None), "id", None) == "torch"
            ):
                ok = any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords
                )
                calls.append((f"{path.name}:{node.lineno}", ok))
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("pickle", "dill", "cloudpickle") for n in names), (
                    f"{path.name}:{node.lineno} imports pickle"
                )
    assert calls and all(ok for _, ok in calls), calls


@pytest.mark.parametrize("name", ["rank0_state.pt", "stash.rank0.pt", "optimizer_state.pt"])
def test_a_pickled_payload_in_a_checkpoint_never_runs(tmp_path, name):
    saved(tmp_path)
    ckpt = tmp_path / "global_step5"
    marker = tmp_path / "payload_ran"
    torch.save({"format": "x", "rng": Payload(marker), "lr_scheduler": {}}, ckpt / name)
    refresh_manifest(ckpt)  # the manifest matches: only the safe load stands between the payload and a shell
    with pytest.raises(ResumeError) as info:
        resume(tmp_path)
    assert not marker.exists(), "the checkpoint ran code"
    msg = str(info.value)
    assert (
        str(ckpt / name) in msg and "pickled Python object" in msg and "safe load refuses" in msg and "io.open" in msg
    )


def test_latest_is_only_a_tag_inside_the_save_directory(tmp_path, caplog):
    outside = tmp_path / "elsewhere"
    saved(outside / "ck", steps=(5,))
    ck = tmp_path / "ck"
    saved(ck, steps=(2,))
    for bad in [
        "../elsewhere/ck/global_step5",
        str(outside / "ck" / "global_step5"),
        ".global_step2",
        "global_step2/../../elsewhere",
    ]:
        (ck / "latest").write_text(bad)
        with caplog.at_level(logging.WARNING):
            engine, path = resume(ck)
        assert path == ck / "global_step2" and engine.global_step == 2, bad
        assert "not a checkpoint name inside" in caplog.text
    (ck / "global_step9").symlink_to(outside / "ck" / "global_step5")
    (ck / "latest").write_text("global_step9")
    engine, path = resume(ck)
    assert path == ck / "global_step2"
    with pytest.raises(ResumeError, match="not a checkpoint name inside"):
        make().load_checkpoint(ck, tag="../elsewhere/ck/global_step5")
    with pytest.raises(ConfigError, match="tag: '../x' must be a plain directory name"):
        make().save_checkpoint(ck, tag="../x")


# ----------------------------------------------------------------------------- damaged checkpoints


@pytest.mark.parametrize(
    "name,damage",
    [
        ("weights.safetensors", "truncate"),
        ("rank0_state.pt", "truncate"),
        ("optimizer_state.pt", "flip"),
        ("stash.rank0.pt", "flip"),
        ("lift_state.json", "truncate"),
        ("manifest.json", "remove"),
    ],
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_complete_one(tmp_path, caplog, reference, name, damage):
    saved(tmp_path)
    f = tmp_path / "global_step5" / name
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        f.write_bytes(data[:-9] + bytes([data[-9] ^ 0xFF]) + data[-8:])
    else:
        f.unlink()
    with caplog.at_level(logging.WARNING):
        engine, path = resume(tmp_path)
    assert path == tmp_path / "global_step2" and engine.global_step == 2
    assert (
        "global_step5" in caplog.text
        and "resuming from" in caplog.text
        and "the newest complete checkpoint" in caplog.text
    )
    assert (tmp_path / "global_step5").is_dir()  # nothing a resume might need is deleted
    train(engine, lm_batches(STEPS))
    got = weights(engine)
    assert all(torch.equal(got[n], reference[n]) for n in reference)


def test_a_checkpoint_from_before_the_layout_field_resumes_exactly(tmp_path, caplog, reference):
    """lift_state.json as lift_ds wrote it before the backend-neutral ``layout`` (a top-level
    ``zero_stage``; here 2, as a ZeRO-2 run would have written) resumes, the old field read as the layout."""
    saved(tmp_path, steps=(2,))
    ckpt = tmp_path / "global_step2"
    meta = json.loads((ckpt / "lift_state.json").read_text())
    assert meta.pop("layout") == {"zero_stage": 0}  # the torch backend
    (ckpt / "lift_state.json").write_text(json.dumps({**meta, "zero_stage": 2}, indent=1))
    refresh_manifest(ckpt)
    with caplog.at_level(logging.INFO):
        engine, path = resume(tmp_path)
    assert path == ckpt and engine.global_step == 2 and "with a changed layout: zero_stage 2 -> 0" in caplog.text
    train(engine, lm_batches(STEPS))
    got = weights(engine)
    assert all(torch.equal(got[n], reference[n]) for n in reference)


def test_no_complete_checkpoint_is_an_error_that_changes_nothing(tmp_path):
    saved(tmp_path, steps=(2,))
    f = tmp_path / "global_step2" / "weights.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ResumeError, match=r"no complete checkpoint in .*weights.safetensors is truncated"):
        resume(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step2", "latest"]


def test_a_checkpoint_whose_weights_do_not_fit_the_model_is_refused(tmp_path):
    from safetensors.torch import save_file

    saved(tmp_path, steps=(2,))
    ckpt = tmp_path / "global_step2"
    save_file({"model.layers.9.evil": torch.zeros(3)}, str(ckpt / "weights.safetensors"))
    refresh_manifest(ckpt)
    with pytest.raises(
        ResumeError, match="weights.safetensors: holds 'model.layers.9.evil', which this model has no parameter of"
    ):
        resume(tmp_path)


# ----------------------------------------------------------------------------- a save cut short anywhere


class Killed(BaseException):
    """Stands in for SIGKILL in one process: unwinds without any cleanup code running (nothing catches it)."""


def test_a_save_abandoned_after_any_file_operation_resumes_exactly(tmp_path, monkeypatch, reference):
    """Kill the save of step 5 after its n-th file operation, for every n (the first save of a tag,
    then a second save of the same tag), and resume: the final weights equal the uninterrupted run's,
    and once the manifest was written the resume starts from step 5 (nothing complete is lost). The
    operations are the save's own (lift_ds.faults.save_ops counts them)."""
    real = faults.save_ops
    state = {"kill_at": None, "done": []}

    def counting(step, rank):
        op_real = real(step, rank)

        def op(what):
            op_real(what)
            if step == 5 and state["kill_at"] is not None:
                state["done"].append(what)
                if len(state["done"]) == state["kill_at"]:
                    raise Killed(what)

        return op

    monkeypatch.setattr(faults, "save_ops", counting)
    data = lm_batches(STEPS)
    points = 0
    for resave in (False, True):
        n = 1
        while True:
            ck = tmp_path / f"{resave}-{n}"
            engine = make(lift={"optimizer_state": "offload", "policy": "cyclic"})
            train(engine, data, 2)
            engine.save_checkpoint(ck)
            train(engine, data, 5)
            if resave:  # a previous save of step 5 exists: the new one must replace it without a gap
                engine.save_checkpoint(ck)
            state.update(kill_at=n, done=[])
            try:
                engine.save_checkpoint(ck)
            except Killed:
                pass
            else:
                break  # n is past the last operation of the save
            finally:
                state["kill_at"] = None
            resumed, path = resume(ck)
            assert path.name == ("global_step5" if resave or "manifest" in state["done"] else "global_step2"), (
                resave,
                state["done"],
            )
            train(resumed, data)
            got = weights(resumed)
            assert all(torch.equal(got[k], reference[k]) for k in reference), (resave, n)
            assert not [p for p in ck.iterdir() if p.name.startswith(".")], (
                resave,
                n,
                sorted(p.name for p in ck.iterdir()),
            )
            points += 1
            n += 1
    assert points >= 16, points


def test_rotation_cut_short_leaves_only_complete_checkpoints(tmp_path):
    saved(tmp_path, steps=(2, 5))
    (tmp_path / "global_step2").rename(tmp_path / ".global_step2.deleting")  # killed between the rename and the removal
    (tmp_path / "global_step_backup").mkdir()  # a stray directory with the prefix
    checkpoint_io.rotate(tmp_path, r"^global_step(\d+)$", 1, set())
    engine, path = resume(tmp_path)
    assert path.name == "global_step5" and not (tmp_path / ".global_step2.deleting").exists()
    assert (tmp_path / "global_step_backup").is_dir()


# ----------------------------------------------------------------------------- what decides the result


def test_a_resume_that_would_change_the_result_is_refused_naming_the_setting(tmp_path):
    engine = make(lift={"schedule": "random", "seed": 1})
    train(engine, lm_batches(STEPS), 3)
    engine.run_fingerprint["data_seed"] = 0
    engine.save_checkpoint(tmp_path)
    other = make(lift={"schedule": "random", "seed": 2})
    with pytest.raises(ResumeError, match=r"lift\.seed: 1 -> 2 \(--seed\)") as info:
        other.load_checkpoint(tmp_path)
    assert "plan:" in str(info.value)
    other = make(lift={"schedule": "random", "seed": 1}, wd=0.1)
    with pytest.raises(ResumeError, match=r"optimizer\.weight_decay: 0\.0 -> 0\.1 \(the optimizer"):
        other.load_checkpoint(tmp_path)
    other = make(lift={"schedule": "random", "seed": 1}, gradient_clipping=0.5)
    with pytest.raises(ResumeError, match=r"gradient_clipping: 1\.0 -> 0\.5 \(--gradient_clipping\)"):
        other.load_checkpoint(tmp_path)
    other = make(lift={"schedule": "random", "seed": 1})
    other.run_fingerprint["data_seed"] = 3
    with pytest.raises(ResumeError, match=r"data_seed: 0 -> 3 \(--seed \(the data order\)\)"):
        other.load_checkpoint(tmp_path)


def test_another_learning_rate_on_resume_is_applied_and_logged(tmp_path, caplog):
    sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))  # noqa: E731
    engine = make(sched=sched)
    train(engine, lm_batches(STEPS), 3)
    engine.save_checkpoint(tmp_path)
    other = make(lr=5e-3, sched=sched)
    with caplog.at_level(logging.WARNING):
        other.load_checkpoint(tmp_path)
    assert "the learning rate changed from 0.01 to 0.005 since the checkpoint: applied" in caplog.text
    assert other.get_lr()[0] == pytest.approx(5e-3 / 4) and other.optimizer.param_groups[0]["lr"] == pytest.approx(
        5e-3 / 4
    )
    same = make(sched=sched)
    same.load_checkpoint(tmp_path)
    assert same.get_lr()[0] == pytest.approx(1e-2 / 4)


def test_an_optimizer_section_that_gains_a_key_on_resume_is_refused(tmp_path):
    """The fingerprint holds the optimizer as torch holds it (defaults included), so adding a key
    that changes a default is a change too."""

    def run_cfg(params):
        cfg = {
            "train_micro_batch_size_per_gpu": 4,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, **params}},
            "lift": {"backend": "torch", "total_steps": STEPS},
        }
        engine, _, _, _ = lift_ds.initialize(model=tiny_llama(), config=cfg)
        return engine

    engine = run_cfg({})
    train(engine, lm_batches(STEPS), 2)
    engine.save_checkpoint(tmp_path)
    with pytest.raises(ResumeError, match=r"optimizer\.weight_decay: 0\.01 -> 0\.1"):
        run_cfg({"weight_decay": 0.1}).load_checkpoint(tmp_path)
    run_cfg({"weight_decay": 0.01}).load_checkpoint(tmp_path)  # AdamW's default, written out: the same run
