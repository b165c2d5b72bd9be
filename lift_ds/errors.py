"""Every error class of lift_ds, each with the exit status the launcher gives it.

This module imports nothing from lift_ds, so any module can raise any of these without importing
another module's machinery. :class:`LiftError` is the base: its ``exit_code`` is what
``launch/train.py`` exits with when the error reaches it (:data:`BAD_INPUT`, 2: a configuration,
data or resume problem found before anything changed; :data:`TRAINING_FAULT`, 3: a fault during
training, after which the newest checkpoint is intact), or None for an error the launcher does not
map (it propagates with its traceback).
"""

from __future__ import annotations

from pathlib import Path

#: exit status of a bad input (configuration, data, a checkpoint this run cannot resume): nothing changed
BAD_INPUT = 2
#: exit status of a fault during training (divergence, a failed checkpoint write, out of memory at a phase)
TRAINING_FAULT = 3


class LiftError(Exception):
    """Base of every lift_ds error; ``exit_code`` is the launcher's exit status for it (None: not mapped)."""

    exit_code: int | None = None


# --------------------------------------------------------------------------- bad input (exit 2)


class ConfigError(ValueError, LiftError):
    """A configuration problem. ``problems`` holds one line per problem, each naming its JSON path."""

    exit_code = BAD_INPUT

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid LIFT configuration ({source}), {len(self.problems)} problem(s):\n{lines}")


class ResumeError(ConfigError):
    """A checkpoint this run cannot resume from (a bad input: exit 2, nothing changed)."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__([message], source=str(path))


class BlockFindingError(ConfigError):
    """No candidate blocks could be found in a model (a configuration problem: raised before any
    process group starts)."""

    def __init__(self, message: str) -> None:
        super().__init__([message], source="model")


class DataError(ValueError, LiftError):
    """A problem with a data file, naming the file (and line where there is one)."""

    exit_code = BAD_INPUT


# --------------------------------------------------------------------------- faults during training (exit 3)


class DivergenceError(RuntimeError, LiftError):
    """``lift.max_consecutive_skipped_steps`` optimizer steps in a row had a non-finite loss or
    gradient norm. They were skipped: the weights are those from before the first of them."""

    exit_code = TRAINING_FAULT


class PhaseOutOfMemoryError(RuntimeError, LiftError):
    """Building a phase (engine, optimizer) for a block ran out of memory."""

    exit_code = TRAINING_FAULT


class CheckpointError(OSError, LiftError):
    """A checkpoint could not be written (disk full, read-only or missing directory, ...); the
    previous checkpoint is untouched and still the newest."""

    exit_code = TRAINING_FAULT


# --------------------------------------------------------------------------- not mapped by the launcher


class CheckpointFileError(ValueError, LiftError):
    """A file of a checkpoint that cannot be read safely (missing, truncated, corrupt, or holding
    something other than tensors and plain data)."""

    def __init__(self, path: Path, why: str) -> None:
        self.path = Path(path)
        self.why = why
        super().__init__(f"{path}: {why}")


class TensorFileError(ValueError, LiftError):
    """A safetensors file that cannot be read (truncated, bad header, unknown dtype)."""


class AssetError(RuntimeError, LiftError):
    """A download that failed, or a file that is not the pinned one."""


class NotUnderLiftError(AttributeError, LiftError):
    """A DeepSpeedEngine member that cannot mean the same under LIFT (the message says why and what
    to use instead). An ``AttributeError``, so ``hasattr`` is False for it, as for a missing member."""
