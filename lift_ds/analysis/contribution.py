"""Contribution (appendix B, figure 4): fine-tune each candidate block alone, with the head, and
score it relative to the average over blocks; recommend the best contiguous layer window."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .common import Setup, Task, mean_over_seeds, write_tables


def candidates(model: Any, sublayers: bool) -> list[tuple[str, list[str], int | None]]:
    """``(name, parameter names, layer number)`` for each candidate; the head block is left out
    (it trains with every candidate)."""
    from torch import nn

    from ..blocks import find_blocks

    out = []
    for b in find_blocks(model):
        if b.kind == "head":
            continue
        if b.kind == "layer" and sublayers:
            layer = model.get_submodule(b.name)
            for sub_name, sub in layer.named_modules():
                own = [f"{b.name}.{sub_name}.{n}" for n, _ in sub.named_parameters(recurse=False)]
                if own and (isinstance(sub, nn.Linear) or "norm" in type(sub).__name__.lower()):
                    out.append((f"{b.name}.{sub_name}", own, b.layer_number))
        else:
            out.append((b.name, list(b.param_names), b.layer_number))
    return out


def head_params(model: Any) -> list[str]:
    from ..blocks import find_blocks

    return [n for b in find_blocks(model) if b.kind == "head" for n in b.param_names]


def recommend_range(rows: list[dict], tasks: list[str], window: int) -> tuple[list[int], float, float]:
    """The contiguous ``window`` of layers with the highest mean relative score (sub-layer scores
    averaged per layer). Returns ``([first, last], its mean, the mean over all layers)``."""
    per_layer: dict[int, list[float]] = {}
    for r in rows:
        if r["layer"] is not None:
            per_layer.setdefault(r["layer"], []).extend(r[f"rel_{t}"] for t in tasks)
    layers = sorted(per_layer)
    means = [statistics.mean(per_layer[k]) for k in layers]
    window = max(1, min(window, len(layers)))
    best = max(range(len(layers) - window + 1), key=lambda i: sum(means[i : i + window]))
    return (
        [layers[best], layers[best + window - 1]],
        statistics.mean(means[best : best + window]),
        statistics.mean(means),
    )


def contribution(
    setup: Setup,
    tasks: list[Task],
    seeds: list[int],
    sublayers: bool,
    window: int,
    out: Path,
    only: list[str] | None = None,
) -> dict:
    model = setup.model_for(tasks[0], seeds[0], meta=True)  # names only
    cands = candidates(model, sublayers)
    if only:
        cands = [c for c in cands if any(c[0] == o or c[0].startswith(o + ".") for o in only)]
        if not cands:
            raise ConfigError([f"--only: {only} matches no candidate block"])
    head = head_params(model)
    del model
    rows = [{"block": name, "layer": layer, "parameters": len(params)} for name, params, layer in cands]
    for task in tasks:
        for row, (name, params, _) in zip(rows, cands):
            r = mean_over_seeds(setup, task, seeds, trainable=list(dict.fromkeys(params + head)))
            row[f"score_{task.name}"] = r["score"]
            print(
                f"[contribution] {task.name} {name}: score {r['score']:.4f} ({r['seconds']:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
        avg = statistics.mean(r[f"score_{task.name}"] for r in rows)
        for row in rows:
            row[f"rel_{task.name}"] = row[f"score_{task.name}"] / avg if avg else float("nan")
    names = [t.name for t in tasks]
    rec, rec_mean, all_mean = (
        recommend_range(rows, names, window) if any(r["layer"] for r in rows) else ([], float("nan"), float("nan"))
    )
    result = {
        "tasks": names,
        "seeds": seeds,
        "steps": setup.steps,
        "lr": setup.lr,
        "model": setup.model,
        "rows": rows,
        "recommended_layer_range": rec,
        "recommended_mean_relative": rec_mean,
        "all_layers_mean_relative": all_mean,
    }
    write_tables(out, "contribution", result, rows)
    heatmap(
        rows,
        names,
        out / "contribution.png",
        f"relative contribution ({Path(setup.model).name}, {setup.steps} steps, {len(seeds)} seed(s))",
    )
    return result


def heatmap(rows: list[dict], tasks: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array([[r[f"rel_{t}"] for t in tasks] for r in rows])
    fig, ax = plt.subplots(figsize=(2.2 + 1.3 * len(tasks), 1.2 + 0.22 * len(rows)))
    im = ax.imshow(values, aspect="auto", cmap="RdYlGn")
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r["block"] for r in rows], fontsize=7)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax, label="score / mean over blocks")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
