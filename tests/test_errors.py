"""Every error class lives in lift_ds/errors.py with its exit status, and the launcher maps an error to its
exit status by class: 2 for bad input (nothing changed), 3 for a fault during training (with where the newest
checkpoint is), a traceback for the rest. No module re-exports an error class: all import it from lift_ds.errors
(``lift_ds.ConfigError`` stays the public name of the one users catch)."""

from __future__ import annotations

import ast
import builtins
import inspect
import types
from pathlib import Path

import pytest

import lift_ds
from lift_ds import errors, train

REPO = Path(__file__).resolve().parents[1]
#: the contract: each class's exit status from launch/train.py (None: not mapped, it propagates)
EXIT_CODES = {
    "ConfigError": 2,
    "ResumeError": 2,
    "BlockFindingError": 2,
    "DataError": 2,
    "DivergenceError": 3,
    "PhaseOutOfMemoryError": 3,
    "CheckpointError": 3,
    "CheckpointFileError": None,
    "TensorFileError": None,
    "AssetError": None,
    "NotUnderLiftError": None,
}
CLASSES = {
    n: c for n, c in vars(errors).items() if inspect.isclass(c) and issubclass(c, errors.LiftError) and n != "LiftError"
}
#: the builtin error each was before it moved to lift_ds.errors (callers still catch it as one)
BUILTIN_BASES = {
    "ConfigError": ValueError,
    "DataError": ValueError,
    "CheckpointFileError": ValueError,
    "TensorFileError": ValueError,
    "CheckpointError": OSError,
    "NotUnderLiftError": AttributeError,
    "DivergenceError": RuntimeError,
    "PhaseOutOfMemoryError": RuntimeError,
    "AssetError": RuntimeError,
}


def _instance(cls: type) -> errors.LiftError:
    if issubclass(cls, errors.ResumeError):
        return cls("checkpoint x was written by 2 ranks", Path("ckpt"))
    if issubclass(cls, errors.BlockFindingError):
        return cls("no layer stack")
    if issubclass(cls, errors.ConfigError):
        return cls(["lift.schedule: got 'sideways'"])
    if issubclass(cls, errors.CheckpointFileError):
        return cls(Path("ckpt/weights.safetensors"), "truncated")
    return cls(f"a {cls.__name__}")


def test_every_error_has_its_exit_code_and_keeps_its_builtin_base():
    assert set(CLASSES) == set(EXIT_CODES), "give a new error class its exit status here and in lift_ds.errors"
    assert {n: c.exit_code for n, c in CLASSES.items()} == EXIT_CODES
    for name, base in BUILTIN_BASES.items():  # a ValueError for a bad config, hasattr() False for NotUnderLiftError
        assert issubclass(CLASSES[name], base), name
    text = str(errors.ConfigError(["a", "b"], source="x.json"))
    assert text == "invalid LIFT configuration (x.json), 2 problem(s):\n  - a\n  - b"
    assert lift_ds.ConfigError is errors.ConfigError


@pytest.mark.parametrize("name", sorted(EXIT_CODES))
def test_the_launcher_maps_an_error_to_its_exit_code_by_class(name, tmp_path, monkeypatch, capsys):
    """launch/train.py's main: the error raised in training decides the exit status (no model is built here)."""
    error = _instance(CLASSES[name])

    def setup(run: train.Run) -> None:
        run.engine = types.SimpleNamespace(rank=0)

    def failing(run: train.Run) -> None:
        raise error

    monkeypatch.setattr(train, "resolve", lambda args: types.SimpleNamespace(args=args))
    monkeypatch.setattr(train.Run, "setup", setup)
    monkeypatch.setattr(train.Run, "train", failing)
    argv = ["--output_dir", str(tmp_path)]
    if error.exit_code is None:
        with pytest.raises(type(error)):
            train.main(argv)
        return
    assert train.main(argv) == EXIT_CODES[name]
    err = capsys.readouterr().err
    assert err.startswith(f"error: {error}") and "Traceback" not in err
    if error.exit_code == errors.TRAINING_FAULT:
        assert err.rstrip().endswith("No checkpoint was written (use --save_every N).")
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / "latest").write_text("global_step4")
        assert train.main(argv) == 3
        newest = tmp_path / "checkpoints" / "global_step4"
        assert f"The newest checkpoint is {newest}; continue from it" in capsys.readouterr().err


def test_bad_input_found_before_the_run_starts_exits_2(monkeypatch, capsys):
    def refuse(args: object) -> None:
        raise errors.ConfigError(["--lr: must be > 0, got -1.0"])

    monkeypatch.setattr(train, "resolve", refuse)
    assert train.main([]) == 2 and "--lr: must be > 0" in capsys.readouterr().err


def _sources() -> list[Path]:
    return sorted(p for d in ("lift_ds", "launch", "scripts", "tests", "examples") for p in (REPO / d).rglob("*.py"))


def _offenders(path: Path, exceptions: set[str]) -> list[str]:
    """An error class defined outside lift_ds/errors.py, or imported / read from another module than it."""
    rel = path.relative_to(REPO)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef) and rel.parts[0] == "lift_ds" and rel != Path("lift_ds/errors.py"):
            if {getattr(b, "id", None) or getattr(b, "attr", None) for b in node.bases} & exceptions:
                found.append(f"{rel}:{node.lineno} defines {node.name} (error classes live in lift_ds/errors.py)")
        if isinstance(node, ast.ImportFrom):
            source = node.module or ""
            allowed = {"ConfigError"} if source == "lift_ds" and not node.level else set()  # lift_ds.ConfigError
            for alias in node.names:
                if alias.name in CLASSES and source.rpartition(".")[2] != "errors" and alias.name not in allowed:
                    found.append(f"{rel}:{node.lineno} imports {alias.name} from {'.' * node.level}{source}")
        owner = getattr(getattr(node, "value", None), "id", None)
        if isinstance(node, ast.Attribute) and node.attr in CLASSES and owner not in ("errors", "lift_ds"):
            found.append(f"{rel}:{node.lineno} reads {ast.unparse(node)}")
    return found


def test_error_classes_are_defined_and_imported_only_from_lift_ds_errors():
    exceptions = {n for n, c in vars(builtins).items() if inspect.isclass(c) and issubclass(c, BaseException)}
    offenders = [o for path in _sources() for o in _offenders(path, exceptions | set(CLASSES) | {"LiftError"})]
    assert not offenders, "\n".join(offenders)
