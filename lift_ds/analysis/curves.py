"""Validation curves (appendix D, figure 5): a metric against step from launch/train.py metrics.jsonl files."""

from __future__ import annotations

from pathlib import Path


def read_curve(path: Path, metric: str) -> list[tuple[int, float]]:
    """``(step, value)`` of ``metric`` in a metrics.jsonl file (bad lines named by file and line)."""
    from ..data import DataError, read_jsonl

    if not path.is_file():
        raise DataError(f"--run: file {str(path)!r} does not exist")
    points = [(int(rec["step"]), float(rec[metric])) for rec in read_jsonl(path) if metric in rec and "step" in rec]
    if not points:
        raise DataError(f"{path}: no records with {metric!r} (train with --eval_every N to log it)")
    return sorted(points)


def curves(runs: list[tuple[str, Path]], metric: str, out: Path, title: str) -> dict[str, list[tuple[int, float]]]:
    data = {label: read_curve(path, metric) for label, path in runs}
    plot_series([(label, [s for s, _ in pts], [v for _, v in pts]) for label, pts in data.items()], out, title, metric)
    return data


def plot_series(series: list[tuple[str, list[int], list[float]]], out: Path, title: str, ylabel: str) -> None:
    """One line per ``(label, steps, values)``, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, steps, values in series:
        ax.plot(steps, values, marker="o", markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
