"""The recipe shared by training (``launch/train.py``) and the analyses (``lift_ds.analysis``):
tokenizer, model, task data, the optimizer step loop and evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .data import Example, RankBatches, TokenizedData, load_examples, tokenize, tokenize_for_head
from .errors import ConfigError, DataError
from .utils import get_logger

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from .engine import LiftEngine

logger = get_logger(__name__)

#: module names of a new sequence-classification head (trained in every LIFT phase)
HEAD_NAMES = ("score", "classifier")


def load_tokenizer(name: str) -> Any:
    """A Hugging Face tokenizer (a bare SentencePiece ``tokenizer.model`` directory works); a pad
    token is set when the tokenizer has none."""
    from transformers import AutoTokenizer, LlamaTokenizer

    path = Path(name)
    if path.is_dir() and (path / "tokenizer.model").is_file() and not (path / "tokenizer.json").is_file():
        tok = LlamaTokenizer.from_pretrained(name)  # a bare SentencePiece model
    else:
        tok = AutoTokenizer.from_pretrained(name)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def build_model(
    model_dir: str,
    *,
    num_labels: int | None = None,
    pad_id: int | None = None,
    random_init: bool = False,
    seed: int = 0,
    meta: bool = False,
) -> nn.Module:
    """A causal LM, or (``num_labels``) a sequence-classification model with a new head, in fp32.

    Args:
        model_dir: a Hugging Face directory or hub id.
        num_labels, pad_id: build a sequence-classification model with this many classes.
        random_init: fresh weights from the config (smoke runs) instead of the checkpoint's.
        seed: seeds the new head (and random init), so every run starts from the same values.
        meta: on the meta device, no weights at all (structure checks before anything is loaded).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = AutoConfig.from_pretrained(model_dir)
    cls = AutoModelForCausalLM
    if num_labels is not None:
        cls = AutoModelForSequenceClassification
        cfg.num_labels, cfg.pad_token_id = num_labels, pad_id
    if meta:
        with torch.device("meta"):
            return cls.from_config(cfg)
    torch.manual_seed(seed)
    model = (
        cls.from_config(cfg, dtype=torch.float32)
        if random_init
        else cls.from_pretrained(model_dir, config=cfg, dtype=torch.float32)
    )
    model.config.use_cache = False
    return model


def head_module_names(model: nn.Module) -> list[str]:
    """The top-level modules of a sequence-classification head (``score`` / ``classifier``)."""
    heads = [n for n, _ in model.named_children() if n in HEAD_NAMES]
    if not heads:
        raise ConfigError(
            [f"--classifier_head: {type(model).__name__} has no head module named {' or '.join(HEAD_NAMES)}"]
        )
    return heads


@dataclass
class TaskData:
    """A task's tokenized data.

    Attributes:
        train: training sequences.
        held: held-out sequences (None without an eval file).
        held_examples: held-out items scored by choice log-likelihood (classification by label
            word, multiple choice), else None.
        fmt: the data format.
        labels: the label words of a classification task.
    """

    train: TokenizedData
    held: TokenizedData | None
    held_examples: list[Example] | None
    fmt: str
    labels: list[str] | None

    @property
    def num_labels(self) -> int | None:
        """Classes of a classification head (None when the data is not for a head)."""
        return len(self.labels) if self.train.class_labels and self.labels else None


def load_task_data(
    train_path: str,
    eval_path: str | None,
    fmt: str,
    tokenizer: Any,
    seq_len: int,
    *,
    labels: list[str] | None = None,
    classifier_head: bool = False,
    truncate: bool = True,
    eval_limit: int = 0,
) -> TaskData:
    """Read, check and tokenize a task's training (and held-out) file.

    Raises:
        DataError: a bad line (file:line), or an example longer than ``seq_len`` with ``truncate=False``.
    """
    train_ex, label_set = load_examples(train_path, fmt, labels)
    head = classifier_head and fmt == "classification"

    def encode(examples: list[Example], cut: bool) -> TokenizedData:
        return (
            tokenize_for_head(examples, tokenizer, seq_len)
            if head
            else tokenize(examples, tokenizer, fmt, seq_len, truncate=cut)
        )

    train = encode(train_ex, truncate)
    if train.truncated:
        logger.info(
            "%d of %d training examples were longer than seq_len %d and were truncated (their prompt's start cut)",
            train.truncated,
            len(train.input_ids),
            seq_len,
        )
    held = held_ex = None
    if eval_path:
        held_ex, _ = load_examples(eval_path, fmt, label_set or labels)
        if eval_limit:
            held_ex = held_ex[:eval_limit]
        held = encode(held_ex, True)
        if fmt not in ("classification", "multiple_choice") or head:
            held_ex = None
    return TaskData(train, held, held_ex, fmt, label_set)


def optimizer_step(engine: LiftEngine, batches: RankBatches, nan_loss: bool = False) -> tuple[float, int]:
    """One optimizer step: ``gradient_accumulation_steps`` micro-batches, chosen by the global
    sample index the engine has reached (so a run resumed on another layout reads the same samples).
    Returns ``(mean loss, tokens over all ranks)``.

    ``nan_loss`` makes every micro-batch's loss NaN (fault rehearsal)."""
    gas = engine.gradient_accumulation_steps()
    loss_sum, tokens = 0.0, 0
    for j in range(gas):
        batch = batches.batch_at(engine.samples_seen, j)
        loss = engine(**batch).loss
        if nan_loss:
            loss = loss * float("nan")
        engine.backward(loss)
        loss_sum += loss.item()
        # DeepSpeed's backward hooks live on the outputs they produced: keeping the loss would keep
        # this phase's engine alive across the next switch
        del loss
        tokens += int(batch["attention_mask"].sum()) * engine.world_size
        engine.step()
    return loss_sum / gas, tokens


def evaluate(
    engine: LiftEngine, data: TaskData, tokenizer: Any, seq_len: int, batch_size: int, with_loss: bool = True
) -> dict[str, float]:
    """Held-out metrics (collective: every rank calls it): a head's loss and accuracy; else the loss
    and perplexity (``with_loss``) and, for classification / multiple choice, choice accuracy."""
    engine.eval()
    out = held_out_metrics(
        engine.forward,
        data,
        tokenizer,
        seq_len,
        batch_size,
        engine.rank,
        engine.world_size,
        engine.backend.all_reduce_sum,
        with_loss,
    )
    engine.train()
    return out


def held_out_metrics(
    forward: Callable[..., Any],
    data: TaskData,
    tokenizer: Any,
    seq_len: int,
    batch_size: int,
    rank: int = 0,
    world: int = 1,
    reduce: Callable[[list[float]], list[float]] = lambda v: v,
    with_loss: bool = True,
) -> dict[str, float]:
    """:func:`evaluate` for any forward function (e.g. a bare model: zero-shot scores)."""
    import torch

    from .evaluate import choice_accuracy, eval_loss, head_metrics

    if data.held is None:
        return {}
    pad = tokenizer.pad_token_id
    out: dict[str, float] = {}
    with torch.no_grad():
        if data.held.class_labels:
            out = head_metrics(forward, data.held, batch_size, rank, world, pad, reduce)
        elif with_loss or not data.held_examples:
            out = eval_loss(forward, data.held, batch_size, rank, world, pad, reduce)
        if data.held_examples:
            out.update(
                choice_accuracy(forward, data.held_examples, tokenizer, seq_len, batch_size, rank, world, reduce)
            )
    return out


__all__ = [
    "DataError",
    "HEAD_NAMES",
    "TaskData",
    "build_model",
    "evaluate",
    "head_module_names",
    "held_out_metrics",
    "load_task_data",
    "load_tokenizer",
    "optimizer_step",
]
