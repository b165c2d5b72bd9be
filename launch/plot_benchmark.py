#!/usr/bin/env python3
"""Bar charts of a launch/benchmark.py result: model states per rank and median step time per method.

python launch/plot_benchmark.py docs/benchmark.json --out docs/benchmark.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def plot(results: dict, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    colors = ["tab:blue" if n.startswith("lift") else "tab:gray" for n in names]
    gib = 1024**3
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [
        ("model states per rank (GiB)", [results[n]["model_state_bytes"] / gib for n in names]),
        ("peak RSS per rank (GiB)", [results[n]["peak_rss_bytes"] / gib for n in names]),
        ("median step time (s)", [results[n]["median_step_s"] for n in names]),
    ]
    for ax, (label, values) in zip(axes, panels):
        bars = ax.bar(range(len(names)), values, color=colors)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=40, ha="right", fontsize=8)
        ax.set_title(label)
        for b, v in zip(bars, values):
            ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="benchmark JSON files (their methods are merged, later files win)")
    p.add_argument("--out", default="docs/benchmark.png")
    p.add_argument("--title", default="LIFT (blue) vs baselines, SmolLM2-135M")
    args = p.parse_args()
    merged: dict = {}
    for f in args.results:
        merged.update(json.loads(Path(f).read_text())["results"])
    plot(merged, Path(args.out), args.title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
