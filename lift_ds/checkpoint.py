"""Checkpoints of a LIFT run: the stateful pieces, written atomically with every rank agreeing.

A checkpoint ``save_dir/<tag>/`` holds:

- ``lift_state.json`` (rank 0): the plan cursor, the samples read so far (the data position, keyed
  by global sample index), the batch layout, the step guard's counters, the learning rate, world
  size, backend, the lift section, the names of the saved weights, client state;
- ``rank<r>_state.pt`` (every rank): RNG states and the learning-rate schedule;
- ``stash.rank<r>.pt`` (every rank): its share of the stashed optimizer states
  (``optimizer_state: offload``, split across ranks by parameter);
- ``weights.safetensors``: the full weights of every block trained so far (untouched blocks equal
  the model the run was built from, which a resumed run must build again);
- ``block_store.safetensors`` (Q-LIFT, ``lift.frozen_weights``): the exact weights of trained
  layers held quantized at the save, from the block store;
- ``optimizer_state.pt``: the active block's optimizer state and fp32 master as full tensors.

Nothing in it depends on the number of ranks or the backend: a checkpoint resumes on any world size
and any backend that can run the config. When the global batch (micro batch x accumulation x ranks)
is kept, every optimizer step reads the same samples as the uninterrupted run; changing it needs
``allow_batch_change`` and the result differs from an uninterrupted run.

Writes go to ``.<tag>.partial`` and are renamed at the end; ``latest`` is replaced atomically
after that, so a crash mid-save leaves the previous checkpoint the newest. Each stage runs on every
rank and is agreed (one all-reduced flag): a failure anywhere removes the partial directory and
raises :class:`CheckpointError` on every rank, so no rank is left waiting.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from .backends.state import WEIGHTS_FILE
from .config import ConfigError
from .faults import maybe_kill
from .utils import get_logger, rng_state, set_rng_state

if TYPE_CHECKING:  # pragma: no cover
    from .engine import LiftEngine

logger = get_logger(__name__)

LATEST = "latest"
STATE_FILE = "lift_state.json"
FORMAT = 2


class CheckpointError(OSError):
    """A checkpoint could not be written (disk full, read-only or missing directory, ...); the
    previous checkpoint is untouched and still the newest."""


class ResumeError(ConfigError):
    """A checkpoint this run cannot resume from as configured (a bad input: exit 2, nothing changed)."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__([message], source=str(path))


class Checkpointer:
    """Saves and restores a :class:`~lift_ds.engine.LiftEngine`'s stateful pieces: the cursor,
    the step guard, the learning-rate schedule, the stashed optimizer states, RNG, and (through the
    backend) the trained weights and the active block's optimizer state."""

    def __init__(self, engine: "LiftEngine") -> None:
        self.engine = engine

    @property
    def _rank(self) -> int:
        return self.engine.backend.rank

    # ----------------------------------------------------------------- save

    def save(self, save_dir: str | os.PathLike, tag: str | None = None, client_state: dict | None = None,
             extra_files: Callable[[Path], None] | None = None) -> Path:
        """Write a checkpoint (collective: every rank calls it); returns its directory. ``extra_files(dir)``
        writes more files into it before it is published (collective; e.g. a Hugging Face model)."""
        e = self.engine
        if e.micro_steps % e.training_config.gradient_accumulation_steps:
            raise RuntimeError("save_checkpoint() in the middle of gradient accumulation; save after an optimizer step")
        save_dir = Path(save_dir)
        tag = tag or f"global_step{e.global_step}"
        final, tmp = save_dir / tag, save_dir / f".{tag}.partial"
        names = e.saved_param_names()

        def prepare() -> None:
            if self._rank == 0:
                save_dir.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
                need = self._checkpoint_bytes(names)
                free = shutil.disk_usage(save_dir).free
                if free < need:
                    raise OSError(errno.ENOSPC, f"{free / 2**20:.0f} MiB free, the checkpoint needs about {need / 2**20:.0f} MiB", str(save_dir))

        def write_state() -> None:
            torch.save({"rng": rng_state(), "lr_scheduler": e.lr_scheduler.state_dict()}, tmp / f"rank{self._rank}_state.pt")
            torch.save(e.stash, tmp / f"stash.rank{self._rank}.pt")
            if self._rank == 0:
                t = e.training_config
                meta = {
                    "format": FORMAT, "cursor": e.cursor.state_dict(), "samples_seen": e.samples_seen, "lr": e.lr_scheduler.lr,
                    "world_size": e.world_size, "backend": e.backend.name, "zero_stage": e.backend.memory_layout()[0],
                    "micro_batch_size": t.micro_batch_size,
                    "gradient_accumulation_steps": t.gradient_accumulation_steps, "train_batch_size": t.train_batch_size,
                    "precision": t.precision, "lift": e.lift.to_dict(), "saved_params": names, **e.guard.state_dict(),
                    "client_state": client_state or {}, "precision_state": e.backend.precision_state(),
                }
                (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1, default=_json_default))

        def publish() -> None:
            if self._rank == 0:
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                latest_tmp = save_dir / f".{LATEST}.partial"
                latest_tmp.write_text(tag)
                os.replace(latest_tmp, save_dir / LATEST)

        agreed = lambda fn: self._agreed(fn, save_dir, tmp, final)  # noqa: E731
        agreed(prepare)
        quantized = set(e.quant.quantized_names()) if e.quant is not None else set()
        agreed(lambda: e.backend.save_weights(tmp, [n for n in names if n not in quantized]))
        if e.quant is not None:
            agreed(lambda: e.quant.save(tmp, names) if self._rank == 0 else None)
        if e.active_block_index is not None:
            agreed(lambda: e.backend.save_optimizer(tmp))
        if extra_files is not None:
            agreed(lambda: extra_files(tmp))
        maybe_kill("save_midway", e.global_step, self._rank)
        agreed(write_state)
        agreed(publish)
        logger.info("saved checkpoint %s (step %d, %d parameter tensors)", final, e.global_step, len(names))
        return final

    def _checkpoint_bytes(self, names: list[str]) -> int:
        """Rough size: saved weights plus the active block's optimizer state (all ranks)."""
        e = self.engine
        named = dict(e.module.named_parameters())
        weights = sum(e.backend.numel(named[n]) * named[n].element_size() for n in names if n in named)
        active = sum(e.backend.numel(named[n]) for n in (e.trainable_param_names() if e.active_block_index is not None else []) if n in named)
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
        latest = save_dir / LATEST
        prev = latest.read_text().strip() if latest.is_file() else None
        if err is None:
            cause = "another rank could not write its part (see its message)"
        else:
            what = err.strerror or str(err)
            cause = f"{what} ({err.filename})" if err.filename else what
        raise CheckpointError(
            errno.EIO if err is None else (err.errno or errno.EIO),
            f"could not write checkpoint {final}: {cause}. "
            + (f"The previous checkpoint {save_dir / prev} is untouched and still the newest ({latest}). " if prev else "No earlier checkpoint exists. ")
            + f"Free disk space or make {save_dir} writable (or choose another --output_dir and copy the checkpoints there), then resume with --resume.",
        )

    # ----------------------------------------------------------------- load

    def find(self, load_dir: str | os.PathLike, tag: str | None = None) -> Path | None:
        """The checkpoint to resume from (default: the tag in ``load_dir/latest``); None when there
        is none. Removes unpublished ``.partial`` writes (collective)."""
        load_dir = Path(load_dir)
        if self._rank == 0 and load_dir.is_dir():
            for stale in load_dir.glob(".*.partial"):  # a save that was killed mid-write; never published
                logger.warning("removing %s, an unfinished checkpoint write", stale)
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        self.engine.backend.barrier()
        if tag is None:
            latest = load_dir / LATEST
            if not latest.is_file():
                logger.warning("no checkpoint in %s (no %s file)", load_dir, LATEST)
                return None
            tag = latest.read_text().strip()
        path = load_dir / tag
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"checkpoint {path} is incomplete or missing ({STATE_FILE} not found)")
        return path

    def load(self, load_dir: str | os.PathLike, tag: str | None = None, allow_batch_change: bool = False) -> tuple[Path | None, dict]:
        """Restore every piece from a checkpoint, on any world size and backend; ``(path,
        client_state)``, or ``(None, {})`` when there is none.

        Raises:
            ResumeError: another plan, a checkpoint from an older format, or (without
                ``allow_batch_change``) another global batch size.
        """
        e = self.engine
        path = self.find(load_dir, tag)
        if path is None:
            return None, {}
        meta = json.loads((path / STATE_FILE).read_text())
        if meta.get("format") != FORMAT:
            raise ResumeError(f"checkpoint {path} has format {meta.get('format')}, this lift_ds reads format {FORMAT}; resume it with "
                              "the lift_ds version that wrote it", path)
        self._check_layout(meta, path, allow_batch_change)
        try:
            e.cursor.load_state_dict(meta["cursor"])
        except ValueError as ex:
            raise ResumeError(str(ex), path) from None
        e.samples_seen = int(meta["samples_seen"])
        e.micro_steps = e.cursor.step * e.training_config.gradient_accumulation_steps
        e.guard.load_state_dict(meta)
        e.end_phase()  # also after the plan finished, when the last engine is kept for evaluation
        e.backend.load_precision_state(meta.get("precision_state") or {})  # the fp16 loss scale, before the phase is built
        taken = e.quant.load(path, path / WEIGHTS_FILE) if e.quant is not None else set()
        e.backend.load_weights(path, skip=taken)
        old_world = int(meta["world_size"])
        e.stash = self._load_stash(path, old_world)
        if not e.done:
            e.start_phase(e.cursor.block, restore_stash=False)
            e.backend.load_optimizer(path)
        own = torch.load(path / f"rank{self._rank % old_world}_state.pt", map_location="cpu", weights_only=False)
        e.lr_scheduler.load_state_dict(own["lr_scheduler"])
        if e.optimizer is not None:
            e.lr_scheduler.apply(e.optimizer)
        set_rng_state(own["rng"])
        logger.info("resumed from %s at step %d", path, e.global_step)
        return path, meta.get("client_state", {})

    def _check_layout(self, meta: dict, path: Path, allow_batch_change: bool) -> None:
        """Log what changed since the checkpoint; refuse another global batch unless allowed."""
        e, t = self.engine, self.engine.training_config
        now = {"world_size": e.world_size, "backend": e.backend.name, "zero_stage": e.backend.memory_layout()[0], "micro_batch_size": t.micro_batch_size,
               "gradient_accumulation_steps": t.gradient_accumulation_steps, "precision": t.precision}
        changed = [f"{k} {meta[k]} -> {v}" for k, v in now.items() if meta.get(k) != v]
        if changed:
            logger.info("resuming %s with a changed layout: %s", path, ", ".join(changed))
        if meta["train_batch_size"] != t.train_batch_size:
            what = (f"the global batch changes from {meta['train_batch_size']} to {t.train_batch_size} samples per optimizer step "
                    f"(micro batch x accumulation x ranks)")
            if not allow_batch_change:
                raise ResumeError(f"checkpoint {path}: {what}. Keep it (e.g. {meta['train_batch_size']} = micro batch x accumulation x "
                                  "ranks), or pass --allow_batch_change to accept a run that differs from an uninterrupted one", path)
            logger.warning("%s: the resumed run continues from sample %d but will not equal an uninterrupted run", what, meta["samples_seen"])

    def _load_stash(self, path: Path, old_world: int) -> dict[int, Any]:
        """This rank's share of the stashed optimizer states, re-split for the current world size."""
        files = [torch.load(path / f"stash.rank{r}.pt", map_location="cpu", weights_only=False, mmap=True) for r in range(old_world)]
        if old_world == self.engine.world_size:
            return files[self._rank]
        out: dict[int, Any] = {}
        world = self.engine.world_size
        for block, share in files[0].items():
            owned = {}
            for i, n in enumerate(share["names"]):
                if i % world == self._rank:
                    owned[n] = files[i % old_world][block]["owned"][n]
            out[block] = {**share, "owned": owned}
        return out


def _json_default(o: Any) -> Any:
    if torch.is_tensor(o):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
