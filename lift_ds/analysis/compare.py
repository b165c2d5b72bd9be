"""A tuned comparison of fine-tuning methods: methods x learning rates x tasks x seeds, each run
through launch/train.py (one process, the torch backend). Each method's learning rate is chosen per
task on a validation split with the first seed (every rate of its grid); the other seeds run at that
rate only, and test accuracy is reported as mean and standard deviation over all seeds at that rate,
with validation curves.

The validation split is drawn from the task's training file (``--val_items`` items, seeded, never
trained on); the test set is the task's held-out file, scored on the exported model by lift_ds's
evaluator (the same code as the launcher's held-out evaluation). Every run writes
``out/runs/<task>/<method>/lr<lr>/seed<s>/result.json``; a study that is stopped continues where it
was with the same command (finished runs are read back, not repeated).
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..provenance import sidecar, write_json
from .common import Task, score_of, write_tables

REPO = Path(__file__).resolve().parents[2]

#: method label -> launch/train.py flags
METHOD_FLAGS: dict[str, list[str]] = {
    "lift": ["--method", "lift"],
    "lift-random": ["--method", "lift", "--schedule", "random"],
    "full": ["--baseline", "full"],
    "lora": ["--baseline", "lora"],
    "badam": ["--method", "badam"],
    "lisa": ["--method", "lisa"],
}
#: the default learning-rate grid per method (full fine-tuning lower, LoRA higher, as usually tuned)
DEFAULT_LRS: dict[str, tuple[float, ...]] = {
    "lift": (3e-5, 1e-4, 3e-4),
    "lift-random": (3e-5, 1e-4, 3e-4),
    "badam": (3e-5, 1e-4, 3e-4),
    "lisa": (3e-5, 1e-4, 3e-4),
    "full": (1e-5, 3e-5, 1e-4),
    "lora": (1e-4, 3e-4, 1e-3),
}


def run_config(micro_batch: int) -> dict[str, Any]:
    """The launcher config of every run: one process, torch backend, AdamW, warm-up then linear decay."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.0}},
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": "auto",
                "warmup_num_steps": "auto",
                "total_num_steps": "auto",
            },
        },
        "lift": {"backend": "torch", "total_steps": "auto"},
    }


def split_validation(task: Task, val_items: int, out: Path) -> tuple[Path, Path]:
    """``(train, validation)`` files: ``val_items`` lines of the training file drawn with seed 0."""
    lines = [ln for ln in Path(task.train).read_text().splitlines() if ln.strip()]
    if val_items >= len(lines):
        raise ConfigError([f"--val_items: {val_items} leaves nothing to train on in {task.train} ({len(lines)} items)"])
    held = set(random.Random(0).sample(range(len(lines)), val_items))
    out.mkdir(parents=True, exist_ok=True)
    train, val = out / "train.jsonl", out / "val.jsonl"
    train.write_text("".join(ln + "\n" for i, ln in enumerate(lines) if i not in held))
    val.write_text("".join(ln + "\n" for i, ln in enumerate(lines) if i in held))
    return train, val


def launch_run(
    model: str, task: Task, train: Path, val: Path, method: str, lr: float, seed: int, args: Any, run_dir: Path
) -> dict:
    """One run through launch/train.py, then its test score; ``run_dir/result.json`` (read back if there)."""
    done = run_dir / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    # a run without result.json was cut short: start it over (the launcher appends to an old metrics.jsonl)
    shutil.rmtree(run_dir / "out", ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = run_dir / "config.json"
    cfg.write_text(json.dumps(run_config(args.micro_batch), indent=1))
    cmd = [
        sys.executable,
        str(REPO / "launch" / "train.py"),
        "--ds_config",
        str(cfg),
        "--model",
        model,
        "--data",
        str(train),
        "--eval_data",
        str(val),
        "--format",
        task.fmt,
        *METHOD_FLAGS[method],
        "--lr",
        repr(lr),
        "--max_steps",
        str(args.steps),
        "--seed",
        str(seed),
        "--seq_len",
        str(args.seq_len),
        "--micro_batch_size",
        str(args.micro_batch),
        # the tuning seed's runs give the validation curves; the other seeds only their final validation score
        "--eval_every",
        str(args.eval_every if seed == args.tune_seed else args.steps),
        "--output_dir",
        str(run_dir / "out"),
        "--no_checkpoint",
    ]
    if method in ("badam", "lisa") and args.switch_every:
        cmd += ["--switch_every", str(args.switch_every)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{task.name}/{method}/lr{lr}/seed{seed}: launch/train.py exited {proc.returncode}:\n{proc.stderr[-3000:]}"
        )
    records = [json.loads(ln) for ln in (run_dir / "out" / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    evals = [r for r in records if "eval_loss" in r or "eval_accuracy" in r]
    final = run_dir / "out" / "final"
    test = Task(task.name, task.fmt, str(train), task.eval, task.labels)
    result = {
        "task": task.name,
        "method": method,
        "lr": lr,
        "seed": seed,
        "seconds": time.perf_counter() - t0,
        "val": score_of(evals[-1]),
        "val_curve": [{"step": r["step"], **{k: v for k, v in r.items() if k.startswith("eval_")}} for r in evals],
        "test": test_score(final, test, args),
    }
    if getattr(args, "lm_eval", False) and seed == args.tune_seed:  # the model a best rate is picked from
        from .lmeval import agreement

        result["lm_eval"] = agreement(str(final), test, args.seq_len, args.test_limit, run_dir / "lm_eval_tasks")
    if not getattr(args, "keep_models", False):  # a study writes a model per run: keep the numbers only
        shutil.rmtree(final, ignore_errors=True)
        shutil.rmtree(run_dir / "out" / "checkpoints", ignore_errors=True)
    write_json(done, result)  # each run its own machine and date: a study can span sessions
    return result


def best_rate(val: dict[float, float]) -> float:
    """The learning rate with the highest validation score (ties: the lower rate)."""
    return max(val, key=lambda lr: (val[lr], -lr))


def test_score(final: Path, task: Task, args: Any) -> dict[str, float]:
    """The exported model's held-out metrics on ``task.eval`` (lift_ds's evaluator; labels from ``task.train``)."""
    import torch

    from ..recipe import build_model, held_out_metrics, load_task_data, load_tokenizer

    tok = load_tokenizer(str(final))
    data = load_task_data(
        task.train, task.eval, task.fmt, tok, args.seq_len, labels=task.labels, eval_limit=args.test_limit
    )
    model = build_model(str(final), pad_id=tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        metrics = held_out_metrics(model, data, tok, args.seq_len, 32, with_loss=False)
    return {"score": score_of(metrics), **metrics}


def summarize(results: list[dict], methods: list[str], tasks: list[str], tune_seed: int) -> dict[str, Any]:
    """Per task and method: the validation score of each learning rate (seed ``tune_seed``), the best
    rate (ties: the lower), and the test score's mean and standard deviation over seeds at that rate."""
    table: dict[str, dict[str, Any]] = {}
    for t in tasks:
        table[t] = {}
        for m in methods:
            runs = [r for r in results if r["task"] == t and r["method"] == m]
            val = {r["lr"]: r["val"] for r in runs if r["seed"] == tune_seed}
            best = best_rate(val)
            tests = [r["test"]["score"] for r in runs if r["lr"] == best]
            table[t][m] = {
                "val_by_lr": {repr(k): v for k, v in sorted(val.items())},
                "best_lr": best,
                "seeds": len(tests),
                "test_mean": statistics.mean(tests),
                "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
                "seconds_per_run": statistics.mean(r["seconds"] for r in runs),
            }
    return table


def markdown(table: dict[str, Any], methods: list[str], tasks: list[str]) -> str:
    head = (
        "| method | "
        + " | ".join(f"{t} (test, mean ± std)" for t in tasks)
        + " | "
        + " | ".join(f"{t} best lr" for t in tasks)
        + " |"
    )
    rows = [head, "|" + "---|" * (1 + 2 * len(tasks))]
    for m in methods:
        cells = [
            f"{table[t][m]['test_mean']:.3f} ± {table[t][m]['test_std']:.3f} (n={table[t][m]['seeds']}, "
            f"{len(table[t][m]['val_by_lr'])}/{table[t][m]['rates_in_grid']} rates)"
            for t in tasks
        ]
        rows.append(
            f"| {m} | " + " | ".join(cells) + " | " + " | ".join(f"{table[t][m]['best_lr']:g}" for t in tasks) + " |"
        )
    return "\n".join(rows)


def compare(
    model: str,
    tasks: list[Task],
    methods: list[str],
    lrs: dict[str, list[float]],
    seeds: list[int],
    args: Any,
    out: Path,
) -> dict:
    """Run the whole grid (finished runs are read back), then write compare.json / .csv / .md and a
    validation-curve PNG per task (each method at its best learning rate, seed ``seeds[0]``)."""
    from .curves import plot_series

    args.tune_seed = seeds[0]
    results: list[dict] = []
    splits = {t.name: split_validation(t, args.val_items, out / "data" / t.name) for t in tasks}

    def run(task: Task, m: str, lr: float, s: int) -> dict | None:
        run_dir = out / "runs" / task.name / m / f"lr{lr:g}" / f"seed{s}"
        if getattr(args, "report_only", False) and not (run_dir / "result.json").is_file():
            return None
        r = launch_run(model, task, *splits[task.name], m, lr, s, args, run_dir)
        print(
            (
                f"{task.name} {m} lr={lr:g} seed={s}: "
                f"val {r['val']:.4f} test {r['test']['score']:.4f} ({r['seconds']:.0f} s)"
            ),
            flush=True,
        )
        results.append(r)
        return r

    # every rate with the first seed, every method, before any further seed: a study cut short still
    # has each method's tuning; then the other seeds at each method's best rate only, one seed at a time
    best: dict[tuple[str, str], float] = {}
    for task in tasks:
        for m in methods:
            tuned = {lr: run(task, m, lr, seeds[0]) for lr in lrs[m]}
            val = {lr: r["val"] for lr, r in tuned.items() if r is not None}
            if val:
                best[task.name, m] = best_rate(val)
    for s in seeds[1:]:  # seed by seed: a study cut short has the same number of seeds for every method
        for task in tasks:
            for m in methods:
                if (task.name, m) in best:
                    run(task, m, best[task.name, m], s)
    names = [t.name for t in tasks]
    # with --report_only, methods without a finished run are left out, and a row says how complete it is
    methods = [m for m in methods if all((t, m) in best for t in names)]
    if not methods:
        raise ConfigError([f"--report_only: no finished run of any method in {out / 'runs'}"])
    table = summarize(results, methods, names, seeds[0])
    for t in names:
        for m in methods:
            table[t][m]["rates_in_grid"] = len(lrs[m])
            table[t][m]["complete"] = len(table[t][m]["val_by_lr"]) == len(lrs[m]) and table[t][m]["seeds"] == len(
                seeds
            )
    rows = [
        {
            "task": t,
            "method": m,
            "best_lr": table[t][m]["best_lr"],
            "test_mean": table[t][m]["test_mean"],
            "test_std": table[t][m]["test_std"],
            "seeds": table[t][m]["seeds"],
            "complete": table[t][m]["complete"],
            "val_by_lr": json.dumps(table[t][m]["val_by_lr"]),
        }
        for t in names
        for m in methods
    ]
    result = {
        "model": model,
        "steps": args.steps,
        "seeds": seeds,
        "lrs": lrs,
        "val_items": args.val_items,
        "table": table,
        "runs": results,
    }
    if getattr(args, "lm_eval", False):
        result["lm_eval"] = [
            {"method": m, "lr": table[t][m]["best_lr"], **r["lm_eval"]}
            for t in names
            for m in methods
            for r in results
            if r["task"] == t and r["method"] == m and r["lr"] == table[t][m]["best_lr"] and "lm_eval" in r
        ]
    write_tables(out, "compare", result, rows)
    (out / "compare.md").write_text(markdown(table, methods, names) + "\n")
    sidecar(out / "compare.md")
    for t in names:
        series = []
        for m in methods:
            best = table[t][m]["best_lr"]
            run = next(
                r for r in results if r["task"] == t and r["method"] == m and r["lr"] == best and r["seed"] == seeds[0]
            )
            key = "eval_loss" if all("eval_loss" in p for p in run["val_curve"]) else "eval_accuracy"
            series.append(
                (f"{m} (lr {best:g})", [p["step"] for p in run["val_curve"]], [p[key] for p in run["val_curve"]])
            )
        plot_series(
            series,
            out / f"curves_{t}.png",
            f"{t}: validation {key.split('_')[1]}, each method at its best lr (seed {seeds[0]})",
            key,
        )
    return result
