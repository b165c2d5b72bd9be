"""The files of a checkpoint: safe reading, a manifest that says a checkpoint is complete, the
publish order that never destroys the last complete checkpoint, and recovery from a kill anywhere.

A checkpoint ``save_dir/<tag>/`` is *complete* when its ``manifest.json`` (written last, after every
rank's files) lists every file with its size and SHA-256 and all of them match. Publishing:

1. every file is written into ``.<tag>.partial/``, then ``manifest.json`` (files fsynced);
2. an existing ``<tag>/`` (a second save of the same step) is renamed ``.<tag>.old``;
3. ``.<tag>.partial`` is renamed ``<tag>``;
4. ``latest`` is replaced atomically (written to ``.latest.partial`` before step 2, renamed now);
5. ``.<tag>.old`` is removed.

A kill between any two steps leaves a complete checkpoint somewhere: :func:`recover` finishes an
interrupted publish (a complete partial is renamed into place, a set-aside ``.old`` is put back,
``latest`` moved to the checkpoint the interrupted save meant) and removes only what no resume can
need: a partial without a manifest, a set-aside copy whose replacement is in place, a rotation's
``.deleting``. ``latest`` is otherwise left as it is (it may be set by hand to an older checkpoint).

Every ``torch.load`` here is ``weights_only=True``: a checkpoint holds tensors, numbers, strings,
lists and dicts only, so a pickled object in a shared or downloaded checkpoint is refused, never
run (:func:`safe_load` raises :class:`CheckpointFileError` naming the file).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import CheckpointFileError
from .utils import get_logger

logger = get_logger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"
#: rank 0's file of a checkpoint (the plan cursor, data position, fingerprint: :mod:`lift_ds.checkpoint`)
STATE_FILE = "lift_state.json"
#: the layout version a checkpoint's STATE_FILE records; a resume refuses another
FORMAT = 3
#: a checkpoint tag: a plain directory name (no separators, no leading dot, no "..")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}$")
_CHUNK = 1 << 22

Op = Callable[[str], None]


def _no_op(what: str) -> None:
    pass


def is_tag(name: Any) -> bool:
    """Whether ``name`` can be a checkpoint tag: one plain directory name inside the save directory."""
    return isinstance(name, str) and bool(_TAG.match(name)) and ".." not in name


def _summary(e: BaseException) -> str:
    text = " ".join(str(e).split())
    m = re.search(r"Unsupported (?:global|operand)[: ]*(?:GLOBAL )?([\w.]+)", text)
    if m:
        return f"it holds a pickled Python object ({m.group(1)}), which a safe load refuses"
    return f"{type(e).__name__}: {text[:300]}"


def safe_load(path: Path, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; any failure is a :class:`CheckpointFileError`."""
    import torch

    if not path.is_file():
        raise CheckpointFileError(path, "missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - every way a file can be bad ends the same way
        raise CheckpointFileError(path, f"cannot be read safely: {_summary(e)}") from None


def read_json(path: Path) -> Any:
    """A JSON file of a checkpoint; any failure is a :class:`CheckpointFileError`."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointFileError(path, "missing") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointFileError(path, f"cannot be read: {type(e).__name__}: {e}") from None


def _sha256(path: Path, sync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path, step: int, op: Op = _no_op) -> None:
    """Hash (and fsync) every file of ``directory`` into its manifest, written last and atomically."""
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p, sync=True)}
        for p in sorted(directory.iterdir())
        if p.is_file() and not p.is_symlink() and not p.name.startswith(".")
    }
    tmp = directory / f".{MANIFEST}.partial"
    tmp.write_text(json.dumps({"format": 1, "step": step, "files": files}, indent=1))
    os.replace(tmp, directory / MANIFEST)
    _fsync_dir(directory)
    op("manifest")


def manifest_step(directory: Path) -> int | None:
    """The step a checkpoint's manifest records (None without a readable manifest)."""
    try:
        step = json.loads((directory / MANIFEST).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def verify(directory: Path) -> str | None:
    """None when ``directory`` is a complete checkpoint, else what is wrong with it."""
    if not directory.is_dir():
        return "missing"
    if directory.is_symlink():
        return "a link (a checkpoint is a directory inside the save directory)"
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not an object")
    except FileNotFoundError:
        return f"no {MANIFEST} (its write did not finish)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST} ({e})"
    for name, want in files.items():
        p = directory / name
        if not is_tag(name) or not p.is_file():
            return f"{name} is missing"
        if p.is_symlink():
            return f"{name} is a link (every file of a checkpoint lies in its directory)"
        if p.stat().st_size != want.get("size"):
            return f"{name} is truncated or changed ({p.stat().st_size} bytes, the manifest says {want.get('size')})"
        if _sha256(p) != want.get("sha256"):
            return f"{name} is corrupt (its SHA-256 differs from the manifest's)"
    return None


def published(save_dir: Path) -> list[Path]:
    """Checkpoint directories with a manifest, newest first (by the step their manifest records)."""
    if not save_dir.is_dir():
        return []
    found = [
        (s, p)
        for p in save_dir.iterdir()
        if is_tag(p.name) and p.is_dir() and not p.is_symlink() and (s := manifest_step(p)) is not None
    ]
    return [p for _, p in sorted(found, key=lambda sp: (sp[0], sp[1].stat().st_mtime), reverse=True)]


def read_latest(save_dir: Path) -> tuple[str | None, str | None]:
    """``(tag, problem)`` from ``save_dir/latest``: a tag only if it names a directory inside ``save_dir``."""
    latest = save_dir / LATEST
    if not latest.is_file():
        return None, None
    try:
        tag = latest.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{latest} cannot be read ({e})"
    if not is_tag(tag):
        return (
            None,
            f"{latest} holds {tag[:80]!r}, which is not a checkpoint name inside {save_dir} (a plain directory name)",
        )
    path = save_dir / tag
    if path.is_symlink() or (path.exists() and path.resolve().parent != save_dir.resolve()):
        return None, f"{latest} names {tag!r}, a link out of {save_dir}"
    return tag, None


def set_latest(save_dir: Path, tag: str) -> None:
    """Point ``latest`` at ``tag`` atomically."""
    tmp = save_dir / f".{LATEST}.partial"
    tmp.write_text(tag)
    os.replace(tmp, save_dir / LATEST)
    _fsync_dir(save_dir)


def publish(save_dir: Path, tag: str, tmp: Path, op: Op = _no_op) -> None:
    """Steps 2-5 of the module docstring (after :func:`write_manifest`). The new ``latest`` is
    written first as ``.latest.partial`` (the intent, so recovery can finish the publish) and
    renamed over ``latest`` once the checkpoint is in place."""
    final, old, intent = save_dir / tag, save_dir / f".{tag}.old", save_dir / f".{LATEST}.partial"
    intent.write_text(tag)
    op("latest written")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        op("previous copy set aside")
    os.replace(tmp, final)
    _fsync_dir(save_dir)
    op("renamed into place")
    os.replace(intent, save_dir / LATEST)
    _fsync_dir(save_dir)
    op("latest replaced")
    if old.exists():
        shutil.rmtree(old)
        op("previous copy removed")


def _remove(path: Path, why: str) -> None:
    logger.warning("removing %s: %s", path, why)
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def recover(save_dir: Path) -> None:
    """Finish or undo what a kill interrupted in ``save_dir`` (rank 0, before choosing a checkpoint)."""
    intent_file = save_dir / f".{LATEST}.partial"
    intent = intent_file.read_text().strip() if intent_file.is_file() else None
    latest_tag, _ = read_latest(save_dir)
    latest_step = manifest_step(save_dir / latest_tag) if latest_tag and (save_dir / latest_tag).is_dir() else None
    for p in sorted(save_dir.glob(".*.partial")):
        tag = p.name[1 : -len(".partial")]
        if p == intent_file:
            continue
        if not p.is_dir() or not is_tag(tag) or verify(p) is not None:
            _remove(p, "an unfinished checkpoint write, never published")
        elif (save_dir / tag).exists():
            _remove(p, f"a complete copy of {tag}, which is in place")
        else:  # killed between its manifest and its rename: complete, so finish the publish
            os.replace(p, save_dir / tag)
            logger.warning("finished the interrupted publish of %s (its files were complete)", save_dir / tag)
            step = manifest_step(save_dir / tag)
            if intent is None and (latest_step is None or (step is not None and step > latest_step)):
                intent = tag
    for p in sorted(save_dir.glob(".*.old")):
        tag = p.name[1 : -len(".old")]
        if not is_tag(tag) or (save_dir / tag).exists():
            _remove(p, "a set-aside copy that was replaced")
        else:
            os.replace(p, save_dir / tag)
            logger.warning("put back %s (set aside by a save that did not finish)", save_dir / tag)
    if intent is not None and is_tag(intent) and verify(save_dir / intent) is None:
        if intent != latest_tag:
            logger.warning(
                "moved %s to %s (the save that wrote it was cut short before it could)", save_dir / LATEST, intent
            )
        set_latest(save_dir, intent)
    elif intent_file.exists():
        _remove(intent_file, "an unfinished update of latest")
    for p in sorted(save_dir.glob(".*.deleting")):
        _remove(p, "a rotated-out checkpoint whose removal did not finish")


def rotate(save_dir: Path, pattern: str, keep: int, protect: set[str], op: Op = _no_op) -> None:
    """Remove all but the newest ``keep`` checkpoints named by ``pattern`` (a regex with the step as
    group 1), never one in ``protect``: renamed aside (atomic) and then deleted."""
    if keep <= 0:
        return
    rx = re.compile(pattern)
    found = sorted((int(m.group(1)), p) for p in save_dir.iterdir() if p.is_dir() and (m := rx.match(p.name)))
    for _, old in found[:-keep]:
        if old.name in protect:
            continue
        doomed = save_dir / f".{old.name}.deleting"
        os.replace(old, doomed)
        op("rotated out")
        shutil.rmtree(doomed, ignore_errors=True)
        op("rotated removed")
