#!/usr/bin/env python
"""Causal-LM fine-tuning in the shape of Hugging Face's ``examples/pytorch/language-modeling/run_clm.py``,
written here, with LIFT's one swap: ``LiftTrainer`` for ``Trainer`` (the DeepSpeed JSON passed as
``--deepspeed`` has a ``"lift"`` section).

Like run_clm it parses ``ModelArguments`` / ``DataTrainingArguments`` / ``TrainingArguments`` with
``HfArgumentParser``, reads text files with ``datasets.load_dataset("text")``, tokenizes and groups them
into ``block_size`` chunks under ``main_process_first``, passes ``compute_metrics`` (next-token accuracy)
and ``preprocess_logits_for_metrics`` whenever ``--do_eval`` is on, trains with
``resume_from_checkpoint=training_args.resume_from_checkpoint``, then ``save_model()``, ``log_metrics`` /
``save_metrics("train")`` / ``save_state()``, evaluates (perplexity from ``eval_loss``), and writes a model
card (``push_to_hub`` off). The accuracy is computed here (run_clm loads it with ``evaluate.load``,
which needs the Hub).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from itertools import chain

import torch._dynamo  # noqa: F401  (before any deepspeed.zero.Init)
from datasets import load_dataset
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from lift_ds.integrations.transformers import LiftTrainer  # was: from transformers import Trainer


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "a Hugging Face model directory"})
    dtype: str | None = field(default=None, metadata={"help": "auto, bfloat16, float16, float32"})


@dataclass
class DataTrainingArguments:
    train_file: str | None = field(default=None)
    validation_file: str | None = field(default=None)
    block_size: int | None = field(default=None)
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    keep_linebreaks: bool = field(default=True)


def main(argv=None) -> int:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    set_seed(training_args.seed)

    data_files = {k: v for k, v in (("train", data_args.train_file), ("validation", data_args.validation_file)) if v}
    raw_datasets = load_dataset("text", data_files=data_files, keep_linebreaks=data_args.keep_linebreaks)

    config = AutoConfig.from_pretrained(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    import torch

    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, config=config, dtype=dtype)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))

    column_names = list(raw_datasets["train" if training_args.do_train else "validation"].features)
    text_column_name = "text" if "text" in column_names else column_names[0]

    def tokenize_function(examples):
        return tokenizer(examples[text_column_name])

    with training_args.main_process_first(desc="dataset map tokenization"):
        tokenized_datasets = raw_datasets.map(tokenize_function, batched=True, remove_columns=column_names)
    block_size = min(data_args.block_size or 1024, tokenizer.model_max_length, config.max_position_embeddings)

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = (len(concatenated[list(examples)[0]]) // block_size) * block_size
        result = {k: [t[i : i + block_size] for i in range(0, total, block_size)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    with training_args.main_process_first(desc="grouping texts together"):
        lm_datasets = tokenized_datasets.map(group_texts, batched=True)

    train_dataset = eval_dataset = None
    if training_args.do_train:
        train_dataset = lm_datasets["train"]
        if data_args.max_train_samples is not None:
            train_dataset = train_dataset.select(range(min(len(train_dataset), data_args.max_train_samples)))
    if training_args.do_eval:
        eval_dataset = lm_datasets["validation"]
        if data_args.max_eval_samples is not None:
            eval_dataset = eval_dataset.select(range(min(len(eval_dataset), data_args.max_eval_samples)))

    def preprocess_logits_for_metrics(logits, labels):
        if isinstance(logits, tuple):
            logits = logits[0]
        return logits.argmax(dim=-1)

    def compute_metrics(eval_preds):
        preds, labels = eval_preds
        labels = labels[:, 1:].reshape(-1)
        preds = preds[:, :-1].reshape(-1)
        return {"accuracy": float((preds == labels).mean())}

    trainer = LiftTrainer(  # was: Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=compute_metrics if training_args.do_eval else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics if training_args.do_eval else None,
    )

    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        metrics = train_result.metrics
        metrics["train_samples"] = len(train_dataset)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_dataset)
        try:
            metrics["perplexity"] = math.exp(metrics["eval_loss"])
        except OverflowError:
            metrics["perplexity"] = float("inf")
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    kwargs = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-generation"}
    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    else:
        trainer.create_model_card(**kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
