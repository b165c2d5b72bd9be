"""Ablation (appendix C, tables 5-10): LIFT over layer ranges, schedules and policies next to FT-Full,
in the paper's table layout."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .common import Setup, Task, mean_over_seeds, write_tables


def named_range(name: str, num_layers: int) -> tuple[str, list[int] | None]:
    """``all``, ``first``/``middle``/``last`` third, or ``A-B`` (1-indexed, inclusive)."""
    third = max(1, num_layers // 3)
    if name == "all":
        return "all", None
    if name == "first":
        return f"first [1, {third}]", [1, third]
    if name == "middle":
        start = (num_layers - third) // 2 + 1
        return f"middle [{start}, {start + third - 1}]", [start, start + third - 1]
    if name == "last":
        return f"last [{num_layers - third + 1}, {num_layers}]", [num_layers - third + 1, num_layers]
    try:
        a, b = (int(x) for x in name.split("-"))
    except ValueError:
        raise ConfigError([f"--ranges: {name!r} is not all, first, middle, last or A-B (e.g. 6-8)"]) from None
    if not 1 <= a <= b <= num_layers:
        raise ConfigError([f"--ranges: {name!r} must satisfy 1 <= A <= B <= {num_layers}"])
    return f"[{a}, {b}]", [a, b]


def settings(
    num_layers: int, ranges: list[str], schedules: list[str], policies: list[str], grid: str
) -> list[tuple[str, dict]]:
    """(row label, lift section) for each LIFT row of the table."""
    from ..schedule import POLICIES, SCHEDULES

    for s in schedules:
        if s not in SCHEDULES:
            raise ConfigError([f"--schedules: {s!r} unknown; allowed: {', '.join(SCHEDULES)}"])
    for p in policies:
        if p not in POLICIES:
            raise ConfigError([f"--policies: {p!r} unknown; allowed: {', '.join(POLICIES)}"])
    if grid not in ("oat", "full"):
        raise ConfigError([f"--grid: {grid!r} unknown; allowed: oat, full"])
    named = [named_range(r, num_layers) for r in ranges]
    combos: list[tuple[tuple[str, list[int] | None], str, str]] = []
    if grid == "full":
        combos = [(r, s, p) for r in named for s in schedules for p in policies]
    else:  # one factor at a time around the paper's default: all layers, front2end, grouped
        base_r, base_s, base_p = named_range("all", num_layers), "front2end", "grouped"
        combos = (
            [(r, base_s, base_p) for r in named]
            + [(base_r, s, base_p) for s in schedules]
            + [(base_r, base_s, p) for p in policies]
        )
    rows, seen = [], set()
    for (label, lr), s, p in combos:
        key = (label, s, p)
        if key in seen:
            continue
        seen.add(key)
        rows.append((f"LIFT {label} {s} {p}", {"layer_range": lr, "schedule": s, "policy": p}))
    return rows


def ablation(
    setup: Setup, tasks: list[Task], seeds: list[int], rows: list[tuple[str, dict]], out: Path, full_ft: bool = True
) -> dict:
    table: list[dict] = []
    settings_to_run = ([("FT-Full", None)] if full_ft else []) + rows
    for label, lift in settings_to_run:
        row: dict[str, Any] = {"setting": label}
        for task in tasks:
            if lift is None:
                every = [n for n, _ in setup.model_for(task, seeds[0], meta=True).named_parameters()]
                r = mean_over_seeds(setup, task, seeds, trainable=every)
            else:
                r = mean_over_seeds(setup, task, seeds, lift=lift)
            row[task.name] = r["score"]
            row[f"{task.name}_std"] = r["score_std"]
            print(
                f"[ablation] {task.name} {label}: {r['score']:.4f} ({r['seconds']:.0f} s)", file=sys.stderr, flush=True
            )
        row["average"] = statistics.mean(row[t.name] for t in tasks)
        table.append(row)
    names = [t.name for t in tasks]
    result = {"tasks": names, "seeds": seeds, "steps": setup.steps, "lr": setup.lr, "model": setup.model, "rows": table}
    write_tables(out, "ablation", result, table)
    md = markdown_table(table, names)
    (out / "ablation.md").write_text(md + "\n")
    return result


def markdown_table(rows: list[dict], tasks: list[str]) -> str:
    """Rows = settings, columns = tasks and their average (accuracy in %; for text tasks, -loss)."""
    acc = lambda v: f"{100 * v:.1f}" if 0 <= v <= 1 else f"{v:.3f}"  # noqa: E731
    lines = ["| setting | " + " | ".join(tasks) + " | average |", "|---|" + "---|" * (len(tasks) + 1)]
    for r in rows:
        lines.append(f"| {r['setting']} | " + " | ".join(acc(r[t]) for t in tasks) + f" | {acc(r['average'])} |")
    return "\n".join(lines)
