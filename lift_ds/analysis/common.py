"""What every analysis run shares: tasks, the study set-up, one seeded fine-tuning run on the torch
backend (through :mod:`lift_ds.recipe`, the same builders launch/train.py uses), and table output."""

from __future__ import annotations

import csv
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..provenance import sidecar, write_json


@dataclass
class Task:
    name: str
    fmt: str
    train: str
    eval: str
    labels: list[str] | None = None


def parse_task(spec: str) -> Task:
    """``sentiment``, ``trec``, ``bigbench:<name>`` or ``NAME=FORMAT:TRAIN[:EVAL]`` (files are fetched or checked)."""
    from .. import assets
    from ..data import FORMATS

    if spec == "sentiment":
        train, held = assets.movie_review_sentiment()
        return Task("sentiment", "classification", str(train), str(held))
    if spec == "trec":
        train, held = assets.trec_questions()
        return Task("trec", "classification", str(train), str(held))
    if spec.startswith("bigbench:"):
        name = spec.split(":", 1)[1]
        train, held = assets.bigbench_task(name)
        return Task(name, "multiple_choice", str(train), str(held))
    name, eq, rest = spec.partition("=")
    if eq and (not name or not all(c.isalnum() or c in "_-." for c in name) or name.startswith(".")):
        raise ConfigError([f"--task: {name!r} is not a task name (letters, digits, _ - .; it names files under --out)"])
    parts = rest.split(":") if eq else []
    if not eq or len(parts) not in (2, 3) or parts[0] not in FORMATS:
        raise ConfigError(
            [
                f"--task: {spec!r} is not a task; give sentiment, trec, bigbench:<task> or NAME=FORMAT:TRAIN[:EVAL] "
                f"with FORMAT one of {', '.join(FORMATS)}"
            ]
        )
    for path in parts[1:]:
        if not Path(path).is_file():
            raise ConfigError([f"--task {name}: file {path!r} does not exist"])
    return Task(name, parts[0], parts[1], parts[2] if len(parts) == 3 else parts[1])


@dataclass
class Setup:
    """What every run of a study shares."""

    model: str
    steps: int
    lr: float
    seq_len: int = 64
    micro_batch: int = 8
    eval_limit: int = 200
    classifier_head: bool = False
    random_init: bool = False
    _cache: dict = field(default_factory=dict, repr=False)

    def tokenizer(self) -> Any:
        from ..recipe import load_tokenizer

        if "tok" not in self._cache:
            self._cache["tok"] = load_tokenizer(self.model)
        return self._cache["tok"]

    def data(self, task: Task) -> Any:
        """The task's :class:`~lift_ds.recipe.TaskData` (read and tokenized once)."""
        from ..recipe import load_task_data

        key = ("data", task.name)
        if key not in self._cache:
            self._cache[key] = load_task_data(
                task.train,
                task.eval,
                task.fmt,
                self.tokenizer(),
                self.seq_len,
                labels=task.labels,
                classifier_head=self.classifier_head,
                eval_limit=self.eval_limit,
            )
        return self._cache[key]

    def model_for(self, task: Task, seed: int, meta: bool = False) -> Any:
        """The model for a task (a new classification head is seeded: every block starts from the same head)."""
        from ..recipe import build_model

        return build_model(
            self.model,
            num_labels=self.data(task).num_labels,
            pad_id=self.tokenizer().pad_token_id,
            random_init=self.random_init,
            seed=seed,
            meta=meta,
        )


def score_of(metrics: dict[str, float]) -> float:
    """A run's score: accuracy where there is one, else minus the loss (higher is better)."""
    return metrics.get("eval_accuracy", -metrics.get("eval_loss", float("nan")))


def run_once(
    setup: Setup, task: Task, seed: int, trainable: list[str] | None = None, lift: dict | None = None
) -> dict[str, float]:
    """Fine-tune (``trainable`` parameter names for the whole run, or LIFT with ``lift``) and score."""
    import torch

    from ..api import initialize
    from ..data import RankBatches
    from ..recipe import evaluate, head_module_names, optimizer_step

    data = setup.data(task)
    model = setup.model_for(task, seed)
    cfg = {
        "train_micro_batch_size_per_gpu": setup.micro_batch,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": setup.lr, "weight_decay": 0.0}},
        "lift": {"backend": "torch", "total_steps": setup.steps, "seed": seed, **(lift or {})},
    }
    if data.num_labels is not None and trainable is None:
        cfg["lift"]["always_trainable"] = head_module_names(model)
    t0 = time.perf_counter()
    engine, *_ = initialize(model=model, config=cfg, fixed_trainable=trainable)
    batches = RankBatches(data.train, setup.micro_batch, 0, 1, seed, setup.tokenizer().pad_token_id)
    losses = []
    torch.manual_seed(seed)
    while not engine.done:
        losses.append(optimizer_step(engine, batches)[0])
    with torch.no_grad():
        metrics = evaluate(engine, data, setup.tokenizer(), setup.seq_len, 32, with_loss=False)
    engine.close()
    score = score_of(metrics)
    return {"score": score, "train_loss": statistics.mean(losses[-5:]), "seconds": time.perf_counter() - t0, **metrics}


def zero_shot(setup: Setup, tasks: list[Task], out: Path) -> dict:
    """Held-out scores of the model before any training (the baseline every fine-tuned row is read
    against); writes ``out/zeroshot.json``."""
    from ..recipe import held_out_metrics

    result: dict[str, Any] = {"model": setup.model, "eval_limit": setup.eval_limit, "tasks": {}}
    for task in tasks:
        model = setup.model_for(task, seed=0)
        model.eval()
        metrics = held_out_metrics(model, setup.data(task), setup.tokenizer(), setup.seq_len, 32, with_loss=False)
        result["tasks"][task.name] = {"score": score_of(metrics), **metrics}
    write_json(out / "zeroshot.json", result)
    return result


def mean_over_seeds(setup: Setup, task: Task, seeds: list[int], **kw: Any) -> dict[str, float]:
    runs = [run_once(setup, task, s, **kw) for s in seeds]
    out = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
    out["score_std"] = statistics.pstdev(r["score"] for r in runs) if len(runs) > 1 else 0.0
    return out


def write_tables(out: Path, stem: str, result: dict, rows: list[dict]) -> None:
    """``out/<stem>.json`` (the whole result, with its provenance) and ``out/<stem>.csv`` (its rows, the
    provenance in ``<stem>.csv.provenance.json``)."""
    write_json(out / f"{stem}.json", result)
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    sidecar(out / f"{stem}.csv")
