"""A second opinion on accuracy: EleutherAI's lm-eval harness (``pip install lift_ds[eval]``) beside
lift_ds's own evaluator, on the same model and the same items, item by item.

lm-eval reads a YAML task written here with a local ``json`` dataset:

- classification (``{"text", "label"}`` lines): the task's own file, with the prompt written in the
  YAML's Jinja (``Review: {{text.strip()}}\\nSentiment:``) and the label words as choices;
- multiple choice (BIG-bench ``target_scores`` or ``question``/``choices``/``answer``): the varying
  choice sets do not fit one table column, so the YAML reads a JSONL written from the parsed items
  (prompt, choices, answer index).

Both score every choice by its summed log-likelihood after the prompt, continuation ``" " + choice``,
and take the highest; lm-eval's ``acc`` is compared with lift_ds's ``eval_accuracy``, the items where
the two picked different choices are counted, and the largest difference between the two harnesses'
log-likelihood of any choice is reported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .common import Task


def write_task(task: Task, labels: list[str] | None, examples: list[Any], out: Path) -> str:
    """Write ``out/<name>.yaml`` (and for multiple choice its JSONL); returns the lm-eval task name."""
    name = f"lift_ds_{task.name}".replace("-", "_").replace(":", "_")
    out.mkdir(parents=True, exist_ok=True)
    if task.fmt == "classification":
        data, text, choices, target = (
            Path(task.eval).resolve(),
            "Review: {{text.strip()}}\nSentiment:",
            json.dumps(labels),
            "{{label}}",
        )
    elif task.fmt == "multiple_choice":
        data = (out / f"{name}.jsonl").resolve()
        data.write_text(
            "".join(
                json.dumps({"query": e.prompt, "choices": [c.strip() for c in e.choices], "gold": e.answer}) + "\n"
                for e in examples
            )
        )
        text, choices, target = "{{query}}", '"{{choices}}"', "{{gold}}"
    else:
        raise ConfigError(
            [f"--task {task.name}: lm-eval scores classification and multiple_choice tasks, not {task.fmt}"]
        )
    (out / f"{name}.yaml").write_text(
        f"task: {name}\n"
        f"dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        f"test_split: test\n"
        f"output_type: multiple_choice\n"
        f"doc_to_text: {json.dumps(text)}\n"
        f"doc_to_choice: {choices}\n"
        f"doc_to_target: {json.dumps(target)}\n"
        f'target_delimiter: " "\n'
        f"metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return name


def agreement(model_dir: str, task: Task, seq_len: int, limit: int, out: Path, batch_size: int = 16) -> dict[str, Any]:
    """Accuracy of one exported model on ``limit`` held-out items (0: all) by lift_ds and by lm-eval,
    and the items on which they chose differently."""
    import torch

    from ..evaluate import choice_accuracy
    from ..recipe import build_model, load_task_data, load_tokenizer

    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError(["lm-eval is not installed: pip install 'lift_ds[eval]' (or lm_eval)"]) from None
    tok = load_tokenizer(model_dir)
    data = load_task_data(task.train, task.eval, task.fmt, tok, seq_len, labels=task.labels, eval_limit=limit)
    examples = data.held_examples
    model = build_model(model_dir, pad_id=tok.pad_token_id)
    model.eval()
    ours: list[list[float]] = []
    with torch.no_grad():
        acc = choice_accuracy(model, examples, tok, seq_len, batch_size, 0, 1, loglikelihoods=ours)["eval_accuracy"]
    name = write_task(task, data.labels, examples, out)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device="cpu")
    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=[name],
        task_manager=TaskManager(include_path=str(out)),
        limit=limit or None,
        log_samples=True,
        num_fewshot=0,
    )
    samples = sorted(res["samples"][name], key=lambda s: s["doc_id"])
    theirs = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    pick = lambda ll: max(range(len(ll)), key=ll.__getitem__)  # noqa: E731
    differ = [i for i, (a, b) in enumerate(zip(ours, theirs)) if pick(a) != pick(b)]
    gap = max((abs(x - y) for a, b in zip(ours, theirs) for x, y in zip(a, b)), default=float("nan"))
    return {
        "task": task.name,
        "model": model_dir,
        "items": len(examples),
        "lm_eval_items": len(samples),
        "lift_ds_accuracy": acc,
        "lm_eval_accuracy": res["results"][name]["acc,none"],
        "items_choosing_differently": len(differ),
        "differing_items": differ[:20],
        "max_loglikelihood_gap": gap,
        "lm_eval_version": lm_eval.__version__,
    }
