"""Evaluation shared by every method: loss / perplexity, and choice accuracy by log-likelihood.

Every rank must call these (under ZeRO-3 each forward is collective): items are split across ranks
in equal counts (the last rank's shard is padded with weight-0 repeats) and sums are all-reduced
through ``reduce`` (the backend's :meth:`~lift_ds.backends.base.Backend.all_reduce_sum`; the
identity in one process).

Only the logits that are scored are computed: the forward is asked for the positions some row of the
batch scores (``logits_to_keep``, when the model's forward takes it: transformers >= 4.50), and the
fp32 log-softmax runs over those, a few rows at a time. A classification item scores its label word's
positions, not its prompt's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, Example, TokenizedData, collate

Reduce = Callable[[list[float]], list[float]]


def _local(values: list[float]) -> list[float]:
    return values


def _keeps_logits(forward: Callable[..., Any]) -> bool:
    from .loss import accepts_logits_to_keep

    return accepts_logits_to_keep(getattr(forward, "__self__", forward))


def _logits_at(forward: Callable[..., Any], batch: dict, positions: torch.Tensor, keep: bool) -> torch.Tensor:
    """``[batch, len(positions), vocab]`` logits at sequence ``positions`` (one forward)."""
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if keep:
        return forward(**kw, logits_to_keep=positions).logits
    return forward(**kw).logits[:, positions]


#: rows of fp32 log-softmax at a time
_ROWS = 64


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits.float())`` at ``targets`` (``-100``: 0), without an fp32 copy of all rows."""
    flat, tgt = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    out = torch.zeros(tgt.shape, dtype=torch.float32)
    for s in range(0, len(tgt), _ROWS):
        t = tgt[s : s + _ROWS].to(flat.device)
        lp = (
            torch.log_softmax(flat[s : s + _ROWS], -1, dtype=torch.float32)
            .gather(1, t.clamp(min=0)[:, None])
            .squeeze(1)
        )
        out[s : s + _ROWS] = torch.where(t == IGNORE_INDEX, 0.0, lp).cpu()
    return out.view(targets.shape)


def _shard(n: int, rank: int, world: int) -> list[tuple[int, float]]:
    per = math.ceil(n / world)
    out = []
    for k in range(per):
        i = rank * per + k
        out.append((i, 1.0) if i < n else (n - 1, 0.0))
    return out


@torch.no_grad()
def eval_loss(
    forward: Callable[..., Any],
    data: TokenizedData,
    batch_size: int,
    rank: int,
    world: int,
    pad_id: int,
    reduce: Reduce = _local,
) -> dict[str, float]:
    """Token-weighted mean loss and perplexity over ``data``."""
    items = _shard(len(data.input_ids), rank, world)
    total, count = 0.0, 0.0
    keep = _keeps_logits(forward)
    for s in range(0, len(items), batch_size):
        chunk = items[s : s + batch_size]
        batch = collate([(data.input_ids[i], data.labels[i]) for i, _ in chunk], pad_id)
        # position i predicts label i + 1
        positions = (batch["labels"][:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)
        labels = batch["labels"][:, positions + 1]
        nll = -_target_logprobs(_logits_at(forward, batch, positions, keep), labels)
        weights = torch.tensor([w for _, w in chunk], dtype=torch.float64)[:, None]
        mask = (labels != IGNORE_INDEX).double() * weights
        total += float((nll.double() * mask).sum())
        count += float(mask.sum())
    total, count = reduce([total, count])
    loss = total / max(count, 1.0)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


@torch.no_grad()
def head_metrics(
    forward: Callable[..., Any],
    data: TokenizedData,
    batch_size: int,
    rank: int,
    world: int,
    pad_id: int,
    reduce: Reduce = _local,
) -> dict[str, float]:
    """Loss and accuracy of a sequence-classification head (``data.labels`` are class indices)."""
    items = _shard(len(data.input_ids), rank, world)
    loss = correct = total = 0.0
    for s in range(0, len(items), batch_size):
        chunk = items[s : s + batch_size]
        batch = collate([(data.input_ids[i], data.labels[i]) for i, _ in chunk], pad_id)
        logits = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        w = torch.tensor([wt for _, wt in chunk], dtype=torch.float64)
        loss += float((F.cross_entropy(logits, batch["labels"], reduction="none").double() * w).sum())
        correct += float(((logits.argmax(-1) == batch["labels"]).double() * w).sum())
        total += float(w.sum())
    loss, correct, total = reduce([loss, correct, total])
    return {"eval_loss": loss / max(total, 1.0), "eval_accuracy": correct / max(total, 1.0)}


@torch.no_grad()
def choice_accuracy(
    forward: Callable[..., Any],
    examples: list[Example],
    tokenizer: Any,
    seq_len: int,
    batch_size: int,
    rank: int,
    world: int,
    reduce: Reduce = _local,
    loglikelihoods: list[list[float]] | None = None,
) -> dict[str, float]:
    """Accuracy of picking the choice with the highest summed log-likelihood after the prompt.

    ``loglikelihoods`` (one process) receives every example's per-choice log-likelihoods, in order."""
    shard = _shard(len(examples), rank, world)
    seqs: list[tuple[list[int], int, int]] = []  # ids, prompt length, position in the shard
    for k, (i, _) in enumerate(shard):
        ex = examples[i]
        p = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        for choice in ex.choices:
            r = tokenizer(choice, add_special_tokens=False)["input_ids"]
            pp = p[-max(seq_len - len(r), 1) :]
            seqs.append((pp + r, len(pp), k))
    scores: list[list[float]] = [[] for _ in shard]
    keep = _keeps_logits(forward)
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s : s + batch_size]
        batch = collate([(ids, ids) for ids, _, _ in chunk], tokenizer.pad_token_id or 0)
        # the choice's tokens: position n_p - 1 .. len - 2 predicts ids[n_p:]; only those logits are computed
        targets = torch.full(batch["input_ids"].shape, IGNORE_INDEX, dtype=torch.long)
        for j, (ids, n_p, _) in enumerate(chunk):
            targets[j, n_p - 1 : len(ids) - 1] = torch.tensor(ids[n_p:])
        positions = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)
        logp = _target_logprobs(_logits_at(forward, batch, positions, keep), targets[:, positions])
        for j, (_, _, k) in enumerate(chunk):
            scores[k].append(logp[j].double().sum().item())
    correct = total = 0.0
    for (i, w), ll in zip(shard, scores):
        pick = max(range(len(ll)), key=ll.__getitem__)
        correct += w * float(pick == examples[i].answer)
        total += w
        if loglikelihoods is not None and w:
            loglikelihoods.append(ll)
    correct, total = reduce([correct, total])
    return {"eval_accuracy": correct / max(total, 1.0)}
