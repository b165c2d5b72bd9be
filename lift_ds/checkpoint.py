"""Checkpoints of a LIFT run: the stateful pieces, written with every rank agreeing, published so
that a kill at any point leaves a complete checkpoint, read back without running any pickled code.

A checkpoint ``save_dir/<tag>/`` holds:

- ``lift_state.json`` (rank 0): the engine's progress (:meth:`LiftEngine.progress_state_dict`: the plan
  cursor, the samples read so far, i.e. the data position keyed by global sample index, the step
  guard's counters, the fp16 loss scale), the batch layout, the learning rate, world size, backend,
  the backend's ``layout`` (older checkpoints: ``zero_stage``), the lift section, the names of the
  saved weights, the run's *fingerprint* (every setting that decides the result), client state;
- ``rank<r>_state.pt`` (every rank): the pieces of :meth:`Checkpointer.rank_pieces`, RNG states and
  the learning-rate schedule;
- ``stash.rank<r>.pt`` (every rank): its share of the engine's stashed optimizer states
  (``optimizer_state: offload``, split across ranks by parameter);
- ``weights.safetensors``: the full weights of every block trained so far (untouched blocks equal
  the model the run was built from, which a resumed run must build again);
- ``block_store.safetensors`` (Q-LIFT, ``lift.frozen_weights``): the exact weights of trained
  layers held quantized at the save, from the block store;
- ``optimizer_state.pt``: the active block's optimizer state and fp32 master as full tensors;
- ``manifest.json``: the size and SHA-256 of every file above, written last.

Nothing in it depends on the number of ranks or the backend: a checkpoint resumes on any world size
and any backend that can run the config. When the global batch (micro batch x accumulation x ranks)
is kept, every optimizer step reads the same samples as the uninterrupted run; changing it needs
``allow_batch_change`` and the result differs from an uninterrupted run.

Writing, publishing, recovery after a kill and safe reading are :mod:`lift_ds.checkpoint_io`'s.
Each write stage runs on every rank and is agreed (one all-reduced flag): a failure anywhere removes
the partial directory and raises :class:`CheckpointError` on every rank. On resume the newest
complete checkpoint is used (``latest``, or the newest that verifies when ``latest``'s is
incomplete or corrupt, with a warning); a resume whose settings would change the result is refused
naming them, except the learning rate, which is applied and logged (see :meth:`Checkpointer.load`).
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from . import checkpoint_io as cio
from . import faults
from .backends.distributed import checkpoint_layout
from .backends.state import WEIGHTS_FILE
from .checkpoint_io import FORMAT, LATEST, STATE_FILE, is_tag
from .errors import CheckpointError, ConfigError, ResumeError
from .utils import get_logger, rng_state, set_rng_state

if TYPE_CHECKING:  # pragma: no cover
    from .engine import LiftEngine

logger = get_logger(__name__)

#: lift keys that do not change the result (how and where it runs): left out of the fingerprint
LAYOUT_LIFT_KEYS = (
    "backend",
    "gradient_checkpointing",
    "block_store",
    "block_store_dir",
    "max_consecutive_skipped_steps",
    "frozen_cache_mb",
)


def _portable(state: Any, what: str) -> None:
    """Refuse (at save time) a state a ``weights_only`` load could not read back."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    try:
        torch.load(buf, weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            errno.EINVAL,
            f"{what} holds something other than tensors, numbers, strings, lists and dicts, "
            f"which a safe load (weights_only=True) refuses ({cio._summary(e)})",
        ) from None


class Stateful(Protocol):
    """A piece of a run that owns its state (torch.distributed.checkpoint's ``Stateful``)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class _RNG:
    """This process's random number generators (Python, NumPy, torch, CUDA) as a stateful piece."""

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)


RNG = _RNG()


class Checkpointer:
    """Saves and restores a :class:`~lift_ds.engine.LiftEngine`'s stateful pieces, each of which owns
    its state (``state_dict`` / ``load_state_dict``): the engine's progress (cursor, data position,
    step guard, precision state, stash), the learning-rate schedule and RNG (:meth:`rank_pieces`), and
    through the backend the trained weights and the active block's optimizer state. The engine
    decides its phases: a load hands it its progress (it ends the phase running), then the weights,
    then :meth:`~lift_ds.engine.LiftEngine.resume_phase` builds the phase the checkpoint is in."""

    def __init__(self, engine: LiftEngine) -> None:
        self.engine = engine
        #: the file-operation counter of the last save (lift_ds.faults.save_ops)
        self.last_ops: Callable[[str], None] = lambda what: None

    @property
    def _rank(self) -> int:
        return self.engine.backend.rank

    def rank_pieces(self) -> dict[str, Stateful]:
        """The stateful pieces every rank writes into ``rank<r>_state.pt``, by name. Rank 0 writes the
        engine's progress (:meth:`LiftEngine.progress_state_dict`) into ``lift_state.json``, each rank its share
        of the stash into ``stash.rank<r>.pt``; the backend writes the weights and optimizer state."""
        return {"rng": RNG, "lr_scheduler": self.engine.lr_scheduler}

    def fingerprint(self) -> dict[str, Any]:
        """Every setting that decides the result (JSON-ready): the plan, the lift keys that shape it,
        clipping, precision, and what the run adds (``engine.run_fingerprint``: the optimizer, the
        schedule, and for the launcher the data, data seed and model)."""
        e = self.engine
        fp: dict[str, Any] = {"plan": e.cursor.fingerprint}
        fp.update({f"lift.{k}": v for k, v in e.lift.to_dict().items() if k not in LAYOUT_LIFT_KEYS})
        fp.update(
            {
                "gradient_clipping": e.training_config.gradient_clipping,
                "precision": e.training_config.precision,
                **e.run_fingerprint,
            }
        )
        return json.loads(json.dumps(fp, default=str))

    # ----------------------------------------------------------------- save

    def save(
        self,
        save_dir: str | os.PathLike,
        tag: str | None = None,
        client_state: dict | None = None,
        extra_files: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write a checkpoint (collective: every rank calls it); returns its directory. ``extra_files(dir)``
        writes more files into it before it is published (collective; e.g. a Hugging Face model)."""
        e = self.engine
        progress = e.progress_state_dict()  # first: it refuses a save in the middle of gradient accumulation
        stash = progress.pop("stash")
        if tag is not None and not is_tag(tag):
            raise ConfigError(
                [
                    f"tag: {tag!r} must be a plain directory name (letters, digits, _ . + -; no path separators, no "
                    "leading dot, no ..), e.g. global_step100"
                ]
            )
        save_dir = Path(save_dir)
        tag = tag or f"global_step{e.global_step}"
        final, tmp = save_dir / tag, save_dir / f".{tag}.partial"
        names = e.saved_param_names()
        # the launcher's rotation after the save counts on
        op = self.last_ops = faults.save_ops(e.global_step, self._rank)

        def prepare() -> None:
            if self._rank == 0:
                save_dir.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
                op("directory made")
                need = self._checkpoint_bytes(names)
                free = shutil.disk_usage(save_dir).free
                if free < need:
                    raise OSError(
                        errno.ENOSPC,
                        f"{free / 2**20:.0f} MiB free, the checkpoint needs about {need / 2**20:.0f} MiB",
                        str(save_dir),
                    )

        def then(fn: Callable[[], None], what: str, rank0: bool = True) -> Callable[[], None]:
            def run() -> None:
                fn()
                if self._rank == 0 or not rank0:
                    op(what)

            return run

        def write_state() -> None:
            state = {name: piece.state_dict() for name, piece in self.rank_pieces().items()}
            _portable(state, "the RNG / learning-rate scheduler state")
            torch.save(state, tmp / f"rank{self._rank}_state.pt")
            op("rank state written")
            torch.save(stash, tmp / f"stash.rank{self._rank}.pt")
            op("stash written")
            if self._rank == 0:
                t = e.training_config
                meta = {
                    "format": FORMAT,
                    **progress,
                    "lr": e.lr_scheduler.lr,
                    "world_size": e.world_size,
                    "backend": e.backend.name,
                    "layout": checkpoint_layout(e.backend),
                    "micro_batch_size": t.micro_batch_size,
                    "gradient_accumulation_steps": t.gradient_accumulation_steps,
                    "train_batch_size": t.train_batch_size,
                    "precision": t.precision,
                    "lift": e.lift.to_dict(),
                    "saved_params": names,
                    "fingerprint": self.fingerprint(),
                    "client_state": client_state or {},
                }
                (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1, default=_json_default))
                op(f"{STATE_FILE} written")

        def finish() -> None:
            if self._rank == 0:
                cio.write_manifest(tmp, e.global_step, op)
                cio.publish(save_dir, tag, tmp, op)

        agreed = lambda fn: self._agreed(fn, save_dir, tmp, final)  # noqa: E731
        agreed(prepare)
        quantized = set(e.quant.quantized_names()) if e.quant is not None else set()
        agreed(then(lambda: e.backend.save_weights(tmp, [n for n in names if n not in quantized]), "weights written"))
        if e.quant is not None:
            agreed(then(lambda: e.quant.save(tmp, names) if self._rank == 0 else None, "block store written"))
        if e.active_block_index is not None:
            agreed(then(lambda: e.backend.save_optimizer(tmp), "optimizer state written"))
        if extra_files is not None:
            agreed(then(lambda: extra_files(tmp), "extra files written"))
        faults.maybe_kill("save_midway", e.global_step, self._rank)
        agreed(write_state)
        agreed(finish)
        logger.info("saved checkpoint %s (step %d, %d parameter tensors)", final, e.global_step, len(names))
        return final

    def rotate(self, save_dir: str | os.PathLike, prefix: str, keep: int) -> None:
        """Keep the newest ``keep`` checkpoints ``save_dir/<prefix><step>`` (by step) and always the
        one ``latest`` names (the one just written); the others are renamed aside (atomic) and then
        deleted, each operation counted as the last save's (:func:`lift_ds.faults.save_ops`). The one
        rotation of the launcher (``--keep_checkpoints``) and the Trainer (``save_total_limit``);
        rank 0 only, ``keep`` 0 or None keeps every one."""
        if self._rank != 0 or not keep:
            return
        save_dir = Path(save_dir)
        latest, _ = cio.read_latest(save_dir)
        cio.rotate(save_dir, rf"^{re.escape(prefix)}(\d+)$", keep, {latest} if latest else set(), self.last_ops)

    def _checkpoint_bytes(self, names: list[str]) -> int:
        """Rough size: saved weights plus the active block's optimizer state (all ranks)."""
        e = self.engine
        named = dict(e.module.named_parameters())
        weights = sum(e.backend.numel(named[n]) * named[n].element_size() for n in names if n in named)
        active = sum(
            e.backend.numel(named[n])
            for n in (e.trainable_param_names() if e.active_block_index is not None else [])
            if n in named
        )
        return weights + 12 * active

    def _agreed(self, fn: Callable[[], None], save_dir: Path, tmp: Path, final: Path) -> None:
        """Run one stage of a save on every rank; if it failed on any rank, remove the partial
        checkpoint and raise :class:`CheckpointError` on every rank."""
        err: OSError | None = None
        try:
            fn()
        except OSError as ex:
            err = ex
        if not self.engine.backend.any_rank(err is not None):
            return
        if self._rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        prev, _ = cio.read_latest(save_dir)
        if err is None:
            cause = "another rank could not write its part (see its message)"
        else:
            what = err.strerror or str(err)
            cause = f"{what} ({err.filename})" if err.filename else what
        raise CheckpointError(
            errno.EIO if err is None else (err.errno or errno.EIO),
            f"could not write checkpoint {final}: {cause}. "
            + (
                f"The previous checkpoint {save_dir / prev} is untouched and still the newest ({save_dir / LATEST}). "
                if prev
                else "No earlier checkpoint exists. "
            )
            + (
                f"Free disk space or make {save_dir} writable (or choose another "
                "--output_dir and copy the checkpoints there), then resume with --resume."
            ),
        )

    # ----------------------------------------------------------------- load

    def find(self, load_dir: str | os.PathLike, tag: str | None = None) -> Path | None:
        """The checkpoint to resume from: ``tag``, else the one ``load_dir/latest`` names, else (when
        that one is missing, incomplete or corrupt) the newest complete one, with a warning; None
        when there is none. Finishes or undoes what a kill interrupted first (collective)."""
        from .checkpoint_find import choose

        return choose(self.engine.backend, Path(load_dir), tag)

    def load(
        self, load_dir: str | os.PathLike, tag: str | None = None, allow_batch_change: bool = False
    ) -> tuple[Path | None, dict]:
        """Restore every piece from a checkpoint, on any world size and backend; ``(path,
        client_state)``, or ``(None, {})`` when there is none.

        Every file is read with ``weights_only=True`` (or as JSON / safetensors) before anything
        changes, on every rank, and the ranks agree. A learning rate other than the checkpoint's is
        applied: the schedule continues at the checkpoint's step as the new rate gives (logged).

        Raises:
            ResumeError: a file that cannot be read safely (named), another plan or another setting
                that decides the result (named), a checkpoint from an older format, or (without
                ``allow_batch_change``) another global batch size.
        """
        from .checkpoint_find import check_fingerprint, check_layout, read_files, read_meta

        e = self.engine
        path = self.find(load_dir, tag)
        if path is None:
            return None, {}
        meta = read_meta(self, path)  # collective, as read_files: a ResumeError on every rank or on none
        check_layout(e, meta, path, allow_batch_change)
        check_fingerprint(self, meta, path)
        files = read_files(self, path, meta)
        try:
            e.load_progress_state_dict({**meta, "stash": files.stash})  # the progress; the engine ends its phase
        except ValueError as ex:
            raise ResumeError(str(ex), path) from None
        taken = e.quant.load(path, path / WEIGHTS_FILE) if e.quant is not None else set()
        e.backend.load_weights(path, skip=taken)
        e.resume_phase(files.optimizer)  # the engine builds the phase the cursor is in
        pieces = self.rank_pieces()
        changed = pieces["lr_scheduler"].load_state_dict(files.own["lr_scheduler"], resume_step=e.global_step)
        if changed:
            logger.warning("resuming %s: %s", path, changed)
        if e.optimizer is not None:
            e.lr_scheduler.apply(e.optimizer)
        pieces["rng"].load_state_dict(files.own["rng"])  # last: nothing above draws from it
        logger.info("resumed from %s at step %d", path, e.global_step)
        return path, meta.get("client_state", {})


def _json_default(o: Any) -> Any:
    if torch.is_tensor(o):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


__all__ = ["Checkpointer"]
