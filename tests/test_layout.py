"""The code's layout rules, checked: a lift key is declared once (validation, flag, README table
follow from the declaration), only lift_ds/backends/ touches DeepSpeed or a backend's name, and
modules stay small."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from lift_ds import config
from lift_ds.backends import REGISTRY
from lift_ds.cli import build_parser, overrides_from_args
from lift_ds.config import ConfigError, LiftConfig, lift_settings, parse_lift_section, setting, settings_table

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lift_ds"
BAD_VALUE = {"choice": "nonsense", "bool": "yes", "int": "ten", "layer_range": [3, 1], "patterns": 5, "path": 7}


def test_readme_configuration_table_is_the_declarations():
    assert settings_table() in (REPO / "README.md").read_text(), "regenerate the README table: python -c 'from lift_ds.config import settings_table; print(settings_table())'"


@pytest.mark.parametrize("name", [f.name for f in lift_settings()])
def test_every_declared_key_is_validated_and_has_its_flag(name):
    f = next(f for f in lift_settings() if f.name == name)
    assert parse_lift_section({}) == LiftConfig() and getattr(LiftConfig(), name) == f.default
    with pytest.raises(ConfigError, match=rf"lift\.{name}: "):
        parse_lift_section({name: BAD_VALUE[f.metadata["kind"]]})
    help_text = " ".join(build_parser().format_help().split())
    if f.metadata["flag"]:
        assert f"--{name}" in help_text and " ".join(f.metadata["help"].split())[:40] in help_text


def test_a_new_key_needs_one_declaration(monkeypatch):
    """Declare one more field: it is validated, gets a flag that overrides it, and a README row."""
    extended = dataclasses.make_dataclass(
        "LiftConfig", [("warmup_phases", int, setting(0, "phases before the first switch (an example key)", kind="int", minimum=0))],
        bases=(LiftConfig,), frozen=True)
    monkeypatch.setattr(config, "LiftConfig", extended)
    assert parse_lift_section({"warmup_phases": 2}).warmup_phases == 2
    with pytest.raises(ConfigError, match=r"lift\.warmup_phases: must be an integer >= 0, got -1"):
        parse_lift_section({"warmup_phases": -1})
    args = build_parser().parse_args(["--warmup_phases", "3"])
    overrides = overrides_from_args(args, {}, [])
    assert any(o.path == "lift.warmup_phases" and o.value == 3 and o.origin == "--warmup_phases" for o in overrides)
    run = config.load_run_config({"optimizer": {"type": "SGD", "params": {"lr": 0.1}}}, overrides)
    assert run.lift.warmup_phases == 3
    assert "| `warmup_phases` | `0` | `--warmup_phases` | phases before the first switch" in settings_table()


def _python_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_only_backends_import_deepspeed_or_test_a_backend_name():
    offenders = []
    for path in _python_files():
        if "backends" in path.relative_to(PACKAGE).parts:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "deepspeed" for a in node.names):
                offenders.append(f"{path.name}:{node.lineno} imports deepspeed")
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "deepspeed":
                offenders.append(f"{path.name}:{node.lineno} imports from deepspeed")
            if isinstance(node, ast.Compare):
                for side in [node.left, *node.comparators]:
                    if isinstance(side, ast.Constant) and side.value in REGISTRY:
                        offenders.append(f"{path.name}:{node.lineno} compares with backend name {side.value!r}")
    assert not offenders, offenders


def test_modules_stay_small():
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in _python_files()}
    assert max(sizes.values()) <= 420, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
