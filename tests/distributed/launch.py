"""Launch tests/distributed/worker.py on 2 CPU ranks and compute single-process references."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

import lift_ds

from helpers import lm_batches, tiny_llama

WORKER = Path(__file__).with_name("worker.py")
REPO = Path(__file__).resolve().parents[2]
WORLD = 2


class ScenarioFailed(AssertionError):
    """One scenario of a shared multi-rank job failed, or the job ended before it produced a result."""


class ScenarioResults(Mapping):
    """Results of a shared multi-rank job, attributed per scenario.

    ``results[name]`` is that scenario's output; it raises :class:`ScenarioFailed` (naming the job,
    the scenario and the error on every rank that raised) when the scenario failed, or when the job
    died before the scenario finished, so a failing scenario fails its own tests and no others.
    """

    def __init__(self, job: str, results: dict, errors: dict[str, str], missing: str) -> None:
        self.job, self._results, self._errors, self._missing = job, dict(results), dict(errors), missing

    def __getitem__(self, name: str) -> dict:
        if name in self._errors:
            raise ScenarioFailed(f"[job {self.job}] scenario {name!r} failed:\n{self._errors[name]}")
        if name not in self._results:
            raise ScenarioFailed(f"[job {self.job}] scenario {name!r} produced no result: {self._missing}")
        return self._results[name]

    def __iter__(self):
        return iter({**self._results, **self._errors})

    def __len__(self) -> int:
        return len({**self._results, **self._errors})

    def error(self, name: str) -> str | None:
        """The scenario's error text (None when it produced a result)."""
        if name in self._errors:
            return self._errors[name]
        return None if name in self._results else self._missing

    def fail(self, name: str, because: str) -> None:
        """Mark a scenario failed (e.g. the job it depends on failed)."""
        self._results.pop(name, None)
        self._errors[name] = because

    def update(self, other: ScenarioResults) -> None:
        """Take in another job's scenarios (theirs win on a name clash)."""
        for name in other:
            self._results.pop(name, None)
            self._errors.pop(name, None)
            err = other.error(name)
            if err is None:
                self._results[name] = other[name]
            else:
                self._errors[name] = f"[job {other.job}] {err}"


def torchrun(
    scenarios: dict, tmp: Path, name: str = "run", timeout: int = 900, nproc: int = WORLD, expect_results: bool = True
) -> ScenarioResults:
    """Run ``scenarios`` in one ``torchrun`` job of ``nproc`` ranks; results per scenario.

    The worker writes each scenario's result as it finishes (and each rank its own errors), so a
    scenario that raises, or a job killed by the timeout, leaves every other scenario's result intact.
    With ``expect_results=False`` (a job whose scenarios end the process, e.g. to simulate a crash) a
    non-zero exit fails every scenario of the job.
    """
    dying = [k for k, sc in scenarios.items() if sc.get("die_after_save")]
    if dying and dying != list(scenarios)[-1:]:
        # the process ends there: scenarios after it would never run, and nothing would say so
        raise ValueError(f"job {name!r}: a die_after_save scenario must come last, not {dying} of {list(scenarios)}")
    spec = tmp / f"{name}.json"
    out = tmp / f"{name}.results"
    spec.write_text(json.dumps(scenarios))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(WORKER),
        str(spec),
        str(out),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        code = f"killed after the {timeout} s timeout"
        stdout, stderr = _text(e.stdout), _text(e.stderr)
    tail = f"the job ended (exit {code}) before it finished.\n{stdout[-2000:]}\n{stderr[-5000:]}"
    if not expect_results:
        errors = {} if code == 0 else {k: tail for k in scenarios}
        return ScenarioResults(name, {} if errors else {k: {} for k in scenarios}, errors, tail)
    results: dict = {}
    errors: dict[str, list[str]] = {}
    for k in scenarios:
        f = out / f"{k}.pt"
        if f.is_file():
            results[k] = torch.load(f, weights_only=False)
    for f in sorted(out.glob("errors.rank*.jsonl")) if out.is_dir() else []:
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            errors.setdefault(rec["scenario"], []).append(f"rank {rec['rank']}: {rec['error']}")
    for k in errors:
        results.pop(k, None)
    return ScenarioResults(name, results, {k: "\n".join(v) for k, v in errors.items()}, tail)


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.5),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, eps=1e-3, weight_decay=0.01),
}


def reference(sc: dict, world: int = WORLD, start_state: dict | None = None) -> tuple[dict, dict]:
    """The torch backend, one process, fed the same global batches. Returns (start, final).

    ``start_state`` replaces the initial weights (e.g. those a zero.Init model was built with)."""
    cfg = copy.deepcopy(sc["config"])
    cfg.pop("zero_optimization", None)
    mb = cfg.pop("train_micro_batch_size_per_gpu", 2)
    cfg["train_micro_batch_size_per_gpu"] = mb * world
    cfg["lift"] = {**cfg["lift"], "backend": "torch"}
    cfg.pop("train_batch_size", None)
    for key in ("bf16", "fp16"):
        cfg.pop(key, None)
    model = tiny_llama(
        layers=sc.get("layers", 4),
        hidden=sc.get("hidden", 32),
        vocab=sc.get("vocab", 128),
        seed=sc.get("seed", 0),
        tie=sc.get("tie", False),
    )
    if start_state is not None:
        model.load_state_dict(start_state, strict=False)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = None if sc["optimizer"] == "config" else OPTIMIZERS[sc["optimizer"]]
    engine, _, _, _ = lift_ds.initialize(model=model, config=cfg, optimizer=opt)
    gas = cfg.get("gradient_accumulation_steps", 1)
    data = lm_batches(
        sc["steps"] * gas,
        batch=mb * world,
        seq=sc.get("seq", 16),
        vocab=sc.get("vocab", 128),
        seed=sc.get("data_seed", 1),
        prompt=sc.get("prompt", 0),
    )
    for b in data:
        loss = engine(**b).loss
        if engine.global_step + 1 in sc.get("nan_steps", ()):
            loss = loss * float("nan")
        engine.backward(loss)
        engine.step()
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    if engine.quant is not None:  # Q-LIFT: quantized layers' exact weights are in the block store
        final.update(engine.quant.exact_weights())
    return start, final


def max_rel_error(final: dict, ref: dict, start: dict) -> tuple[float, float]:
    """(max |final - ref|, max |ref - start|) over all parameters."""
    err = max((final[n].float() - ref[n].float()).abs().max().item() for n in ref)
    move = max((ref[n] - start[n]).abs().max().item() for n in ref)
    return err, move


def assert_same_state(got: dict, want: dict) -> None:
    """Two full optimizer states (lift_ds.backends.state form) are equal: step, keys, every tensor."""
    assert got is not None and want is not None, (got is None, want is None)
    assert got["step"] == want["step"] and got["keys"] == want["keys"], (
        got["step"],
        want["step"],
        got["keys"],
        want["keys"],
    )
    assert sorted(got["master"]) == sorted(want["master"]) and want["master"]
    for n in want["master"]:
        assert torch.equal(got["master"][n], want["master"][n]), n
        for k in want["keys"]:
            assert torch.equal(got["state"][n][k], want["state"][n][k]), (n, k)
