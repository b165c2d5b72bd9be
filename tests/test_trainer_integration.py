"""LiftTrainer's up-front checks: Trainer features LIFT cannot honour, and DeepSpeed values that
disagree with the TrainingArguments, are errors when the trainer is built (or before training)."""

from __future__ import annotations

import pytest
import torch

from lift_ds.errors import ConfigError

from helpers import lm_batches, tiny_llama

CFG = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "lift": {"backend": "torch"}}


def data():
    return [
        {"input_ids": b["input_ids"][0].tolist(), "labels": b["labels"][0].tolist()} for b in lm_batches(16, batch=1)
    ]


def collate(rows):
    return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}


def build(tmp_path, lift_config=CFG, trainer_kwargs=None, **args):
    from transformers import TrainingArguments

    from lift_ds.integrations.transformers import LiftTrainer

    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=8,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    return LiftTrainer(
        model=tiny_llama(),
        args=TrainingArguments(**{**base, **args}),
        train_dataset=data(),
        data_collator=collate,
        lift_config=lift_config,
        **(trainer_kwargs or {}),
    )


@pytest.mark.parametrize(
    "args,needle",
    [
        ({"optim": "adafactor"}, "TrainingArguments.optim: 'adafactor' is not built per LIFT phase"),
        ({"torch_compile": True}, "TrainingArguments.torch_compile: not supported with LIFT"),
        (
            {"load_best_model_at_end": True, "eval_strategy": "steps", "save_strategy": "steps"},
            "TrainingArguments.load_best_model_at_end",
        ),
    ],
)
def test_unsupported_trainer_features_fail_at_construction(tmp_path, args, needle):
    with pytest.raises(ConfigError) as info:
        build(tmp_path, trainer_kwargs={"eval_dataset": data()[:2]}, **args)
    assert needle in str(info.value)


def _accuracy(pred) -> dict:
    preds, labels = pred
    preds, labels = preds[:, :-1], labels[:, 1:]  # next-token accuracy, as run_clm.py computes it
    mask = labels != -100
    return {"accuracy": float((preds[mask] == labels[mask]).mean())}


def test_evaluation_is_trainers_own_loop(tmp_path):
    """compute_metrics and preprocess_logits_for_metrics run in Trainer's evaluation loop, through the
    LIFT engine (evaluate() before train() builds it): the metrics equal plain Trainer's on the same model,
    and after training the loss has fallen. TrainOutput carries train_loss."""
    from transformers import Trainer, TrainingArguments

    kw = {
        "eval_dataset": data()[:6],
        "compute_metrics": _accuracy,
        "preprocess_logits_for_metrics": lambda logits, labels: logits.argmax(-1),
    }
    lift = build(tmp_path / "lift", learning_rate=1e-2, trainer_kwargs=kw)
    before = lift.evaluate()
    plain = Trainer(
        model=tiny_llama(),
        args=TrainingArguments(
            output_dir=str(tmp_path / "plain"),
            per_device_eval_batch_size=8,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        ),
        data_collator=collate,
        **kw,
    )
    want = plain.evaluate()
    assert (
        before["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-6)
        and before["eval_accuracy"] == want["eval_accuracy"]
    )
    out = lift.train()
    assert out.metrics["train_loss"] == pytest.approx(out.training_loss) and out.training_loss > 0
    after = lift.evaluate()
    assert after["eval_loss"] < before["eval_loss"] - 0.03 and "eval_accuracy" in after


@pytest.mark.parametrize(
    "args,needle",
    [
        (
            {"lr_scheduler_type": "reduce_lr_on_plateau", "eval_strategy": "steps"},
            "TrainingArguments.lr_scheduler_type: 'reduce_lr_on_plateau' needs",
        ),
        ({"optim_args": "foreach=False"}, "TrainingArguments.optim_args: 'foreach=False' is not supported with LIFT"),
        (
            {"save_strategy": "best", "metric_for_best_model": "eval_loss", "eval_strategy": "steps"},
            "TrainingArguments.save_strategy: 'best' is not supported",
        ),
        (
            {"per_device_eval_batch_size": 0},
            "TrainingArguments.per_device_eval_batch_size: must be an integer >= 1, got 0",
        ),
        ({"weight_decay": float("nan")}, "TrainingArguments.weight_decay: must be a finite number >= 0, got nan"),
        (
            {"eval_on_start": True, "eval_strategy": "steps"},
            "TrainingArguments.eval_on_start: True is not supported with LIFT",
        ),
        ({"save_only_model": True}, "TrainingArguments.save_only_model: True is not supported with LIFT"),
        ({"ignore_data_skip": True}, "TrainingArguments.ignore_data_skip: True is not supported with LIFT"),
        (
            {"push_to_hub": True, "hub_model_id": "x/y"},
            "TrainingArguments.push_to_hub: True is not supported with LIFT",
        ),
        ({"bf16_full_eval": True}, "TrainingArguments.bf16_full_eval: True is not supported"),
        (
            {"max_steps": -1, "num_train_epochs": 0},
            "TrainingArguments.num_train_epochs: must be a number > 0 when max_steps is not set, got 0",
        ),
    ],
)
def test_arguments_lift_cannot_honour_fail_at_construction(tmp_path, args, needle):
    with pytest.raises(ConfigError) as info:
        build(tmp_path, trainer_kwargs={"eval_dataset": data()[:2]}, **args)
    assert needle in str(info.value)


def test_fractional_steps_are_fractions_of_the_run_and_a_missing_checkpoint_is_named(tmp_path):
    """Hugging Face reads logging/eval/save_steps below 1 as a fraction of the run (ceil): 0.25 of 8
    steps is every 2, 0.5 every 4; num_train_epochs 0.5 is half an epoch's steps. A resume from a
    path that does not exist is a ResumeError naming it."""
    from lift_ds.errors import ResumeError

    trainer = build(
        tmp_path,
        logging_steps=0.25,
        save_steps=0.5,
        eval_strategy="steps",
        eval_steps=0.5,
        trainer_kwargs={"eval_dataset": data()[:2]},
    )
    trainer.train()
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [2, 4, 6, 8]
    assert [h["step"] for h in trainer.state.log_history if "eval_loss" in h] == [4, 8]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    half = build(tmp_path / "half", max_steps=-1, num_train_epochs=0.5, logging_strategy="no")
    half.train()
    # 16 samples / 2 = 8 per epoch
    assert half.lift_engine.plan.total_steps == 4 and not [h for h in half.state.log_history if "loss" in h]
    with pytest.raises(ResumeError, match=r"resume_from_checkpoint: '.*checkpoint-99' is not a checkpoint directory"):
        build(tmp_path / "again").train(resume_from_checkpoint=str(tmp_path / "checkpoint-99"))
    with pytest.raises(ResumeError, match="resume_from_checkpoint=True: no valid checkpoint found"):
        build(tmp_path / "none").train(resume_from_checkpoint=True)


def test_a_config_without_lift_section_or_any_config(tmp_path):
    with pytest.raises(
        ConfigError, match='TrainingArguments.deepspeed: a DeepSpeed JSON with a "lift" section is required'
    ):
        build(tmp_path, lift_config=None)
    trainer = build(tmp_path, lift_config={"train_micro_batch_size_per_gpu": "auto"})
    with pytest.raises(ConfigError, match='the config has no "lift" section'):
        trainer.train()


def test_explicit_values_must_agree_with_training_arguments(tmp_path):
    cfg = {**CFG, "train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    trainer = build(tmp_path, lift_config=cfg, learning_rate=5e-4)
    with pytest.raises(ConfigError) as info:
        trainer.train()
    text = str(info.value)
    assert "train_micro_batch_size_per_gpu: 4 in the DeepSpeed config, but TrainingArguments says 2" in text
    assert "optimizer.params.lr: 0.001 in the DeepSpeed config, but TrainingArguments says 0.0005" in text


def test_one_process_run_logs_evaluates_saves_and_resumes(tmp_path):
    """The torch backend, one process: logging, evaluation loss, checkpoints and an exact resume."""
    trainer = build(
        tmp_path,
        logging_steps=2,
        save_steps=4,
        eval_strategy="steps",
        eval_steps=4,
        learning_rate=1e-2,
        trainer_kwargs={"eval_dataset": data()[:4]},
    )
    out = trainer.train()
    assert out.global_step == 8 and [h["step"] for h in trainer.state.log_history if "eval_loss" in h] == [4, 8]
    assert (tmp_path / "checkpoint-4").is_dir() and (tmp_path / "checkpoint-8").is_dir()
    final = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    again = build(tmp_path, logging_steps=2, save_steps=4, learning_rate=1e-2, save_total_limit=1)
    import shutil

    shutil.rmtree(tmp_path / "checkpoint-8")
    (tmp_path / "latest").write_text("checkpoint-4")
    again.train(resume_from_checkpoint=True)
    assert again.lift_engine.global_step == 8 and sum(1 for h in again.state.log_history if "loss" in h) == 4
    # save_total_limit=1: the launcher's rotation (renamed aside, then removed) keeps the one just written
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint-" in p.name) == ["checkpoint-8"]
    for n, p in again.model.named_parameters():
        assert torch.equal(p, final[n]), n


def test_callbacks_see_the_current_phases_optimizer(tmp_path):
    """Trainer callbacks get an optimizer handle that follows the phase switches (a new optimizer is
    built at every switch): its parameters are the active block's."""
    from transformers import TrainerCallback

    seen = []

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kw):
            seen.append({id(p) for g in optimizer.param_groups for p in g["params"]})

    trainer = build(tmp_path, trainer_kwargs={"callbacks": [Probe()]})
    trainer.train()
    assert len(seen) == 8 and seen[0] != seen[2] and seen[0] == seen[1]  # 4 layers x 2 steps: a new block every 2 steps


@pytest.mark.parametrize("method", ["badam", "lisa"])
def test_badam_and_lisa_presets_through_the_trainer(tmp_path, method):
    """lift.method badam / lisa under LiftTrainer: at every step the Trainer's optimizer holds exactly
    the preset's parameters (BAdam: one layer per period, BAdam's first period one step short; LISA:
    embedding, final norm and head plus the period's drawn layers) and starts each period empty."""
    from transformers import TrainerCallback

    from lift_ds.schedule import badam_phases, lisa_sets

    seen = []

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kw):
            seen.append(
                ({id(p) for g in optimizer.param_groups for p in g["params"] if p.numel() > 1}, len(optimizer.state))
            )

    lift = {
        "backend": "torch",
        "method": method,
        "switch_every": 3,
        "seed": 4,
        **({"lisa_layers": 2} if method == "lisa" else {}),
    }
    trainer = build(
        tmp_path, lift_config={**CFG, "lift": lift}, learning_rate=1e-2, trainer_kwargs={"callbacks": [Probe()]}
    )
    ids = {id(p): n for n, p in trainer.model.named_parameters()}
    trainer.train()

    def layers(ks):
        return {n for n in ids.values() if n.startswith("model.layers.") and int(n.split(".")[2]) in ks}

    if method == "badam":
        expected = [layers({b}) for b, length in badam_phases(4, 8, 3) for _ in range(length)]
        starts = {0, 2, 5}
    else:
        always = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
        expected = [always | layers(set(lisa_sets(4, 8, 3, 2, seed=4)[k // 3])) for k in range(8)]
        starts = {0, 3, 6}
    assert len(seen) == 8
    for k, (params, state) in enumerate(seen):
        assert {ids[i] for i in params} == expected[k], (k, sorted({ids[i] for i in params} ^ expected[k]))
        # a fresh optimizer at every period start, the state kept within
        assert (state == 0) == (k in starts), (k, state)
    assert len({frozenset(e) for e in expected}) > 1
