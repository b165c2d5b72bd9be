"""The paper's analyses as tools (appendix B-D); run ``python -m lift_ds.analysis --help``.

Modules: :mod:`.contribution` (which blocks matter), :mod:`.ablation` (which settings win), :mod:`.compare`
(methods at their tuned learning rates),
:mod:`.curves` (validation curves), :mod:`.common` (tasks and one seeded run through
:mod:`lift_ds.recipe`), :mod:`.cli` (the command line).
"""

from __future__ import annotations

from .ablation import ablation, markdown_table, named_range, settings
from .cli import build_parser, main
from .common import Setup, Task, parse_task, run_once
from .contribution import candidates, contribution, recommend_range
from .curves import curves, read_curve

__all__ = [
    "Setup",
    "Task",
    "ablation",
    "build_parser",
    "candidates",
    "contribution",
    "curves",
    "main",
    "markdown_table",
    "named_range",
    "parse_task",
    "read_curve",
    "recommend_range",
    "run_once",
    "settings",
]
