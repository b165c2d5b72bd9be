"""Evaluation shared by every method: loss / perplexity, and choice accuracy by log-likelihood.

Every rank must call these (under ZeRO-3 each forward is collective): items are split across ranks
in equal counts (the last rank's shard is padded with weight-0 repeats) and sums are all-reduced
through ``reduce`` (the backend's :meth:`~lift_ds.backends.base.Backend.all_reduce_sum`; the
identity in one process).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, Example, TokenizedData, collate


Reduce = Callable[[list[float]], list[float]]


def _local(values: list[float]) -> list[float]:
    return values


def _shard(n: int, rank: int, world: int) -> list[tuple[int, float]]:
    per = math.ceil(n / world)
    out = []
    for k in range(per):
        i = rank * per + k
        out.append((i, 1.0) if i < n else (n - 1, 0.0))
    return out


@torch.no_grad()
def eval_loss(forward: Callable[..., Any], data: TokenizedData, batch_size: int, rank: int, world: int, pad_id: int, reduce: Reduce = _local) -> dict[str, float]:
    """Token-weighted mean loss and perplexity over ``data``."""
    items = _shard(len(data.input_ids), rank, world)
    total, count = 0.0, 0.0
    for s in range(0, len(items), batch_size):
        chunk = items[s : s + batch_size]
        batch = collate([(data.input_ids[i], data.labels[i]) for i, _ in chunk], pad_id)
        logits = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
        weights = torch.tensor([w for _, w in chunk], dtype=torch.float64)[:, None]
        mask = (labels != IGNORE_INDEX).double() * weights
        total += float((nll.double() * mask).sum())
        count += float(mask.sum())
    total, count = reduce([total, count])
    loss = total / max(count, 1.0)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


@torch.no_grad()
def head_metrics(forward: Callable[..., Any], data: TokenizedData, batch_size: int, rank: int, world: int, pad_id: int, reduce: Reduce = _local) -> dict[str, float]:
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
    forward: Callable[..., Any], examples: list[Example], tokenizer: Any, seq_len: int, batch_size: int, rank: int, world: int,
    reduce: Reduce = _local, loglikelihoods: list[list[float]] | None = None,
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
            pp = p[-max(seq_len - len(r), 1):]
            seqs.append((pp + r, len(pp), k))
    scores: list[list[float]] = [[] for _ in shard]
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s : s + batch_size]
        batch = collate([(ids, ids) for ids, _, _ in chunk], tokenizer.pad_token_id or 0)
        logp = torch.log_softmax(forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float(), -1)
        for j, (ids, n_p, k) in enumerate(chunk):
            tgt = torch.tensor(ids[n_p:])
            scores[k].append(logp[j, n_p - 1 : len(ids) - 1].gather(-1, tgt[:, None]).sum().item())
    correct = total = 0.0
    for (i, w), ll in zip(shard, scores):
        pick = max(range(len(ll)), key=ll.__getitem__)
        correct += w * float(pick == examples[i].answer)
        total += w
        if loglikelihoods is not None and w:
            loglikelihoods.append(ll)
    correct, total = reduce([correct, total])
    return {"eval_accuracy": correct / max(total, 1.0)}
