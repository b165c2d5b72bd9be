"""Choosing and reading the checkpoint a run resumes from (:class:`lift_ds.checkpoint.Checkpointer`'s
load side): which checkpoint is complete, every file read safely on every rank before anything
changes, and the checks that refuse a resume that would not continue the same run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import checkpoint_io as cio
from .backends.distributed import layout_changes
from .backends.state import OPTIMIZER_FILE, OPTIMIZER_FORMAT, WEIGHTS_FILE
from .checkpoint_io import FORMAT, STATE_FILE, is_tag, safe_load
from .errors import CheckpointFileError, ResumeError
from .utils import get_logger

if TYPE_CHECKING:  # pragma: no cover
    from .backends.base import Backend
    from .checkpoint import Checkpointer
    from .engine import LiftEngine

logger = get_logger("lift_ds.checkpoint")

#: where a fingerprint field comes from, for the message that refuses a changed one
SOURCES = {
    "data": "the training data as tokenized: --data, --format, --labels, --seq_len, --tokenizer, --no_truncate",
    "data_seed": "--seed (the data order)",
    "model": "--model / --random_init",
    "method": "--method / --baseline",
    "lora_r": "--lora_r",
    "classifier_head": "--classifier_head",
    "init_seed": "--seed (the model's initialisation)",
    "plan": "the plan: the model's blocks, lift.total_steps (--max_steps), schedule, policy, layer range, seed",
    "lift.total_steps": "--max_steps",
    "gradient_clipping": "--gradient_clipping",
    "optimizer": "the optimizer (type and parameters other than lr)",
    "scheduler": 'the "scheduler" section',
    "precision": "bf16 / fp16",
}


def _decide(load_dir: Path, tag: str | None, cands: list[Path]) -> tuple[int, str]:
    """``(index into cands, "")``, ``(-1, "")`` for no checkpoint, or ``(-2, problem)`` (rank 0)."""
    if tag is not None:
        p = load_dir / tag
        problem = cio.verify(p)
        return (
            (cands.index(p), "")
            if problem is None and p in cands
            else (-2, f"checkpoint {p} cannot be resumed: {problem}")
        )
    latest, latest_problem = cio.read_latest(load_dir)
    if latest is None and latest_problem is None and not cands:
        return -1, ""
    tried = [latest_problem] if latest_problem else []
    first = [load_dir / latest] if latest else []
    if not latest and not latest_problem:
        tried.append(f"no {load_dir / cio.LATEST} file")
    for p in first + [c for c in cands if c not in first]:
        problem = cio.verify(p)
        if problem is None and p in cands:
            if tried:
                logger.warning("%s; resuming from %s, the newest complete checkpoint", "; ".join(tried), p)
            return cands.index(p), ""
        tried.append(f"{p}: {problem}")
    return -2, (
        f"no complete checkpoint in {load_dir}: {'; '.join(tried)}. Nothing was changed or removed; restore a complete "
        "checkpoint (or start a new run in another --output_dir)"
    )


def choose(backend: Backend, load_dir: Path, tag: str | None) -> Path | None:
    """See :meth:`lift_ds.checkpoint.Checkpointer.find` (collective; rank 0 decides)."""
    if tag is not None and not is_tag(tag):
        raise ResumeError(f"tag {tag!r} is not a checkpoint name inside {load_dir} (a plain directory name)", load_dir)
    if backend.rank == 0 and load_dir.is_dir():
        try:
            cio.recover(load_dir)
        except OSError as e:
            logger.warning(
                "could not tidy %s after an interrupted save (%s); choosing among complete checkpoints", load_dir, e
            )
    backend.barrier()
    cands = cio.published(load_dir)
    index, problem = _decide(load_dir, tag, cands) if backend.rank == 0 else (0, "")
    index = int(backend.broadcast(torch.tensor([index], dtype=torch.int64), 0).item())
    if index == -2:
        raise ResumeError(problem or f"no complete checkpoint in {load_dir} (rank 0 says which)", load_dir)
    if index == -1:
        logger.warning("no checkpoint in %s (no %s file)", load_dir, cio.LATEST)
        return None
    return cands[index]


def _agree(backend: Backend, path: Path, err: Exception | None) -> None:
    """Raise the same ResumeError on every rank when reading failed on any."""
    if not backend.any_rank(err is not None):
        return
    if isinstance(err, ResumeError):
        raise err
    why = str(err) if err is not None else "another rank could not read its part of it (see that rank's message)"
    raise ResumeError(
        f"checkpoint {path} cannot be resumed: {why}. Nothing was changed. A checkpoint from elsewhere may have been "
        "tampered with: lift_ds reads tensors and plain data only (weights_only=True) and runs nothing from it",
        path,
    )


def read_meta(ckpt: Checkpointer, path: Path) -> dict[str, Any]:
    """``lift_state.json``, checked for its format and fields (collective)."""
    meta, err = {}, None
    try:
        meta = cio.read_json(path / STATE_FILE)
        if not isinstance(meta, dict):
            raise CheckpointFileError(path / STATE_FILE, "not a JSON object")
        if meta.get("format") != FORMAT:
            err = ResumeError(
                f"checkpoint {path} has format {meta.get('format')}, "
                f"this lift_ds reads format {FORMAT}; resume it with "
                "the lift_ds version that wrote it",
                path,
            )
        else:
            bad = [
                k
                for k, kind in (
                    ("cursor", dict),
                    ("samples_seen", int),
                    ("world_size", int),
                    ("saved_params", list),
                    ("fingerprint", dict),
                    ("train_batch_size", int),
                )
                if not isinstance(meta.get(k), kind)
            ]
            if bad or meta["world_size"] < 1:
                raise CheckpointFileError(path / STATE_FILE, f"malformed: {', '.join(bad) or 'world_size'}")
    except CheckpointFileError as e:
        err = e
    _agree(ckpt.engine.backend, path, err)
    return meta


@dataclass
class Files:
    """What a rank reads of a checkpoint before anything changes."""

    own: dict[str, Any]
    stash: dict[int, Any]
    optimizer: dict[str, Any] | None


def read_files(ckpt: Checkpointer, path: Path, meta: dict[str, Any]) -> Files:
    """This rank's RNG / schedule state, its stash share, the optimizer state and the weights'
    names and shapes, all read safely and checked (collective: every rank, agreed)."""
    e = ckpt.engine
    files, err = Files({}, {}, None), None
    try:
        old_world = meta["world_size"]
        own = safe_load(path / f"rank{ckpt._rank % old_world}_state.pt")
        if not isinstance(own, dict) or not set(ckpt.rank_pieces()) <= set(own):
            raise CheckpointFileError(path / f"rank{ckpt._rank % old_world}_state.pt", "not a lift_ds rank state")
        files = Files(own, _load_stash(e, path, old_world), None)
        step = meta["cursor"].get("step")
        if isinstance(step, int) and 0 <= step < e.plan.total_steps:
            files.optimizer = _read_optimizer(
                e, path / OPTIMIZER_FILE, e.plan.trainable_param_names(e.plan.steps[step])
            )
        _check_weights(e, path, meta)
    except CheckpointFileError as ex:
        err = ex
    _agree(e.backend, path, err)
    return files


def _read_optimizer(e: LiftEngine, f: Path, names: list[str]) -> dict[str, Any]:
    state = safe_load(f, mmap=True)
    if (
        not isinstance(state, dict)
        or state.get("format") != OPTIMIZER_FORMAT
        or not isinstance(state.get("master"), dict)
    ):
        raise CheckpointFileError(
            f,
            (
                "not a lift_ds optimizer state "
                f"({state.get('format') if isinstance(state, dict) else type(state).__name__!r})"
            ),
        )
    if sorted(state["master"]) != sorted(names):
        raise CheckpointFileError(
            f,
            (
                f"holds the state of {sorted(state['master'])[:3]}..., "
                f"the block active at that step is {sorted(names)[:3]}..."
            ),
        )
    return state


def _check_weights(e: LiftEngine, path: Path, meta: dict[str, Any]) -> None:
    """The weights file opens as safetensors, and every tensor in it is a parameter of this model
    with the same number of elements."""
    from safetensors import safe_open

    f = path / WEIGHTS_FILE
    named = dict(e.module.named_parameters())
    # Q-LIFT takes these (held quantized now)
    quantized = set(e.quant.quantized_names()) if e.quant is not None else set()
    try:
        with safe_open(str(f), framework="pt") as fh:
            for n in fh.keys():
                if n in quantized:
                    continue
                if n not in named:
                    raise CheckpointFileError(f, f"holds {n!r}, which this model has no parameter of")
                shape = fh.get_slice(n).get_shape()
                if int(torch.Size(shape).numel()) != e.backend.numel(named[n]):
                    raise CheckpointFileError(
                        f, f"{n} has shape {shape}, this model's has {e.backend.numel(named[n])} elements"
                    )
    except CheckpointFileError:
        raise
    except Exception as ex:  # noqa: BLE001 - a bad safetensors header
        raise CheckpointFileError(f, f"cannot be read: {type(ex).__name__}: {ex}") from None


def _load_stash(e: LiftEngine, path: Path, old_world: int) -> dict[int, Any]:
    """This rank's share of the stashed optimizer states, re-split for the current world size."""
    files = [safe_load(path / f"stash.rank{r}.pt", mmap=True) for r in range(old_world)]
    for r, f in enumerate(files):
        if not isinstance(f, dict) or not all(
            isinstance(b, int) and isinstance(s, dict) and {"names", "owned"} <= set(s) for b, s in f.items()
        ):
            raise CheckpointFileError(path / f"stash.rank{r}.pt", "not a lift_ds optimizer stash")
    rank, world = e.backend.rank, e.world_size
    if old_world == world:
        return files[rank]
    out: dict[int, Any] = {}
    for block, share in files[0].items():
        owned = {}
        for i, n in enumerate(share["names"]):
            if i % world == rank:
                try:
                    owned[n] = files[i % old_world][block]["owned"][n]
                except (KeyError, TypeError):
                    raise CheckpointFileError(
                        path / f"stash.rank{i % old_world}.pt", f"lacks the state of {n}"
                    ) from None
        out[block] = {**share, "owned": owned}
    return out


def check_layout(e: LiftEngine, meta: dict[str, Any], path: Path, allow_batch_change: bool) -> None:
    """Log what changed in how the run is laid out; refuse another global batch unless allowed."""
    t = e.training_config
    now = {
        "world_size": e.world_size,
        "backend": e.backend.name,
        "micro_batch_size": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
    }
    changed = [f"{k} {meta.get(k)} -> {v}" for k, v in now.items() if meta.get(k) != v]
    changed += layout_changes(e.backend, meta)
    if changed:
        logger.info("resuming %s with a changed layout: %s", path, ", ".join(changed))
    if meta["train_batch_size"] != t.train_batch_size:
        what = (
            f"the global batch changes from {meta['train_batch_size']} "
            f"to {t.train_batch_size} samples per optimizer step "
            f"(micro batch x accumulation x ranks)"
        )
        if not allow_batch_change:
            raise ResumeError(
                f"checkpoint {path}: {what}. Keep it (e.g. {meta['train_batch_size']} = micro batch x accumulation x "
                "ranks), or pass --allow_batch_change to accept a run that differs from an uninterrupted one",
                path,
            )
        logger.warning(
            "%s: the resumed run continues from sample %d but will not equal an uninterrupted run",
            what,
            meta["samples_seen"],
        )


def check_fingerprint(ckpt: Checkpointer, meta: dict[str, Any], path: Path) -> None:
    """Refuse a resume whose settings would change the result, naming each (fields recorded by both
    sides are compared; the learning rate is not among them: it may change)."""
    saved, now = meta["fingerprint"], ckpt.fingerprint()
    diffs = []
    for k in sorted(set(saved) & set(now)):
        a, b = saved[k], now[k]
        if a == b:
            continue
        where = f" ({SOURCES[k]})" if k in SOURCES else f" (--{k[5:]})" if k.startswith("lift.") else ""
        # name the keys inside that differ (keys one side lacks, e.g. a newer torch's, pass)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [
                f"{k}.{sub}: {_short(a[sub])} -> {_short(b[sub])}{where}"
                for sub in sorted(set(a) & set(b))
                if a[sub] != b[sub]
            ]
        else:
            diffs.append(f"{k}: {_short(a)} -> {_short(b)}{where}")
    if not diffs:
        return
    said = "; ".join(diffs)
    raise ResumeError(
        f"checkpoint {path} was written with other settings that decide the result, "
        "so resuming would not continue that run: "
        f"{said}. Resume with the checkpoint's values, "
        "or start a new run in another --output_dir (only the learning rate may "
        "change on resume: it is applied from the resumed step)",
        path,
    )


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 120 else text[:117] + "..."
