"""Reading a JSON config strictly, and the checks that apply to every key of it (no torch import).

``json.loads`` accepts what DeepSpeed's own reader or plain JSON would refuse, and some of it trains
silently wrong: ``NaN`` / ``Infinity`` literals (a NaN model at exit 0), a key given twice (the last
one silently wins; DeepSpeed rejects duplicates), an ``enabled`` that is not a boolean (``"yes"``:
lift_ds read fp32 while DeepSpeed's pydantic model would read true), nesting deep enough to hit
Python's recursion limit, or a misspelled top-level key that falls back to a default
(``gradient_cliping``). :func:`parse_json` and :func:`scan` turn each into one problem line naming
its JSON path; :func:`misspelled_top_level` suggests the key that was probably meant.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Iterable
from typing import Any

#: deeper than any DeepSpeed config (they are 3-4 levels); also far below Python's recursion limit
MAX_DEPTH = 32


class _Object(dict):
    """A JSON object as parsed, remembering keys that appeared more than once."""

    duplicates: list[str]


class NonFinite:
    """A ``NaN``, ``Infinity`` or ``-Infinity`` literal (never a value of a checked config)."""

    def __init__(self, literal: str) -> None:
        self.literal = literal

    def __repr__(self) -> str:
        return self.literal


def _pairs(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object()
    seen: dict[str, int] = {}
    for k, v in pairs:
        seen[k] = seen.get(k, 0) + 1
        obj[k] = v
    obj.duplicates = [k for k, n in seen.items() if n > 1]
    return obj


def parse_json(text: str) -> Any:
    """Parse JSON text keeping what :func:`scan` reports: duplicate keys and non-finite literals.

    Raises:
        json.JSONDecodeError: not JSON at all.
        RecursionError: nested deeper than Python's parser can go (callers report it as a problem).
    """
    return json.loads(text, object_pairs_hook=_pairs, parse_constant=NonFinite)


def _is_comment(key: Any) -> bool:
    return isinstance(key, str) and key.startswith("_comment")


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def scan(data: Any, check_enabled: bool = True) -> list[str]:
    """Problems anywhere in a config tree (iteratively: any depth is safe): duplicate keys,
    non-finite numbers (JSON literals or Python floats from a dict config or an override), nesting
    deeper than :data:`MAX_DEPTH`, and (``check_enabled``) an ``enabled`` key that is not a boolean.
    Keys named ``_comment...`` are skipped with their values."""
    problems: list[str] = []
    stack: list[tuple[str, Any, int]] = [("", data, 0)]
    while stack:
        path, node, depth = stack.pop()
        where = path or "the top level"
        if depth > MAX_DEPTH:
            problems.append(
                f"{where}: nested more than {MAX_DEPTH} levels deep; a DeepSpeed config is a few levels deep"
            )
            continue
        if isinstance(node, dict):
            for k in getattr(node, "duplicates", []):
                problems.append(
                    f"{_join(path, k)}: the key appears more than once in its object (JSON keeps the last silently; "
                    "DeepSpeed refuses duplicates); keep one"
                )
            for k, v in node.items():
                if _is_comment(k):
                    continue
                if check_enabled and k == "enabled" and not isinstance(v, bool):
                    hint = (
                        ' ("auto" is filled in only by a Hugging Face Trainer through LiftTrainer)'
                        if v == "auto"
                        else ""
                    )
                    problems.append(f"{_join(path, k)}: must be true or false, got {v!r}{hint}")
                    continue
                stack.append((_join(path, k), v, depth + 1))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                stack.append((f"{path}[{i}]", v, depth + 1))
        elif isinstance(node, NonFinite) or (isinstance(node, float) and not math.isfinite(node)):
            problems.append(
                f"{where}: {node!r} is not a finite number (NaN and Infinity are not JSON numbers, and would train a "
                "NaN model); give a finite value"
            )
    return sorted(problems)


def plain(data: Any) -> Any:
    """The same tree with plain dicts (after :func:`scan` found nothing: no sentinels remain)."""
    return json.loads(json.dumps(data))


def misspelled_top_level(data: Any, known: Iterable[str]) -> list[str]:
    """Top-level keys that are unknown but close to a known one (probably misspelled: their value
    would be ignored and the default used). Other unknown keys pass, as DeepSpeed lets them."""
    if not isinstance(data, dict):
        return []
    known = sorted(set(known))
    problems = []
    for k in data:
        if not isinstance(k, str) or k in known or _is_comment(k):
            continue
        close = difflib.get_close_matches(k, known, n=1, cutoff=0.8)
        if close:
            problems.append(
                f'{k}: unknown top-level key; did you mean "{close[0]}"? (an unknown key is ignored and the '
                f'default of "{close[0]}" would be used)'
            )
    return problems
