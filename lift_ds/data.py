"""Local training data through ``datasets``: four formats, tokenized, with clear errors.

Formats (``--format``):
    text: plain text (``.txt``: the whole file; ``.jsonl``: a ``"text"`` field per line), packed
        into ``seq_len`` blocks for language modelling.
    prompt_response: JSONL with ``"prompt"`` and ``"response"``; loss on the response only.
    classification: JSONL with ``"text"`` and ``"label"``; trained and scored as the likelihood of
        the label word after a prompt (``labels`` names the label set).
    multiple_choice: JSONL with ``"question"``, ``"choices"`` (list) and ``"answer"`` (index), or
        BIG-bench style ``"input"`` + ``"target_scores"``; trained on the right choice, scored by
        choice log-likelihood like lm-eval.

Every line of a JSONL file is checked before training: a bad line is reported with file and line
number. Nothing here imports torch distributed; sharding across ranks is the loader's job.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError

FORMATS = ("text", "prompt_response", "classification", "multiple_choice")
IGNORE_INDEX = -100


@dataclass
class Example:
    """One training/eval item before tokenization."""

    prompt: str
    response: str = ""
    choices: list[str] = field(default_factory=list)
    answer: int | None = None
    text: str = ""  # the raw input (classification), for a classification head
    source: str = ""  # "file:line", for messages


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every line of a JSONL file as a dict; blank lines skipped; errors name file and line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {str(p)!r} does not exist")
    rows = []
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{p}:{lineno}: not UTF-8 (byte {e.start}: "
                    f"{raw[e.start : e.start + 1]!r}); re-encode the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            obj["_line"] = lineno
            rows.append(obj)
    if not rows:
        raise DataError(f"{p}: no records (the file is empty)")
    return rows


def _field(row: dict, path: Path, *names: str, kind: type | tuple = str) -> Any:
    for n in names:
        if n in row:
            if not isinstance(row[n], kind):
                raise DataError(
                    f"{path}:{row['_line']}: field {n!r} must be {getattr(kind, '__name__', kind)}, "
                    f"got {type(row[n]).__name__}"
                )
            return row[n]
    keys = sorted(k for k in row if k != "_line")
    raise DataError(f"{path}:{row['_line']}: missing field {' or '.join(repr(n) for n in names)} (the line has {keys})")


def classification_prompt(text: str) -> str:
    return f"Review: {text.strip()}\nSentiment:"


def load_examples(
    path: str | os.PathLike, fmt: str, labels: list[str] | None = None
) -> tuple[list[Example], list[str] | None]:
    """Read a data file in ``fmt``; returns the examples and (for classification) the label words."""
    if fmt not in FORMATS:
        raise DataError(f"--format: {fmt!r} unknown; allowed: {', '.join(FORMATS)}")
    p = Path(path)
    if fmt == "text" and p.suffix != ".jsonl":
        if not p.is_file():
            raise DataError(f"data file {str(p)!r} does not exist")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            line = p.read_bytes()[: e.start].count(b"\n") + 1
            raise DataError(f"{p}:{line}: not UTF-8; re-encode the file as UTF-8") from None
        if not text.strip():
            raise DataError(f"{p}: no text (the file is empty)")
        return [Example(prompt="", response=text)], None
    rows = read_jsonl(p)
    out: list[Example] = []
    if fmt == "text":
        return [Example(prompt="", response=_field(r, p, "text")) for r in rows], None
    if fmt == "prompt_response":
        return [
            Example(
                prompt=_field(r, p, "prompt", "instruction"),
                response=_field(r, p, "response", "output"),
                source=f"{p}:{r['_line']}",
            )
            for r in rows
        ], None
    if fmt == "classification":
        seen = [str(_field(r, p, "label", kind=(str, int, bool))) for r in rows]
        label_set = labels or sorted(set(seen))
        for r, lab in zip(rows, seen):
            if lab not in label_set:
                raise DataError(f"{p}:{r['_line']}: label {lab!r} is not in the label set {label_set}")
            text = _field(r, p, "text", "sentence")
            out.append(
                Example(
                    prompt=classification_prompt(text),
                    response=" " + lab,
                    choices=[" " + x for x in label_set],
                    answer=label_set.index(lab),
                    text=text,
                    source=f"{p}:{r['_line']}",
                )
            )
        return out, label_set
    for r in rows:  # multiple_choice
        if "target_scores" in r:
            scores = _field(r, p, "target_scores", kind=dict)
            choices = list(scores)
            if not choices:
                raise DataError(f"{p}:{r['_line']}: target_scores is empty")
            answer = max(range(len(choices)), key=lambda i: scores[choices[i]])
            question = _field(r, p, "input", "question")
        else:
            question = _field(r, p, "question", "input")
            choices = _field(r, p, "choices", kind=list)
            answer = _field(r, p, "answer", kind=int)
            if not 0 <= answer < len(choices):
                raise DataError(f"{p}:{r['_line']}: answer {answer} is not an index into {len(choices)} choices")
        prompt = f"Question: {question.strip()}\nAnswer:"
        cs = [" " + str(c).strip() for c in choices]
        out.append(Example(prompt=prompt, response=cs[answer], choices=cs, answer=answer, source=f"{p}:{r['_line']}"))
    return out, None


@dataclass
class TokenizedData:
    """Token id sequences with their loss masks (or, for a classification head, one class index
    each), plus counts for the log."""

    input_ids: list[list[int]]
    labels: list[list[int]] | list[int]
    truncated: int = 0

    @property
    def class_labels(self) -> bool:
        return bool(self.labels) and isinstance(self.labels[0], int)


def tokenize_for_head(examples: Iterable[Example], tokenizer: Any, seq_len: int) -> TokenizedData:
    """Classification with a sequence-classification head: the raw text (with the tokenizer's
    special tokens, e.g. BERT's [CLS] that its pooler reads), its class index."""
    out = TokenizedData([], [])
    for ex in examples:
        ids = tokenizer(ex.text or ex.prompt, add_special_tokens=True)["input_ids"]
        if len(ids) > seq_len:
            out.truncated += 1
            ids = ids[:seq_len]
        out.input_ids.append(ids)
        out.labels.append(int(ex.answer))  # type: ignore[arg-type]
    return out


def tokenize(
    examples: Iterable[Example], tokenizer: Any, fmt: str, seq_len: int, truncate: bool = True
) -> TokenizedData:
    """Tokenize for training: pack ``text``, otherwise prompt + response (+EOS) with loss on the response."""
    import datasets

    exs = list(examples)
    ds = datasets.Dataset.from_dict({"prompt": [e.prompt for e in exs], "response": [e.response for e in exs]})
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if fmt == "text":
        ids: list[int] = []
        for row in ds.map(
            lambda b: {"ids": tokenizer(b["response"], add_special_tokens=False)["input_ids"]}, batched=True
        )["ids"]:
            ids.extend(row + eos)
        blocks = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
        if not blocks:
            raise DataError(f"the text has {len(ids)} tokens, fewer than --seq_len {seq_len}")
        return TokenizedData(blocks, [list(b) for b in blocks])

    def encode(batch: dict) -> dict:
        p = tokenizer(batch["prompt"], add_special_tokens=False)["input_ids"]
        r = tokenizer(batch["response"], add_special_tokens=False)["input_ids"]
        return {"p": p, "r": r}

    enc = ds.map(encode, batched=True)
    out = TokenizedData([], [])
    bos = (
        [tokenizer.bos_token_id]
        if getattr(tokenizer, "bos_token_id", None) is not None and getattr(tokenizer, "add_bos_token", False)
        else []
    )
    for i, (p, r) in enumerate(zip(enc["p"], enc["r"])):
        full_p, full_r = bos + p, r + eos
        if len(full_p) + len(full_r) > seq_len:
            if not truncate:
                where = exs[i].source or f"example {i + 1}"
                raise DataError(
                    f"{where}: {len(full_p) + len(full_r)} tokens > --seq_len {seq_len}; "
                    "raise --seq_len, or drop --no_truncate "
                    "to cut the start of long prompts (counted in the log)"
                )
            out.truncated += 1
            keep = max(seq_len - len(full_r), 1)
            full_p = full_p[-keep:]  # keep the end of the prompt, next to the response
            full_r = full_r[: seq_len - len(full_p)]
        out.input_ids.append(full_p + full_r)
        out.labels.append([IGNORE_INDEX] * len(full_p) + full_r)
    return out


def collate(batch: list[tuple[list[int], Any]], pad_id: int) -> dict:
    """Right-pad a list of ``(input_ids, labels)`` into tensors with an attention mask.

    Labels are token sequences (language modelling) or one int per item (a classification head)."""
    import torch

    n = max(len(x) for x, _ in batch)
    if isinstance(batch[0][1], int):
        ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, (x, _) in enumerate(batch):
            ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([y for _, y in batch])}
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class RankBatches:
    """Deterministic micro-batches for one rank, keyed by global sample index.

    The run reads one stream of samples: epoch ``e`` is a permutation of the data seeded with
    ``seed + e``, cut to whole global batches. Optimizer step ``s`` consumes samples
    ``[s*G, (s+1)*G)`` with ``G = micro_batch x accumulation x world``; within it, rank ``r`` takes
    the micro-batch chunk ``q = j*world + r`` at accumulation step ``j``. A layout that keeps ``G``
    and the micro batch (2 ranks x 1 accumulation step, or 1 rank x 2) reads the same chunks for every
    step, so a run resumed on another number of ranks sees the samples an uninterrupted run would.
    """

    def __init__(
        self,
        data: TokenizedData,
        micro_batch: int,
        rank: int,
        world: int,
        seed: int,
        pad_id: int,
        accumulation: int = 1,
    ) -> None:
        n = len(data.input_ids)
        self.global_batch = micro_batch * accumulation * world
        if n < self.global_batch:
            raise DataError(
                f"{n} training examples are fewer than one global batch ({micro_batch} x {accumulation} accumulation "
                f"step(s) x {world} ranks)"
            )
        self.data, self.micro_batch, self.rank, self.world, self.seed, self.pad_id = (
            data,
            micro_batch,
            rank,
            world,
            seed,
            pad_id,
        )
        self.accumulation = accumulation
        #: optimizer steps per epoch (a partial last global batch is left out)
        self.steps_per_epoch = n // self.global_batch
        self.samples_per_epoch = self.steps_per_epoch * self.global_batch
        self._epoch, self._order = -1, []

    def batch(self, micro_step: int) -> dict:
        """This rank's micro-batch at its micro-step ``micro_step`` (counted from the run's start)."""
        step, j = divmod(micro_step, self.accumulation)
        return self.batch_at(step * self.global_batch, j)

    def batch_at(self, step_start: int, j: int) -> dict:
        """This rank's micro-batch ``j`` of the optimizer step whose samples start at global index ``step_start``."""
        import torch

        start = step_start + (j * self.world + self.rank) * self.micro_batch
        epoch, k = divmod(start, self.samples_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._order = torch.randperm(len(self.data.input_ids), generator=g).tolist()
            self._epoch = epoch
        idx = self._order[k : k + self.micro_batch]
        return collate([(self.data.input_ids[i], self.data.labels[i]) for i in idx], self.pad_id)
