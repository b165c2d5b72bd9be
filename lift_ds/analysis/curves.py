"""Validation curves (appendix D, figure 5): a metric against step from launch/train.py metrics.jsonl files."""

from __future__ import annotations

from pathlib import Path


def read_curve(path: Path, metric: str) -> list[tuple[int, float]]:
    """``(step, value)`` of ``metric`` in a metrics.jsonl file (bad lines named by file and line)."""
    from ..data import read_jsonl
    from ..errors import DataError

    if not path.is_file():
        raise DataError(f"--run: file {str(path)!r} does not exist")
    points = [(int(rec["step"]), float(rec[metric])) for rec in read_jsonl(path) if metric in rec and "step" in rec]
    if not points:
        raise DataError(f"{path}: no records with {metric!r} (train with --eval_every N to log it)")
    return sorted(points)


def run_summary(path: Path) -> dict:
    """What a run's metrics.jsonl (and the result.json beside it, if any) say about it: every evaluation
    record, the training steps' median time, and the loop and phase-switch seconds."""
    import json
    import statistics

    from ..data import read_jsonl

    records = list(read_jsonl(path))
    steps = [r for r in records if "loss" in r and "step_s" in r]
    evaluations = [
        {k: v for k, v in r.items() if not k.startswith("_")} for r in records if any(k.startswith("eval_") for k in r)
    ]
    summary: dict = {
        "metrics": str(path),
        "evaluations": evaluations,
        "steps": len(steps),
        "median_step_s": statistics.median(r["step_s"] for r in steps) if steps else None,
        "sum_step_s": sum(r["step_s"] for r in steps),
    }
    result = path.with_name("result.json")
    if result.is_file():
        r = json.loads(result.read_text())
        summary.update(
            {
                k: r[k]
                for k in ("train_loop_seconds", "phase_switch_seconds", "before", "after", "world_size", "backend")
                if k in r
            }
        )
    return summary


def curves(runs: list[tuple[str, Path]], metric: str, out: Path, title: str) -> dict[str, list[tuple[int, float]]]:
    """Plot ``metric`` per run to ``out`` (PNG) and write the data behind it, with provenance, to
    ``out`` with the suffix ``.json`` (every evaluation of every run, step times, loop seconds)."""
    from ..provenance import write_json

    data = {label: read_curve(path, metric) for label, path in runs}
    plot_series([(label, [s for s, _ in pts], [v for _, v in pts]) for label, pts in data.items()], out, title, metric)
    write_json(
        out.with_suffix(".json"),
        {"metric": metric, "title": title, "runs": {label: run_summary(path) for label, path in runs}},
    )
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
