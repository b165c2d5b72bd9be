"""LiftTrainer under a multi-rank launcher on a tiny model; rank 0 writes what the tests compare.

    torchrun --nproc_per_node 2 tests/distributed/trainer_worker.py SPEC.json OUT.pt

SPEC: {"config": lift_ds config dict, "output_dir": ..., "max_steps": N, "save_steps": K,
"kill_at": step or null, "resume": bool, "attention_dropout": p (default 0)}. The dataset is fixed-length
token sequences, so the mean over a global batch equals the mean of the per-rank means (the reference
feeds the whole global batch at once).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch._dynamo  # noqa: E402,F401

from helpers import lm_batches, tiny_llama  # noqa: E402

SEQ, N = 16, 64
TRAINING = dict(
    per_device_train_batch_size=2,
    learning_rate=1e-2,
    adam_epsilon=1e-3,
    weight_decay=0.0,
    max_grad_norm=0.0,
    lr_scheduler_type="linear",
    warmup_steps=2,
    logging_steps=1,
    seed=0,
    report_to=[],
    use_cpu=True,
    save_strategy="steps",
    eval_strategy="no",
    disable_tqdm=True,
)


def dataset() -> list[dict]:
    rows = lm_batches(N, batch=1, seq=SEQ, seed=3)
    return [{"input_ids": r["input_ids"][0].tolist(), "labels": r["labels"][0].tolist()} for r in rows]


def collate(rows: list[dict]) -> dict:
    return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}


def full_state(engine) -> dict:
    return {n: t.float() for n, t in engine.backend.full_state_dict().items()}


def main() -> None:
    from transformers import TrainerCallback, TrainingArguments

    from lift_ds.integrations.transformers import LiftTrainer

    spec = json.loads(Path(sys.argv[1]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    records: dict = {"state_numel": [], "trainable_numel": [], "losses": []}

    class Census(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            e = trainer.lift_engine
            records["state_numel"].append(e.backend.optimizer_state_numel())
            records["trainable_numel"].append(sum(e.backend.numel(p) for p in e.module.parameters() if p.requires_grad))

        def on_step_end(self, args, state, control, **kw):
            if spec.get("kill_at") == state.global_step:
                os._exit(9)  # a crash: no clean-up, no flush

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                records["losses"].append(logs["loss"])

    args = TrainingArguments(
        output_dir=spec["output_dir"], max_steps=spec["max_steps"], save_steps=spec.get("save_steps", 10**6), **TRAINING
    )
    trainer = LiftTrainer(
        model=tiny_llama(attention_dropout=spec.get("attention_dropout", 0.0)),
        args=args,
        train_dataset=dataset(),
        data_collator=collate,
        lift_config=spec["config"],
        callbacks=[Census()],
    )
    out = trainer.train(resume_from_checkpoint=True if spec.get("resume") else None)
    records["global_step"] = out.global_step
    records["resumed_at"] = trainer.lift_engine.global_step - len(records["losses"])
    records["final"] = full_state(trainer.lift_engine)
    if spec.get("save_model"):
        trainer.save_model(spec["save_model"])
    if rank == 0:
        torch.save(records, sys.argv[2])


if __name__ == "__main__":
    main()
