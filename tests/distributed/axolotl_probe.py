"""A second axolotl plugin for the tests (listed after LiftPlugin in the YAML): a callback that records,
per rank and step, the optimizer state the rank holds, the trainable parameters and the loss, writes
them to ``$LIFT_PROBE_OUT/rank<r>.json`` when training ends, and can kill the run (``$LIFT_PROBE_KILL_AT``:
``os._exit`` after that step, no clean-up). Imported by axolotl inside its own venv only."""

from __future__ import annotations

import json
import os
from pathlib import Path

from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback


class _Probe(TrainerCallback):
    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.records: dict = {"state_numel": [], "trainable_numel": [], "trainable": [], "losses": [], "steps": []}

    def on_step_begin(self, args, state, control, **kw):
        engine = self.trainer.lift_engine
        names = sorted(n for n, p in engine.module.named_parameters() if p.requires_grad)
        self.records["state_numel"].append(engine.backend.optimizer_state_numel())
        self.records["trainable_numel"].append(
            sum(engine.backend.numel(p) for p in engine.module.parameters() if p.requires_grad)
        )
        self.records["trainable"].append(names)
        self.records["steps"].append(state.global_step)

    def on_step_end(self, args, state, control, **kw):
        if int(os.environ.get("LIFT_PROBE_KILL_AT", "0")) == state.global_step:
            os._exit(9)

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.records["losses"].append(float(logs["loss"]))

    def on_train_end(self, args, state, control, **kw):
        engine = self.trainer.lift_engine
        out = Path(os.environ["LIFT_PROBE_OUT"])
        out.mkdir(parents=True, exist_ok=True)
        self.records.update(
            global_step=state.global_step,
            rank=engine.rank,
            world=engine.world_size,
            trainer_class=[c.__name__ for c in type(self.trainer).__mro__],
            total_numel=sum(engine.backend.numel(p) for p in engine.module.parameters()),
            method=engine.lift.method,
            plan_steps=list(engine.plan.steps),
            planned=[sorted(engine.trainable_param_names(u)) for u in range(len(engine.plan.units))],
        )
        (out / f"rank{engine.rank}.json").write_text(json.dumps(self.records))


class ProbePlugin(BasePlugin):
    def add_callbacks_post_trainer(self, cfg, trainer):
        return [_Probe(trainer)]
