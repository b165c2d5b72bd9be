"""Every figure's data file says where and when it was measured: lift_ds/provenance.py, the scripts that
write data files, and the data files committed under docs/."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from lift_ds import provenance as prov

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
#: scripts that write the data files behind docs/ figures: each writes them through lift_ds.provenance
WRITERS = [
    "launch/benchmark.py",
    "launch/profile_step.py",
    "launch/bench_stream.py",
    "launch/bench_phase_switch.py",
    "launch/bench_7b.py",
    "launch/bench_qlift.py",
    "launch/bench_qlift_7b.py",
    "launch/gpu_bench.py",
    "lift_ds/train.py",
    "lift_ds/analysis/common.py",
    "lift_ds/analysis/compare.py",
    "lift_ds/analysis/curves.py",
    "lift_ds/analysis/cli.py",
]


def test_provenance_names_machine_date_commit_and_versions():
    p = prov.provenance(command=["python", "x.py"])
    assert p["date"].endswith("+00:00") and p["command"] == "python x.py"
    assert len(p["commit"]) == 40 and isinstance(p["dirty"], bool)
    cpu = p["machine"]["cpu"]
    assert cpu["model"] and cpu["cores"] >= 1 and isinstance(cpu["avx512"], bool) and isinstance(cpu["amx"], bool)
    assert set(cpu["flags"]) <= set(prov.CPU_FLAGS) and p["machine"]["memory_gib"] > 0
    assert p["versions"]["torch"]


def test_commit_from_the_environment_where_there_is_no_git(tmp_path, monkeypatch):
    """A copy of the tree without .git (the GPU machine's): LIFT_DS_COMMIT, else an explicit unknown."""
    monkeypatch.setenv("LIFT_DS_COMMIT", "abc123")
    assert prov.git_commit(tmp_path) == {"commit": "abc123", "dirty": None, "commit_from": "LIFT_DS_COMMIT"}
    monkeypatch.delenv("LIFT_DS_COMMIT")
    got = prov.git_commit(tmp_path)
    assert got["commit"] is None and "unknown" in got["commit_from"]


def test_write_json_is_atomic_and_keeps_a_records_own_provenance(tmp_path):
    path = prov.write_json(tmp_path / "a" / "x.json", {"value": 1})
    first = json.loads(path.read_text())
    assert first["value"] == 1 and first["provenance"]["commit"]
    prov.write_json(path, {**first, "value": 2})  # re-written (e.g. a row appended): the record keeps its provenance
    assert json.loads(path.read_text())["provenance"] == first["provenance"]
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]
    side = prov.sidecar(tmp_path / "t.csv")
    assert side.name == "t.csv.provenance.json" and json.loads(side.read_text())["describes"] == "t.csv"


@pytest.mark.parametrize("script", WRITERS)
def test_data_writers_record_provenance(script):
    text = (REPO / script).read_text()
    assert "provenance import" in text, f"{script} writes data files without lift_ds.provenance"
    assert ".write_text(json.dumps(result" not in text and ".write_text(json.dumps(record" not in text, script


def _data_files() -> list[Path]:
    return sorted(
        p
        for p in DOCS.rglob("*")
        if p.is_file() and p.suffix in (".json", ".csv") and not p.name.endswith(".provenance.json")
    )


@pytest.mark.parametrize("path", _data_files(), ids=lambda p: str(p.relative_to(DOCS)))
def test_every_committed_data_file_records_machine_date_and_commit(path):
    record = (
        json.loads(path.read_text())
        if path.suffix == ".json"
        else json.loads(path.with_name(path.name + ".provenance.json").read_text())
    )
    p = record["provenance"]
    assert p["date"] and p["commit"] and p["machine"]["cpu"]["model"], path
    if "recorded_after_the_fact" not in p:  # measured with provenance: the CPU's flags are known
        assert isinstance(p["machine"]["cpu"]["flags"], list), path
    shallow = subprocess.run(
        ["git", "rev-parse", "--is-shallow-repository"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    if shallow == "false":  # a full clone holds every commit a data file names
        known = subprocess.run(["git", "cat-file", "-e", f"{p['commit']}^{{commit}}"], cwd=REPO, capture_output=True)
        assert known.returncode == 0, f"{path}: commit {p['commit']} is not in this repository"


def test_remeasure_refuses_before_it_runs_anything():
    for args, needle in ((["--tiny"], "give it a scratch --out DIR"), (["nonsense"], "unknown step nonsense")):
        proc = subprocess.run(
            ["bash", "scripts/remeasure.sh", *args], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 2 and needle in proc.stderr, (args, proc.stderr)


def test_a_data_file_written_earlier_in_the_run_does_not_make_the_code_dirty(tmp_path):
    """A measurement of several steps writes docs/a.json, then records the next: the code is still the
    commit's (dirty false, the data file listed); a changed source file makes it dirty."""
    import subprocess

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    assert prov.git_commit(tmp_path)["dirty"] is False
    (tmp_path / "docs" / "a.json").write_text('{"new": 1}')
    got = prov.git_commit(tmp_path)
    assert got["dirty"] is False and got["docs_changed"] == ["docs/a.json"]
    (tmp_path / "code.py").write_text("x = 2\n")
    assert prov.git_commit(tmp_path)["dirty"] is True
