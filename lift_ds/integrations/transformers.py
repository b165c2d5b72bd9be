"""LIFT inside Hugging Face ``transformers.Trainer`` and TRL's ``SFTTrainer``.

Change the class and add a ``"lift"`` section to the DeepSpeed JSON you already pass::

    from lift_ds.integrations.transformers import LiftTrainer        # was: from transformers import Trainer
    args = TrainingArguments(..., deepspeed="ds_configs/zero2.json")   # the JSON has a "lift" section
    trainer = LiftTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.train(); trainer.save_model()

    from lift_ds.integrations.transformers import LiftSFTTrainer     # was: from trl import SFTTrainer

Training goes through lift_ds's engine and backends: one block trains per phase, the DeepSpeed engine
(or FSDP2 optimizer) is rebuilt over the active block, optimizer state exists for that block only.
That is what a callback toggling ``requires_grad`` cannot deliver under DeepSpeed: the engine it
leaves in place was built over every parameter. For FSDP2 pass ``lift_config=`` a config with an
``"fsdp"`` section instead of ``TrainingArguments.deepspeed``.

Trainer settings keep their meaning: ``per_device_train_batch_size``, ``gradient_accumulation_steps``,
``learning_rate``, ``weight_decay`` and the Adam betas/epsilon, ``optim`` (``adamw_torch``,
``adamw_torch_fused``, ``sgd``), ``lr_scheduler_type`` and warm-up (one schedule across phases),
``max_steps`` or ``num_train_epochs``, ``max_grad_norm``, ``bf16``, ``seed``/``data_seed``,
``logging_steps`` and ``report_to``, ``eval_strategy`` and evaluation (Trainer's own loop, with
``compute_metrics`` and ``preprocess_logits_for_metrics``, its forward passes through the engine),
``save_strategy`` / ``save_steps`` / ``save_total_limit`` and ``resume_from_checkpoint`` (exact: plan,
learning rate and data position; ``checkpoint-N`` also holds a Hugging Face model), ``save_model()`` (a
consolidated Hugging Face model), ``end()``. Trainer's no-decay group (biases, norms) holds on every
optimizer path. ``"auto"`` values and keys absent from the JSON follow the TrainingArguments, as Hugging
Face and accelerate do. A Trainer feature that cannot work with LIFT is a
:class:`~lift_ds.errors.ConfigError` when the trainer is built. ``docs/drop-in.md`` lists what differs.

Data order is lift_ds's own (keyed by global sample index, like ``launch/train.py``), so a resumed
run reads exactly the samples an uninterrupted run would, on any number of ranks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..run_config import load_run_config
from ..utils import get_logger, get_world_size
from .trainer_args import (
    OPTIMS,
    SampleStream,
    absolute_steps,
    decay_groups,
    optimizer_factory,
    scheduler_factory,
    trainer_config,
    trainer_fingerprint,
    unhonoured_arguments,
    unsupported_features,
)

__all__ = ["LiftTrainer", "LiftTrainerMixin", "SampleStream", "OPTIMS"]

logger = get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"


class _ModelView:
    """What Trainer's ``compute_loss`` / ``prediction_step`` get as ``model``: calls go through the
    LIFT engine (its backend's wrapper), other attributes come from the engine (and through it the
    model); it is named like the model (Trainer picks the causal-LM label shift by that name)."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._engine(*args, **kwargs)

    def _get_name(self) -> str:
        return self._engine.module._get_name()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


class LiftTrainerMixin:
    """The LIFT training loop for a ``transformers.Trainer`` subclass (see the module docstring).

    Args:
        lift_config: a config (path or dict) with a ``"lift"`` section, used instead of
            ``TrainingArguments.deepspeed`` (e.g. for the FSDP2 backend).
    """

    def __init__(self, *args: Any, lift_config: Any = None, **kwargs: Any) -> None:
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        early = (
            unhonoured_arguments(training_args)
            if training_args is not None and hasattr(training_args, "save_strategy")
            else []
        )
        if early:  # before Trainer.__init__, which would act on some of them (push_to_hub contacts the hub)
            raise ConfigError(early, source="LiftTrainer")
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self.lift_config_source = lift_config if lift_config is not None else self.args.deepspeed
        problems = unsupported_features(self)
        if self.lift_config_source is None:
            problems.append(
                'TrainingArguments.deepspeed: a DeepSpeed JSON with a "lift" section is required (or pass lift_config=)'
            )
        if self.train_dataset is not None and self.args.max_steps <= 0 and not hasattr(self.train_dataset, "__len__"):
            problems.append(
                "TrainingArguments.max_steps: required for a dataset without a length (LIFT plans its steps up front)"
            )
        if problems:
            raise ConfigError(problems, source="LiftTrainer")
        self.lift_engine: Any = None

    # ----------------------------------------------------------------- set-up

    def _lift_total_steps(self, world: int) -> int:
        a = self.args
        if a.max_steps > 0:
            return a.max_steps
        per_step = a.per_device_train_batch_size * a.gradient_accumulation_steps * world
        # as Trainer: epochs may be fractional
        return max(1, math.ceil(max(1, len(self.train_dataset) // per_step) * a.num_train_epochs))

    def _lift_build(self) -> Any:
        import lift_ds

        world = get_world_size()
        total = self._lift_total_steps(world)
        raw = trainer_config(self, self.lift_config_source, total)
        config = load_run_config(
            raw,
            world_size=world,
            source=str(self.lift_config_source) if not isinstance(self.lift_config_source, dict) else "lift_config",
        )
        if getattr(self.args, "activation_checkpointing", False) or getattr(self.args, "gradient_checkpointing", False):
            from ..blocks import enable_gradient_checkpointing

            given = (
                getattr(self.args, "activation_checkpointing_kwargs", None)
                or getattr(self.args, "gradient_checkpointing_kwargs", None)
                or {}
            )
            # non-reentrant, without transformers' input-grad hook: truncated backward is kept
            enable_gradient_checkpointing(
                self.model, **{k: v for k, v in given.items() if k in ("preserve_rng_state", "determinism_check")}
            )
        # Trainer's no-decay group for biases and norms holds on every path (the config's optimizer section included)
        groups = None
        if self.optimizer is not None:  # optimizers=(optimizer, scheduler): built ones, kept group by group
            optimizer = self.optimizer
        elif config.training.optimizer is not None:
            optimizer, groups = None, decay_groups(self, None)
        else:
            optimizer, groups = optimizer_factory(self), decay_groups(self, self.args.weight_decay)
        schedule = (
            self.lr_scheduler
            if self.lr_scheduler is not None
            else None
            if config.training.scheduler is not None
            else scheduler_factory(self, total)
        )
        engine, _, _, _ = lift_ds.initialize(
            model=self.model, config=config, optimizer=optimizer, lr_scheduler=schedule, param_groups=groups
        )
        engine.run_fingerprint.update(
            trainer_fingerprint(self, self.args.data_seed if self.args.data_seed is not None else self.args.seed)
        )
        return engine

    def _lift_stream(self, engine: Any) -> SampleStream:
        import datasets

        dataset, collate = self.train_dataset, self.data_collator
        if isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collate = self._get_collator_with_removed_columns(collate, description="training")
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return SampleStream(
            dataset,
            collate,
            engine.train_micro_batch_size_per_gpu(),
            engine.rank,
            engine.world_size,
            engine.gradient_accumulation_steps(),
            seed,
        )

    # ----------------------------------------------------------------- training

    def _lift_engine(self) -> Any:
        """The LIFT engine, built on first use (by train(), or an evaluate() before it)."""
        if self.lift_engine is None:
            self.lift_engine = self._lift_build()
            self.deepspeed = self.lift_engine  # Trainer's evaluation then builds no DeepSpeed engine of its own
        return self.lift_engine

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Train with LIFT; arguments as ``Trainer.train``. Returns a ``TrainOutput`` whose metrics hold
        ``train_loss`` (the mean logged loss of the steps this call ran), ``train_runtime``,
        ``train_samples_per_second``, ``train_steps_per_second``, ``total_flos`` and ``epoch``."""
        from transformers.trainer_callback import TrainerState
        from transformers.trainer_utils import TrainOutput, speed_metrics

        from ..api import PhaseOptimizer

        if trial is not None:
            raise ConfigError(["trial: hyperparameter search is not supported with LIFT"], source="LiftTrainer")
        a = self.args
        engine = self._lift_engine()
        stream = self._lift_stream(engine)
        total = engine.plan.total_steps  # *_steps below 1 are fractions of the run, as in Trainer
        log_every, save_every = absolute_steps(a.logging_steps, total), absolute_steps(a.save_steps, total)
        eval_every = absolute_steps(a.eval_steps, total) if a.eval_steps is not None else log_every
        logging = getattr(a.logging_strategy, "value", a.logging_strategy)
        self.state = TrainerState(
            max_steps=total,
            logging_steps=log_every,
            eval_steps=eval_every,
            save_steps=save_every,
            train_batch_size=a.per_device_train_batch_size,
            is_local_process_zero=self.is_local_process_zero(),
            is_world_process_zero=self.is_world_process_zero(),
        )
        if resume_from_checkpoint:
            self._lift_resume(resume_from_checkpoint)
        self.is_in_train = True
        engine.train()  # as Trainer does (from_pretrained returns a model in eval mode)
        handler = self.callback_handler
        # PhaseOptimizer: always the current phase's optimizer (a new one is built at every switch)
        handler.model, handler.optimizer, handler.lr_scheduler = self.model, PhaseOptimizer(engine), engine.lr_scheduler
        self.control = handler.on_train_begin(a, self.state, self.control)
        view, gas, n = _ModelView(engine), engine.gradient_accumulation_steps(), len(stream.dataset)
        logged_loss, logged_steps, t0, start_step, total_loss = 0.0, 0, time.time(), engine.global_step, 0.0
        while not engine.done:
            self.control = handler.on_step_begin(a, self.state, self.control)
            step_loss = 0.0
            for j in range(gas):
                inputs = self._prepare_inputs(stream.batch_at(engine.samples_seen, j))
                loss = self.compute_loss(view, inputs)
                engine.backward(loss)
                step_loss += loss.item() / gas
                del loss  # DeepSpeed's hooks on it would keep this phase's engine alive
                engine.step()
            # the mean over ranks, as Trainer logs it
            step_loss = engine.backend.all_reduce_sum([step_loss])[0] / engine.world_size
            logged_loss, logged_steps, total_loss = logged_loss + step_loss, logged_steps + 1, total_loss + step_loss
            self.state.global_step, self.state.epoch = engine.global_step, engine.samples_seen / n
            self.control = handler.on_step_end(a, self.state, self.control)
            if self._lift_due(logging, log_every, engine, stream) or (
                logging != "no" and (engine.done or (a.logging_first_step and engine.global_step == 1))
            ):
                self.log(
                    {
                        "loss": logged_loss / logged_steps,
                        "learning_rate": engine.get_lr()[0],
                        "grad_norm": float(engine.last_grad_norm or 0.0),
                        "lift_phase": float(
                            engine.cursor.phase.index + 1 if not engine.done else len(engine.plan.phases)
                        ),
                    }
                )
                logged_loss, logged_steps = 0.0, 0
            if self._lift_due(a.eval_strategy, eval_every, engine, stream) and self.eval_dataset is not None:
                self.evaluate(ignore_keys=ignore_keys_for_eval)
            if self._lift_due(a.save_strategy, save_every, engine, stream):
                self._lift_save()
            if self.control.should_training_stop:
                break
        steps = engine.global_step - start_step
        metrics = speed_metrics("train", t0, num_samples=steps * stream.global_batch, num_steps=steps)
        metrics.update(
            {
                "total_flos": float(self.state.total_flos),
                "train_loss": total_loss / max(steps, 1),
                "lift_phase_switch_seconds": engine.phase_switch_seconds,
                "lift_skipped_steps": float(engine.skipped_steps),
            }
        )
        self.is_in_train = False
        self.log(metrics)
        self.control = handler.on_train_end(a, self.state, self.control)
        return TrainOutput(engine.global_step, metrics["train_loss"], metrics)

    @staticmethod
    def _lift_due(strategy: Any, every: int, engine: Any, stream: SampleStream) -> bool:
        kind = getattr(strategy, "value", strategy)
        if kind == "steps":
            return bool(every) and engine.global_step % every == 0
        if kind == "epoch":  # the step that completed an epoch
            return (engine.samples_seen // stream.samples_per_epoch) > (
                (engine.samples_seen - stream.global_batch) // stream.samples_per_epoch
            )
        return False

    # ----------------------------------------------------------------- evaluation

    def _wrap_model(self, model: Any, training: bool = True, dataloader: Any = None) -> Any:
        # Trainer's evaluation and prediction loops run their forward passes through the LIFT engine
        if self.lift_engine is not None:
            return _ModelView(self.lift_engine)
        return super()._wrap_model(model, training, dataloader)  # type: ignore[misc]

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Trainer's own evaluation (``compute_metrics``, ``preprocess_logits_for_metrics``, the eval
        dataloader split over ranks and gathered), its forward passes through the LIFT engine; collective."""
        engine = self._lift_engine()
        training = engine.training
        try:
            return super().evaluate(
                eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
            )  # type: ignore[misc]
        finally:
            engine.train(training)

    def predict(self, test_dataset: Any, ignore_keys: Any = None, metric_key_prefix: str = "test") -> Any:
        """Trainer's prediction loop through the LIFT engine (see :meth:`evaluate`); collective."""
        engine = self._lift_engine()
        training = engine.training
        try:
            return super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)  # type: ignore[misc]
        finally:
            engine.train(training)

    # ----------------------------------------------------------------- checkpoints and export

    def _lift_save(self) -> Path:
        """``output_dir/checkpoint-<step>/``, written atomically: lift_ds's resume state (with the
        TrainerState in it) and, as in a Trainer checkpoint, the Hugging Face model (``from_pretrained``
        loads it), the tokenizer, ``trainer_state.json`` and ``training_args.bin``."""
        from ..export import save_hf_checkpoint

        out = Path(self.args.output_dir)

        def trainer_files(tmp: Path) -> None:
            save_hf_checkpoint(self.lift_engine, tmp, tokenizer=self.processing_class)
            if self.is_world_process_zero():
                self.state.save_to_json(str(tmp / "trainer_state.json"))
                torch.save(self.args, tmp / "training_args.bin")

        path = self.lift_engine.save_checkpoint(
            out,
            tag=f"{CHECKPOINT_PREFIX}{self.state.global_step}",
            extra_files=trainer_files,
            client_state={"trainer_state": json.loads(json.dumps(dataclasses.asdict(self.state), default=str))},
        )
        # save_total_limit: the newest checkpoints stay, and always the one just written (``latest``)
        self.lift_engine.checkpointer.rotate(out, CHECKPOINT_PREFIX, self.args.save_total_limit)
        self.control = self.callback_handler.on_save(self.args, self.state, self.control)
        return path

    def _lift_resume(self, resume_from_checkpoint: str | bool) -> None:
        from ..errors import ResumeError

        if resume_from_checkpoint is True:  # the newest complete one (latest, or the newest that verifies)
            path, client = self.lift_engine.load_checkpoint(self.args.output_dir)
            if path is None:
                raise ResumeError(
                    (
                        "resume_from_checkpoint=True: no valid checkpoint "
                        f"found in output directory ({self.args.output_dir})"
                    ),
                    Path(self.args.output_dir),
                )
        else:
            path = Path(str(resume_from_checkpoint))
            if not path.is_dir():
                raise ResumeError(
                    f"resume_from_checkpoint: {str(path)!r} is not a checkpoint directory (it does not exist); give "
                    f"output_dir/{CHECKPOINT_PREFIX}N or True for the newest",
                    path,
                )
            _, client = self.lift_engine.load_checkpoint(path.parent, tag=path.name)
        if "trainer_state" in client:
            saved = client["trainer_state"]
            self.state.log_history, self.state.total_flos = saved.get("log_history", []), saved.get("total_flos", 0.0)
        self.state.global_step = self.lift_engine.global_step
        logger.info("resumed from %s at step %d", path, self.state.global_step)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """A consolidated Hugging Face model (gathered from ZeRO-3 / FSDP2 shards; collective)."""
        if self.lift_engine is None:
            return super().save_model(output_dir, _internal_call)  # type: ignore[misc]
        from ..export import save_hf_checkpoint

        out = output_dir or self.args.output_dir
        save_hf_checkpoint(self.lift_engine, out, tokenizer=self.processing_class)
        if self.is_world_process_zero():
            torch.save(self.args, os.path.join(out, "training_args.bin"))

    def end(self) -> None:
        """Release the LIFT engine (its last DeepSpeed engine or FSDP state), then Trainer's ``end()``:
        trackers finished, the process group destroyed. Call it once, at the end of the script."""
        if self.lift_engine is not None:
            self.lift_engine.close()
            self.lift_engine = None
            self.deepspeed = None
        super().end()  # type: ignore[misc]


def _transformers_trainer() -> type:
    from transformers import Trainer

    return Trainer


class LiftTrainer(LiftTrainerMixin, _transformers_trainer()):  # type: ignore[misc]
    """``transformers.Trainer`` that trains one block at a time (see the module docstring)."""


def __getattr__(name: str) -> Any:
    if name == "LiftSFTTrainer":  # trl is optional: built on first use
        from trl import SFTTrainer

        cls = type(
            "LiftSFTTrainer",
            (LiftTrainerMixin, SFTTrainer),
            {"__doc__": "TRL's ``SFTTrainer`` with LIFT (see the module docstring)."},
        )
        globals()["LiftSFTTrainer"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
