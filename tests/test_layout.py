"""The code's layout rules, checked: a lift key is declared once (validation, flag, the table in
docs/configuration.md follow from the declaration), only lift_ds/backends/ touches DeepSpeed or a backend's
name, modules stay small, and the README stays a front door whose links all resolve."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from lift_ds import config
from lift_ds.backends import REGISTRY
from lift_ds.cli import build_parser, overrides_from_args
from lift_ds.config import ConfigError, LiftConfig, lift_settings, parse_lift_section, setting, settings_table

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lift_ds"
BAD_VALUE = {"choice": "nonsense", "bool": "yes", "int": "ten", "layer_range": [3, 1], "patterns": 5, "path": 7}


def test_configuration_table_is_the_declarations():
    """docs/configuration.md's `lift` table is settings_table(), row for row (no stale or extra row)."""
    lines = (REPO / "docs" / "configuration.md").read_text().splitlines()
    start = lines.index(settings_table().splitlines()[0])
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    assert "\n".join(lines[start:end]) == settings_table(), (
        "regenerate the table in docs/configuration.md: python -c 'from lift_ds.config import settings_table; print(settings_table())'")


#: the README is the front door: what it is, install, the two commands, the drop-in surfaces, launching, links
README_MAX_LINES = 220
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^\s*(```|~~~)")


def _markdown_pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _prose(path: Path) -> list[str]:
    """The lines of a markdown file outside fenced code blocks."""
    out, fenced = [], False
    for line in path.read_text().splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            out.append(line)
    return out


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file (lower case, punctuation dropped, spaces to hyphens)."""
    seen: dict[str, int] = {}
    for line in _prose(path):
        if m := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
            seen[slug] = seen.get(slug, -1) + 1
            if seen[slug]:
                seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def broken_links(pages: list[Path], root: Path = REPO) -> list[str]:
    """Every relative link in ``pages`` whose file (or, into a markdown file, heading anchor) does not exist."""
    broken = []
    for page in pages:
        for n, line in enumerate(_prose(page), 1):
            for target in _LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
                    continue
                file, _, anchor = target.partition("#")
                dest = (page.parent / file).resolve() if file else page
                if not dest.exists():
                    broken.append(f"{page.relative_to(root)}: {target} (no such file)")
                elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                    broken.append(f"{page.relative_to(root)}: {target} (no such heading)")
    return broken


def test_readme_is_a_front_door_and_every_doc_is_linked():
    readme = REPO / "README.md"
    assert len(readme.read_text().splitlines()) < README_MAX_LINES, "README.md is the front door: move reference text to docs/"
    linked = {(readme.parent / t.partition("#")[0]).resolve() for line in _prose(readme) for t in _LINK.findall(line)}
    unlinked = [p.name for p in sorted((REPO / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link to: {unlinked}"


def test_every_relative_link_in_the_docs_resolves(tmp_path):
    assert not broken_links(_markdown_pages()), broken_links(_markdown_pages())
    # the check itself: a page with a broken file link and a broken anchor, beside good ones
    (tmp_path / "b.md").write_text("# A heading: with `code` / slashes\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md) [ok](b.md#a-heading-with-code--slashes) [ok](#top) [web](https://example.org/x)\n"
                    "# Top\n[gone](missing.md) [bad](b.md#nowhere)\n```\n[in code](ignored.md)\n```\n")
    found = [b.split(": ", 1)[1] for b in broken_links([page], root=tmp_path)]
    assert found == ["missing.md (no such file)", "b.md#nowhere (no such heading)"], found


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
            # what backends/ keeps: the process group, DTensor shards, aten's linear (compat), ZeRO's vocabulary
            if isinstance(node, ast.Attribute) and node.attr in BACKEND_ONLY_NAMES:
                offenders.append(f"{path.name}:{node.lineno} uses {node.attr}")
            if isinstance(node, ast.Constant) and node.value == "zero_stage":
                offenders.append(f"{path.name}:{node.lineno} names zero_stage")
            if isinstance(node, ast.FunctionDef) and node.name in BACKEND_ONLY_NAMES:
                offenders.append(f"{path.name}:{node.lineno} defines {node.name}")
    assert not offenders, offenders


#: attributes only lift_ds/backends/ uses (outside it: backends.distributed / compat; ``_nn``: torch._C._nn.linear)
BACKEND_ONLY_NAMES = {"init_process_group", "to_local", "full_tensor", "_nn"}


def test_modules_stay_small():
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in _python_files()}
    assert max(sizes.values()) <= 420, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
