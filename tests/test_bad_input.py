"""Malformed configurations, command lines and data: each ends with exit code 2 and a short message
naming the field (or file and line) and the fix, before any process group, with no traceback.

The cases run in-process through ``lift_ds.train.main`` (fast); test_cli.py runs some of them as a
real ``python launch/train.py`` subprocess.
"""

from __future__ import annotations

import json

import pytest
import torch.distributed as dist

from lift_ds.train import main

from helpers import make_model_dir, tiny_llama, write_sentiment

BASE = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
    "lift": {"backend": "torch"},
}


def merged(**changes):
    cfg = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        if key.startswith("lift_"):
            cfg["lift"][key[5:]] = value
        else:
            cfg[key] = value
    return cfg


def ADAMW(**params):
    return {"type": "AdamW", "params": {"lr": 1e-3, **params}}


def NESTED(depth):
    node = {}
    for _ in range(depth):
        node = {"x": node}
    return node


# (id, config or None for BASE, extra argv, substrings the message must contain)
CONFIG_CASES = [
    ("unknown-lift-key", merged(lift_shedule="random"), [], ["lift.shedule: unknown key", "schedule"]),
    (
        "bad-schedule",
        merged(lift_schedule="sideways"),
        [],
        ["lift.schedule: got 'sideways'", "front2end, end2front, random"],
    ),
    ("bad-policy", merged(lift_policy="batched"), [], ["lift.policy: got 'batched'", "grouped, cyclic"]),
    ("bad-backend", merged(lift_backend="horovod"), [], ["lift.backend: got 'horovod'", "deepspeed"]),
    ("bad-optimizer-state", merged(lift_optimizer_state="keep"), [], ["lift.optimizer_state: got 'keep'", "offload"]),
    ("bool-as-string", merged(lift_include_head="yes"), [], ["lift.include_head: must be true or false, got 'yes'"]),
    (
        "total-steps-zero",
        merged(lift_total_steps=0),
        ["--max_steps", None],
        ["lift.total_steps: must be an integer >= 1"],
    ),
    ("total-steps-string", merged(lift_total_steps="ten"), ["--max_steps", None], ["lift.total_steps", "'ten'"]),
    ("layer-range-reversed", merged(lift_layer_range=[3, 2]), [], ["lift.layer_range", "1 <= first <= last", "[3, 2]"]),
    ("layer-range-zero", merged(lift_layer_range=[0, 2]), [], ["lift.layer_range", "1-indexed", "[0, 2]"]),
    ("layer-range-string", merged(lift_layer_range="1-4"), [], ["lift.layer_range", "'1-4'"]),
    (
        "layer-range-past-model",
        merged(lift_layer_range=[2, 9]),
        [],
        ["lift.layer_range: [2, 9] reaches past the model's 4 layers"],
    ),
    (
        "always-trainable-number",
        merged(lift_always_trainable=5),
        [],
        ["lift.always_trainable: must be a list of module-name patterns"],
    ),
    (
        "always-trainable-no-match",
        merged(lift_always_trainable=["nonexistent_head"]),
        [],
        ["always_trainable", "nonexistent_head"],
    ),
    ("seed-string", merged(lift_seed="x"), [], ["lift.seed: must be an integer >= 0 and <= 4294967295, got 'x'"]),
    (
        "skip-limit-negative",
        merged(lift_max_consecutive_skipped_steps=-1),
        [],
        ["lift.max_consecutive_skipped_steps: must be an integer >= 0"],
    ),
    ("lift-not-object", {**BASE, "lift": ["torch"]}, [], ["lift: must be a JSON object"]),
    (
        "micro-batch-zero",
        merged(train_micro_batch_size_per_gpu=0),
        [],
        ["train_micro_batch_size_per_gpu: must be an integer >= 1"],
    ),
    (
        "micro-batch-string",
        merged(train_micro_batch_size_per_gpu="four"),
        [],
        ["train_micro_batch_size_per_gpu", "'four'"],
    ),
    (
        "batch-does-not-multiply",
        merged(train_batch_size=7, gradient_accumulation_steps=2),
        [],
        ["train_batch_size: 7 != train_micro_batch_size_per_gpu (2) x gradient_accumulation_steps (2)"],
    ),
    (
        "batch-not-a-multiple",
        merged(train_batch_size=5),
        [],
        ["train_batch_size: 5 is not a multiple of train_micro_batch_size_per_gpu (2)"],
    ),
    (
        "accumulation-zero",
        merged(gradient_accumulation_steps=0),
        [],
        ["gradient_accumulation_steps: must be an integer >= 1"],
    ),
    ("clipping-negative", merged(gradient_clipping=-1), [], ["gradient_clipping: must be a number >= 0"]),
    ("bf16-and-fp16", merged(bf16={"enabled": True}, fp16={"enabled": True}), [], ["only one of the two may be true"]),
    (
        "fp16-on-torch-backend",
        merged(fp16={"enabled": True}),
        [],
        ["fp16.enabled: the torch reference backend has no loss scaler"],
    ),
    ("precision-not-object", merged(bf16=True), [], ['bf16: must be an object like {"enabled": true}']),
    (
        "optimizer-unknown-type",
        merged(optimizer={"type": "Adamax2", "params": {"lr": 1e-3}}),
        [],
        ["optimizer.type: 'Adamax2'", "Adam, AdamW, AdamW8bit, SGD"],
    ),
    (
        "optimizer-unknown-param",
        merged(optimizer={"type": "AdamW", "params": {"lr": 1e-3, "momentum": 0.9}}),
        [],
        ["optimizer.params.momentum: not a parameter of AdamW"],
    ),
    (
        "optimizer-lr-negative",
        merged(optimizer={"type": "AdamW", "params": {"lr": -1}}),
        [],
        ["optimizer.params.lr: must be a number > 0, got -1"],
    ),
    (
        "optimizer-no-type",
        merged(optimizer={"params": {"lr": 1e-3}}),
        [],
        ['optimizer: must be an object with a string "type"'],
    ),
    (
        "optimizer-auto-outside-trainer",
        merged(optimizer={"type": "AdamW", "params": {"lr": 1e-3, "betas": "auto"}}),
        [],
        ['optimizer.params.betas: "auto" is filled in only by a Hugging Face Trainer'],
    ),
    (
        "scheduler-unknown",
        merged(scheduler={"type": "Cosine", "params": {}}),
        [],
        ["scheduler.type: 'Cosine' unknown", "WarmupLR"],
    ),
    (
        "scheduler-bad-param",
        merged(scheduler={"type": "WarmupLR", "params": {"warmup_steps": 2, "decay": 1}}),
        [],
        ["scheduler.params.decay: not a parameter of WarmupLR", "scheduler.params.warmup_steps", "warmup_num_steps"],
    ),
    (
        "zero-stage-4",
        merged(lift_backend="deepspeed", zero_optimization={"stage": 4}),
        [],
        ["zero_optimization.stage: got 4; allowed: 0, 1, 2, 3"],
    ),
    (
        "zero-not-object",
        merged(lift_backend="deepspeed", zero_optimization=3),
        [],
        ["zero_optimization: must be an object"],
    ),
    (
        "offload-bad-device",
        merged(lift_backend="deepspeed", zero_optimization={"stage": 2, "offload_optimizer": {"device": "disk"}}),
        [],
        ["zero_optimization.offload_optimizer.device: got 'disk'; allowed: none, cpu, nvme"],
    ),
    (
        "offload-nvme-no-path",
        merged(lift_backend="deepspeed", zero_optimization={"stage": 3, "offload_optimizer": {"device": "nvme"}}),
        [],
        ["offload_optimizer.nvme_path: required"],
    ),
    (
        "offload-param-stage-2",
        merged(lift_backend="deepspeed", zero_optimization={"stage": 2, "offload_param": {"device": "cpu"}}),
        [],
        ["zero_optimization.offload_param: only ZeRO stage 3"],
    ),
    (
        "offload-with-sgd",
        merged(
            lift_backend="deepspeed",
            optimizer={"type": "SGD", "params": {"lr": 0.1}},
            zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}},
        ),
        [],
        ["offload_optimizer", "SGD", "Adam, AdamW"],
    ),
    (
        "fsdp-with-zero-stage",
        merged(lift_backend="fsdp", zero_optimization={"stage": 3}),
        [],
        ['zero_optimization.stage: 3 is a DeepSpeed ZeRO stage; backend "fsdp"'],
    ),
    (
        "fsdp-with-fp16",
        merged(lift_backend="fsdp", fp16={"enabled": True}),
        [],
        ['fp16.enabled: backend "fsdp" has no loss scaler'],
    ),
    (
        "fsdp-unknown-key",
        merged(lift_backend="fsdp", fsdp={"shard_grad_op": True}),
        [],
        ["fsdp.shard_grad_op: unknown key; allowed: cpu_offload, reshard_after_forward"],
    ),
    (
        "fsdp-section-wrong-backend",
        merged(fsdp={"cpu_offload": True}),
        [],
        ['fsdp: this section only applies to lift.backend "fsdp"'],
    ),
    ("top-level-list", ["not", "an", "object"], [], ["top level must be a JSON object"]),
    # a section the chosen backend cannot honour is an error on every backend, not silently ignored
    (
        "torch-backend-with-zero",
        merged(zero_optimization={"stage": 7}),
        [],
        ["zero_optimization: {'stage': 7} is DeepSpeed ZeRO", "single-process torch backend cannot honour"],
    ),
    (
        "deepspeed-with-fsdp-section",
        merged(lift_backend="deepspeed", fsdp={"cpu_offload": True}),
        [],
        ['fsdp: this section only applies to lift.backend "fsdp" (the backend is "deepspeed")'],
    ),
    (
        "auto-with-both-sections",
        {**merged(zero_optimization={"stage": 2}, fsdp={}), "lift": {}},
        [],
        ['lift.backend: "auto" cannot choose', "set lift.backend"],
    ),
    # values that passed the old checks and then crashed inside torch / DeepSpeed or trained silently wrong
    (
        "weight-decay-infinity",
        merged(optimizer=ADAMW(weight_decay=float("inf"))),
        [],
        ["optimizer.params.weight_decay: Infinity is not a finite number"],
    ),
    (
        "weight-decay-nan",
        merged(optimizer=ADAMW(weight_decay=float("nan"))),
        [],
        ["optimizer.params.weight_decay: NaN is not a finite number"],
    ),
    (
        "weight-decay-negative",
        merged(optimizer=ADAMW(weight_decay=-0.1)),
        [],
        ["optimizer.params.weight_decay: must be a finite number >= 0, got -0.1"],
    ),
    (
        "betas-wrong-length",
        merged(optimizer=ADAMW(betas=[0.9])),
        [],
        ["optimizer.params.betas: must be a list of two numbers in [0, 1)", "[0.9]"],
    ),
    ("betas-out-of-range", merged(optimizer=ADAMW(betas=[0.9, 1.0])), [], ["optimizer.params.betas", "[0.9, 1.0]"]),
    (
        "eps-not-a-number",
        merged(optimizer=ADAMW(eps="small")),
        [],
        ["optimizer.params.eps: must be a finite number >= 0, got 'small'"],
    ),
    ("eps-zero", merged(optimizer=ADAMW(eps=0)), [], ["optimizer.params.eps: eps 0 turns a zero gradient", "into NaN"]),
    (
        "sgd-nesterov-without-momentum",
        merged(optimizer={"type": "SGD", "params": {"lr": 0.1, "nesterov": True}}),
        [],
        ["optimizer.params.nesterov: the optimizer refuses it", "Nesterov momentum requires a momentum"],
    ),
    (
        "warmup-max-lr-nan",
        merged(scheduler={"type": "WarmupLR", "params": {"warmup_max_lr": float("nan"), "warmup_num_steps": 2}}),
        [],
        ["scheduler.params.warmup_max_lr: NaN is not a finite number"],
    ),
    (
        "warmup-negative",
        merged(scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": -5}}),
        [],
        ["scheduler.params.warmup_num_steps: must be an integer >= 0, got -5"],
    ),
    (
        "total-num-steps-zero",
        merged(scheduler={"type": "WarmupDecayLR", "params": {"total_num_steps": 0}}),
        [],
        ["scheduler.params.total_num_steps: must be >= 1, got 0"],
    ),
    (
        "total-num-steps-below-run",
        merged(scheduler={"type": "WarmupDecayLR", "params": {"total_num_steps": 4, "warmup_num_steps": 1}}),
        [],
        ["scheduler.params.total_num_steps: 4 is below the run's 8 optimizer steps", "steps 5..8"],
    ),
    (
        "zero-key-deepspeed-rejects",
        merged(lift_backend="deepspeed", zero_optimization={"stage": 2, "overlap_com": True}),
        [],
        ['zero_optimization.overlap_com: unknown key (did you mean "overlap_comm"?)', "DeepSpeedZeroConfig"],
    ),
    (
        "zero-value-deepspeed-rejects",
        merged(lift_backend="deepspeed", zero_optimization={"stage": 2, "reduce_bucket_size": "big"}),
        [],
        ["zero_optimization.reduce_bucket_size: Input should be a valid integer", "'big'"],
    ),
    ("bf16-enabled-yes", merged(bf16={"enabled": "yes"}), [], ["bf16.enabled: must be true or false, got 'yes'"]),
    (
        "fp16-enabled-number",
        merged(lift_backend="deepspeed", fp16={"enabled": 1}),
        [],
        ["fp16.enabled: must be true or false, got 1"],
    ),
    (
        "bf16-misspelled-enable",
        merged(bf16={"enable": True}),
        [],
        ['bf16.enable: unknown key (did you mean "enabled"?)'],
    ),
    (
        "misspelled-top-level-key",
        merged(gradient_cliping=0.5),
        [],
        ['gradient_cliping: unknown top-level key; did you mean "gradient_clipping"?'],
    ),
    (
        "misspelled-batch-key",
        merged(train_micro_batch_size_per_gp=4),
        [],
        ['did you mean "train_micro_batch_size_per_gpu"?'],
    ),
    ("nested-too-deep", merged(wandb=NESTED(40)), [], ["nested more than 32 levels deep"]),
    (
        "optimizer-bool-as-string",
        merged(optimizer=ADAMW(maximize="yes")),
        [],
        ["optimizer.params.maximize: must be true or false, got 'yes'"],
    ),
    (
        "warmup-type-unknown",
        merged(scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 2, "warmup_type": "cosine"}}),
        [],
        ["scheduler.params.warmup_type: got 'cosine'; allowed: log, linear"],
    ),
    ("lift-seed-negative", merged(lift_seed=-1), [], ["lift.seed: must be an integer >= 0"]),
    (
        "total-steps-huge",
        merged(lift_total_steps=10**9),
        ["--max_steps", None],
        ["lift.total_steps: must be an integer >= 1 and <= 10000000"],
    ),
]

CLI_CASES = [
    ("data-missing", ["--data", "/nonexistent/train.jsonl"], ["--data", "does not exist"]),
    ("eval-data-missing", ["--eval_data", "/nonexistent/eval.jsonl"], ["--eval_data", "does not exist"]),
    ("model-missing", ["--model", "/nonexistent/model"], ["--model: directory '/nonexistent/model' does not exist"]),
    ("config-missing", ["--ds_config", "/nonexistent.json"], ["--ds_config: file '/nonexistent.json' does not exist"]),
    ("config-invalid-json", ["--ds_config", "{d}/broken.json"], ["not valid JSON at line 1"]),
    # a flag that sets a config key is checked once, by the key's declaration, which names the flag
    (
        "max-steps-zero",
        ["--max_steps", "0"],
        ["lift.total_steps: must be an integer >= 1", "got 0 [set by --max_steps]"],
    ),
    (
        "max-steps-below-blocks",
        ["--max_steps", "3"],
        ["--max_steps: 3 is below the 4 candidate blocks", "--layer_range"],
    ),
    ("layer-range-not-ints", ["--layer_range", "a,b"], ["--layer_range: expected two integers like 6,8, got 'a,b'"]),
    ("lr-zero", ["--lr", "0"], ["optimizer.params.lr: must be a number > 0, got 0.0 [set by --lr]"]),
    ("lr-negative", ["--lr", "-1"], ["optimizer.params.lr: must be a number > 0, got -1.0 [set by --lr]"]),
    ("lr-nan", ["--lr", "nan"], ["optimizer.params.lr: nan is not a finite number", "[set by --lr]"]),
    ("seq-len-zero", ["--seq_len", "0"], ["--seq_len: must be >= 1, got 0"]),
    (
        "micro-batch-flag-zero",
        ["--micro_batch_size", "0"],
        ["train_micro_batch_size_per_gpu: must be an integer >= 1", "got 0 [set by --micro_batch_size]"],
    ),
    (
        "accumulation-flag-negative",
        ["--gradient_accumulation_steps", "-2"],
        ["gradient_accumulation_steps: must be an integer >= 1", "got -2 [set by --gradient_accumulation_steps]"],
    ),
    ("save-every-negative", ["--save_every", "-1"], ["--save_every: must be >= 0, got -1"]),
    (
        "no-checkpoint-save-every",
        ["--no_checkpoint", None, "--save_every", "4"],
        ["--no_checkpoint: contradicts --save_every 4"],
    ),
    ("no-checkpoint-resume", ["--no_checkpoint", None, "--resume", None], ["--no_checkpoint: contradicts --resume"]),
    ("keep-negative", ["--keep_checkpoints", "-2"], ["--keep_checkpoints: must be >= 0, got -2"]),
    ("schedule-flag", ["--schedule", "backwards"], ["lift.schedule: got 'backwards'"]),
    (
        "classifier-head-text",
        ["--format", "text", "--classifier_head", None],
        ["--classifier_head: needs --format classification"],
    ),
    (
        "classifier-head-lora",
        ["--baseline", "lora", "--classifier_head", None],
        ["--classifier_head: not supported with --baseline lora"],
    ),
    ("lora-zero3", ["--baseline", "lora", "--ds_config", "{d}/zero3.json"], ["--baseline lora: use a ZeRO-1/2 config"]),
    ("data-without-model", ["--model", None], ["--model: required when --data is given"]),
    (
        "auto-steps-without-max-steps",
        ["--max_steps", None, "--ds_config", "{d}/auto.json"],
        ['--max_steps: required (the config\'s lift.total_steps is "auto")'],
    ),
    (
        "no-steps-without-max-steps",
        ["--max_steps", None],
        ['--max_steps: required (the config\'s lift.total_steps is "auto")'],
    ),
    ("format-unknown", ["--format", "csv"], ["--format", "invalid choice"]),
    ("method-unknown", ["--method", "sgd"], ["--method", "invalid choice"]),
    (
        "method-full-old-spelling",
        ["--method", "full"],
        ["--method: 'full' is a baseline, not a lift.method; use --baseline full"],
    ),
    ("baseline-unknown", ["--baseline", "qlora"], ["--baseline", "invalid choice"]),
    (
        "baseline-and-method",
        ["--baseline", "full", "--method", "badam"],
        ["--baseline: full trains instead of a layer-wise method, but --method badam"],
    ),
    (
        "baseline-and-config-method",
        ["--baseline", "lora", "--set", "lift.method=lisa"],
        ["--baseline: lora is a baseline, but the config's lift.method is 'lisa'"],
    ),
    ("max-steps-not-int", ["--max_steps", "ten"], ["--max_steps", "invalid int value"]),
    (
        "config-is-a-directory",
        ["--ds_config", "{d}"],
        ["--ds_config: ", "is a directory; give the path of a DeepSpeed JSON file"],
    ),
    ("set-without-equals", ["--set", "lift.seed"], ["--set: 'lift.seed' must be KEY=VALUE"]),
    ("set-bad-value", ["--set", "lift.policy=sideways"], ["lift.policy: got 'sideways'", "[set by --set lift.policy]"]),
    (
        "set-nan",
        ["--set", "optimizer.params.weight_decay=NaN"],
        ["optimizer.params.weight_decay: nan is not a finite number", "[set by --set"],
    ),
    ("eval-batch-size-zero", ["--eval_batch_size", "0"], ["--eval_batch_size: must be >= 1, got 0"]),
    ("eval-batch-size-negative", ["--eval_batch_size", "-4"], ["--eval_batch_size: must be >= 1, got -4"]),
    ("seed-beyond-64-bits", ["--seed", str(2**70)], ["--seed: must be an integer in [0, 2**32)", str(2**70)]),
    ("seed-negative", ["--seed", "-1"], ["--seed: must be an integer in [0, 2**32), got -1"]),
    (
        "max-steps-huge",
        ["--max_steps", str(10**11)],
        ["lift.total_steps: must be an integer >= 1 and <= 10000000", "got 100000000000 [set by --max_steps]"],
    ),
    ("data-is-a-directory", ["--data", "{d}"], ["--data: ", "is a directory; give a file"]),
    (
        "output-dir-is-a-file",
        ["--output_dir", "{d}/train.jsonl"],
        ["--output_dir: ", "train.jsonl' is a file, not a directory"],
    ),
    (
        "output-dir-under-a-file",
        ["--output_dir", "{d}/train.jsonl/run"],
        ["--output_dir: ", "lies under", "train.jsonl', which is a file"],
    ),
    (
        "output-dir-not-empty",
        ["--output_dir", "{d}/used"],
        ["--output_dir: ", "is not empty (metrics.jsonl)", "--resume", "--overwrite_output_dir"],
    ),
    (
        "overwrite-and-resume",
        ["--overwrite_output_dir", None, "--resume", None],
        ["--overwrite_output_dir: contradicts --resume"],
    ),
    ("model-without-config", ["--model", "{d}/no_config"], ["--model: ", "no_config' has no config.json"]),
    (
        "model-invalid-config",
        ["--model", "{d}/bad_config"],
        ["--model: ", "bad_config/config.json is not a valid config.json"],
    ),
    (
        "model-unknown-architecture",
        ["--model", "{d}/unknown_arch"],
        ["--model: transformers cannot read", "unknown_arch/config.json", "nonexistent_arch"],
    ),
    (
        "model-unsupported-architecture",
        ["--model", "{d}/vision_arch"],
        ["--model: transformers cannot build a model from", "vision_arch"],
    ),
    (
        "model-without-weights",
        ["--model", "{d}/no_weights"],
        ["--model: ", "no_weights' has no weights (*.safetensors)", "--random_init"],
    ),
    (
        "model-shard-missing",
        ["--model", "{d}/missing_shard"],
        ["--model: model.safetensors.index.json names shard(s) model-00002-of-00002.safetensors"],
    ),
    (
        "heads-do-not-divide-hidden",
        ["--model", "{d}/bad_heads", "--random_init", None],
        [
            "--model: transformers cannot read",
            "hidden size (30) is not a multiple of the number of attention heads (4)",
        ],
    ),
    (
        "kv-heads-do-not-divide",
        ["--model", "{d}/bad_kv", "--random_init", None],
        ["num_attention_heads 4 is not divisible by num_key_value_heads 3"],
    ),
    (
        "tokenizer-missing",
        ["--tokenizer", "/nonexistent/tok"],
        ["--tokenizer: directory '/nonexistent/tok' does not exist"],
    ),
    ("tokenizer-empty-directory", ["--tokenizer", "{d}/empty"], ["--tokenizer: ", "empty' holds no tokenizer files"]),
    (
        "model-without-tokenizer",
        ["--model", "{d}/no_tokenizer"],
        ["--model (its tokenizer; or give --tokenizer): ", "holds no tokenizer files"],
    ),
    (
        "tokenizer-larger-than-vocab",
        ["--model", "{d}/small_vocab", "--tokenizer", "{d}/model"],
        ["--tokenizer: the data has token ids up to", "the model's embedding has 40 rows"],
    ),
    (
        "sequences-past-learned-positions",
        ["--model", "{d}/short_positions", "--seq_len", "32"],
        ["--seq_len: sequences of up to", "but the model has 8 learned positions; set --seq_len 8"],
    ),
    (
        "model-is-a-file",
        ["--model", "{d}/train.jsonl"],
        ["--model: ", "train.jsonl' is a file; give the model's directory"],
    ),
    (
        "global-batch-larger-than-data",
        ["--micro_batch_size", "64"],
        ["--micro_batch_size: 16 training examples are fewer than one global batch (64 x 1"],
    ),
    (
        "block-store-dir-is-a-file",
        ["--frozen_weights", "nf4", "--block_store", "disk", "--block_store_dir", "{d}/train.jsonl"],
        ["--block_store_dir: ", "train.jsonl' is a file, not a directory"],
    ),
    (
        "hub-id-not-reachable",
        ["--model", "nobody-here/no-such-model"],
        [
            "--model: 'nobody-here/no-such-model' is not a local directory",
            "HF_HUB_OFFLINE is set, so only the local cache was searched",
        ],
    ),
]

DATA_CASES = [
    ("empty-file", "", ["empty.jsonl: no records (the file is empty)"]),
    (
        "invalid-json-line-3",
        '{"text": "a", "label": "positive"}\n{"text": "b", "label": "negative"}\n{"text": "c", "label": \n',
        ["data.jsonl:3: invalid JSON"],
    ),
    (
        "missing-field",
        '{"text": "a", "label": "positive"}\n{"review": "b", "label": "negative"}\n',
        ["data.jsonl:2: missing field 'text' or 'sentence'"],
    ),
    ("missing-label", '{"text": "a"}\n', ["data.jsonl:1: missing field 'label'"]),
    (
        "label-not-in-set",
        '{"text": "a", "label": "positive"}\n{"text": "b", "label": "neutral"}\n',
        ["data.jsonl:2: label 'neutral' is not in the label set ['positive', 'negative']"],
    ),
    (
        "not-an-object",
        '{"text": "a", "label": "positive"}\n["b", "negative"]\n',
        ["data.jsonl:2: expected a JSON object, got list"],
    ),
    ("wrong-type", '{"text": 5, "label": "positive"}\n', ["data.jsonl:1: field 'text' must be str, got int"]),
    (
        "non-utf8",
        b'{"text": "a", "label": "positive"}\n{"text": "caf\xe9", "label": "negative"}\n',
        ["data.jsonl:2: not UTF-8", "re-encode"],
    ),
]


def _model_dirs(d):
    """Model directories that are each wrong in one way (copies of the good one, config edited)."""
    import shutil

    good = json.loads((d / "model" / "config.json").read_text())

    def variant(name, config=None, drop=(), text=None):
        shutil.copytree(d / "model", d / name)
        for f in drop:
            (d / name / f).unlink()
        if text is not None:
            (d / name / "config.json").write_text(text)
        elif config is not None:
            (d / name / "config.json").write_text(json.dumps({**good, **config}))

    variant("no_config", drop=["config.json"])
    variant("bad_config", text='{"model_type": "llama",')
    variant("unknown_arch", {"model_type": "nonexistent_arch"})
    variant("vision_arch", {"model_type": "vit"})
    variant("no_weights", drop=["model.safetensors"])
    variant("bad_heads", {"hidden_size": 30})
    variant("bad_kv", {"num_key_value_heads": 3})
    variant("small_vocab", {"vocab_size": 40})
    variant("no_tokenizer", drop=[p.name for p in (d / "model").iterdir() if "token" in p.name])
    variant("missing_shard")
    (d / "missing_shard" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    (d / "missing_shard" / "model.safetensors").rename(d / "missing_shard" / "model-00001-of-00002.safetensors")
    from transformers import GPT2Config, GPT2LMHeadModel

    shutil.copytree(d / "model", d / "short_positions")
    GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(json.loads((d / "model" / "tokenizer.json").read_text())["model"]["vocab"]) + 2,
            n_positions=8,
            n_embd=16,
            n_layer=2,
            n_head=2,
        )
    ).save_pretrained(d / "short_positions")
    (d / "empty").mkdir()
    (d / "used").mkdir()
    (d / "used" / "metrics.jsonl").write_text("{}\n")


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    make_model_dir(d / "model", layers=4)
    _model_dirs(d)
    write_sentiment(d / "train.jsonl", 16)
    (d / "ok.json").write_text(json.dumps(BASE))
    (d / "broken.json").write_text('{"lift": {"backend": "torch",}}')
    (d / "zero3.json").write_text(json.dumps(merged(lift_backend="deepspeed", zero_optimization={"stage": 3})))
    (d / "auto.json").write_text(json.dumps(merged(lift_total_steps="auto")))
    return d


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


def run_main(d, argv_changes, capsys):
    base = {
        "--model": str(d / "model"),
        "--data": str(d / "train.jsonl"),
        "--format": "classification",
        "--ds_config": str(d / "ok.json"),
        "--max_steps": "8",
        "--output_dir": str(d / "out"),
    }
    flags = []
    for k, v in zip(argv_changes[::2], argv_changes[1::2]):
        v = v.replace("{d}", str(d)) if isinstance(v, str) else v
        if k in base and v is None:
            del base[k]
        elif v is None:
            flags.append(k)
        else:
            base[k] = v
    argv = [x for kv in base.items() for x in kv] + flags
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    return code, err


def check(code, err, needles):
    assert code == 2, err[-3000:]
    for n in needles:
        assert n in err, (n, err[-3000:])
    assert "Traceback" not in err
    assert not dist.is_initialized(), "a process group was started before the error"
    message = err[err.rfind("error:") :]
    assert len(message) < 2500, message  # one paragraph, not a dump


@pytest.mark.parametrize("name,cfg,argv,needles", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config(d, capsys, name, cfg, argv, needles):
    path = d / f"{name}.json"
    path.write_text(json.dumps(cfg))
    code, err = run_main(d, ["--ds_config", str(path), *argv], capsys)
    check(code, err, needles)


@pytest.mark.parametrize("name,argv,needles", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_command_line(d, capsys, name, argv, needles):
    code, err = run_main(d, argv, capsys)
    check(code, err, needles)


@pytest.mark.parametrize("name,content,needles", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data(d, capsys, name, content, needles):
    path = d / ("empty.jsonl" if name == "empty-file" else "data.jsonl")
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    extra = ["--labels", "positive,negative"] if name == "label-not-in-set" else []
    code, err = run_main(d, ["--data", str(path), *extra], capsys)
    check(code, err, needles)


def test_too_long_with_no_truncate_names_file_and_line(d, capsys):
    path = d / "long.jsonl"
    path.write_text(
        json.dumps({"text": "short", "label": "positive"})
        + "\n"
        + json.dumps({"text": "great acting " * 80, "label": "negative"})
        + "\n"
    )
    code, err = run_main(d, ["--data", str(path), "--seq_len", "32", "--no_truncate", None], capsys)
    check(code, err, ["long.jsonl:2:", "tokens > --seq_len 32", "drop --no_truncate"])


def test_model_without_blocks_fails_before_a_process_group():
    """lift_ds.initialize with backend deepspeed on a model LIFT cannot split: a ConfigError, no process group."""
    from torch import nn

    import lift_ds
    from lift_ds.errors import ConfigError

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    cfg = merged(lift_backend="deepspeed", lift_total_steps=4, zero_optimization={"stage": 2})
    with pytest.raises(ConfigError, match="no layer stack found in Sequential"):
        lift_ds.initialize(model=model, config=cfg)
    assert not dist.is_initialized()


def test_offload_without_a_buildable_op_falls_back_to_torch(monkeypatch):
    """No pre-built cpu_adam and no compiler: torch's AdamW runs over the offloaded CPU partitions
    (DeepSpeed allows it with zero_force_ds_cpu_optimizer false), said in one line; no failed compile."""
    import shutil

    import torch

    from lift_ds.backends.ops import choose_optimizer

    monkeypatch.setattr(shutil, "which", lambda cmd: None)
    choice = choose_optimizer({"type": "AdamW", "params": {"lr": 1e-3}}, "cpu", offload=True)
    assert choice.factory is not None and choice.config == {"zero_force_ds_cpu_optimizer": False}
    assert (
        "runs as torch.optim.AdamW over the offloaded CPU partitions" in choice.message
        and "a C++ compiler not found" in choice.message
    )
    assert isinstance(choice.factory([torch.nn.Parameter(torch.zeros(2))]), torch.optim.AdamW)


def test_fused_adam_on_a_gpu_without_the_op_uses_torch_fused(monkeypatch):
    """On CUDA, DeepSpeed's FusedAdam only where it is pre-built: never a JIT build, not even where
    DeepSpeed's builder says it could compile (nvcc and ninja there); otherwise torch.optim.AdamW(fused=True)."""
    from lift_ds.backends import compat, ops

    monkeypatch.setattr(compat, "installed_op", lambda name: False)
    monkeypatch.setattr(ops, "_tools", lambda cuda: ["nvcc"])
    choice = ops.choose_optimizer({"type": "Adam", "params": {"lr": 1e-3}}, "cuda", offload=False)
    assert choice.factory is not None and "runs as torch.optim.AdamW(fused=True)" in choice.message
    real_status = ops.op_status
    monkeypatch.setattr(ops, "op_status", lambda op: ("buildable", f"{op} compiles on first use"))
    choice = ops.choose_optimizer({"type": "Adam", "params": {"lr": 1e-3}}, "cuda", offload=False)
    assert (
        choice.factory is not None
        and "runs as torch.optim.AdamW(fused=True)" in choice.message
        and "does not compile" in choice.message
    )
    # with optimizer offload a buildable cpu_adam is still compiled (once): torch's CPU AdamW is much slower
    choice = ops.choose_optimizer({"type": "Adam", "params": {"lr": 1e-3}}, "cuda", offload=True)
    assert choice.factory is None and "DeepSpeed's cpu_adam" in choice.message
    monkeypatch.setattr(ops, "op_status", real_status)
    monkeypatch.setattr(compat, "installed_op", lambda name: True)
    choice = ops.choose_optimizer({"type": "Adam", "params": {"lr": 1e-3}}, "cuda", offload=False)
    assert (
        choice.factory is None
        and "DeepSpeed's fused_adam (DeepSpeed was installed with fused_adam built)" in choice.message
    )


def test_at_least_forty_distinct_refusals(d, capsys):
    """Runs every case (not a count of literals): each is refused with exit 2 before any process
    group, and at least forty different messages come out."""
    messages = set()
    for name, cfg, argv, needles in CONFIG_CASES:
        (d / f"{name}.json").write_text(json.dumps(cfg))
        code, err = run_main(d, ["--ds_config", str(d / f"{name}.json"), *argv], capsys)
        check(code, err, needles)
        messages.add(err[err.rfind("error:") :].strip())
    for _name, argv, needles in CLI_CASES:
        code, err = run_main(d, argv, capsys)
        check(code, err, needles)
        messages.add(err[err.rfind("error:") :].strip())
    for name, content, needles in DATA_CASES:
        path = d / ("empty.jsonl" if name == "empty-file" else "data.jsonl")
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        code, err = run_main(
            d, ["--data", str(path), *(["--labels", "positive,negative"] if name == "label-not-in-set" else [])], capsys
        )
        check(code, err, needles)
        messages.add(err[err.rfind("error:") :].strip())
    assert len(messages) >= 90, len(messages)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_precision_the_accelerator_cannot_run_is_refused_up_front(d, capsys, monkeypatch, dtype):
    """Make DeepSpeed's accelerator report no support (so this runs on machines that have it too):
    exit 2 naming the key, the hardware fact and what to use instead; lift_ds.initialize raises
    ConfigError; no process group, no DeepSpeed traceback."""
    from deepspeed.accelerator import get_accelerator

    import lift_ds
    from lift_ds.errors import ConfigError

    monkeypatch.setattr(type(get_accelerator()), f"is_{dtype}_supported", lambda self: False)
    cfg = merged(lift_backend="deepspeed", zero_optimization={"stage": 2}, **{dtype: {"enabled": True}})
    path = d / f"{dtype}.json"
    path.write_text(json.dumps(cfg))
    code, err = run_main(d, ["--ds_config", str(path)], capsys)
    other = {"fp16": "bf16", "bf16": "fp16"}[dtype]
    check(
        code,
        err,
        [
            f"{dtype}.enabled: true, but this machine cannot train in {dtype}",
            f"accelerator reports is_{dtype}_supported() = False",
            "to train in fp32",
        ],
    )
    if dtype == "bf16" and get_accelerator().is_fp16_supported():
        assert f'or use "{other}"' in err
    with pytest.raises(ConfigError, match=f"is_{dtype}_supported\\(\\) = False"):
        lift_ds.initialize(model=tiny_llama(), config={**cfg, "lift": {**cfg["lift"], "total_steps": 4}})
    assert not dist.is_initialized()


def test_bf16_where_the_gpu_has_none_is_refused_for_torch_backends(monkeypatch):
    """The torch and FSDP backends ask torch: a CUDA device without bf16 (pre-Ampere) is refused."""
    import torch

    from lift_ds.backends import hardware

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    for backend in ("torch", "fsdp"):
        (problem,) = hardware.precision_problems(backend, "bf16")
        assert problem.startswith("bf16.enabled: true, but this machine cannot train in bf16")
        assert "Tesla V100-SXM2-32GB (compute capability 7.0" in problem and "to train in fp32" in problem
    assert hardware.precision_problems("torch", "fp32") == []


@pytest.mark.parametrize(
    "name,text,needles",
    [
        (
            "duplicate-keys",
            '{"lift": {"backend": "torch", "schedule": "random", '
            '"schedule": "front2end"}, "train_micro_batch_size_per_gpu": 2, '
            '"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}',
            [
                "lift.schedule: the key appears more than once",
                "train_micro_batch_size_per_gpu: the key appears more than once",
                "DeepSpeed refuses duplicates",
            ],
        ),
        (
            "nan-literal",
            (
                '{"lift": {"backend": "torch"}, "optimizer": {"type": '
                '"AdamW", "params": {"lr": NaN, "weight_decay": -Infinity}}}'
            ),
            [
                "optimizer.params.lr: NaN is not a finite number",
                "optimizer.params.weight_decay: -Infinity is not a finite number",
            ],
        ),
        (
            "recursion-deep",
            '{"lift": {"backend": "torch"}, "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
            ["nested more than 32 levels deep"],
        ),
    ],
)
def test_json_that_plain_json_loads_accepts_is_refused(d, capsys, name, text, needles):
    """What json.loads lets through: duplicate keys (the last silently won), NaN/Infinity literals
    (a NaN model at exit 0), nesting past Python's recursion limit (a RecursionError traceback)."""
    path = d / f"{name}.json"
    path.write_text(text)
    code, err = run_main(d, ["--ds_config", str(path)], capsys)
    check(code, err, needles)


def test_the_python_api_refuses_bad_models_optimizers_and_schedules_with_config_errors():
    """lift_ds.initialize: a string for the model, a factory with a NaN or out-of-range argument, a
    schedule that gives NaN or cannot step: each a ConfigError naming the argument, no process group."""
    import torch

    import lift_ds
    from lift_ds.errors import ConfigError

    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "lift": {"backend": "deepspeed", "total_steps": 8},
        "zero_optimization": {"stage": 2},
    }
    adamw = lambda **kw: lambda ps: torch.optim.AdamW(ps, **{"lr": 1e-3, **kw})  # noqa: E731
    cases = [
        (dict(model="a string", optimizer=adamw()), "model: must be a torch.nn.Module, got str 'a string'"),
        (
            dict(optimizer=adamw(lr=float("nan"))),
            "optimizer: the optimizer refuses it: ValueError: Invalid learning rate: nan",
        ),
        (
            dict(optimizer=adamw(weight_decay=float("inf"))),
            "optimizer: parameter group 0 has weight_decay = inf; it must be finite",
        ),
        (dict(optimizer=adamw(betas=(0.9, 1.2))), "Invalid beta parameter at index 1: 1.2"),
        (dict(optimizer=adamw(eps=0.0)), "optimizer: eps 0 turns a zero gradient"),
        (dict(optimizer=lambda ps: torch.optim.SGD(ps, lr=-1)), "Invalid learning rate: -1"),
        (
            dict(
                optimizer=adamw(), lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: float("nan"))
            ),
            "lr_scheduler: the schedule gives a learning rate of nan at step 0",
        ),
        (
            dict(optimizer=adamw(), lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=0)),
            "lr_scheduler: building or stepping",
        ),
        (
            dict(
                optimizer=adamw(),
                config={**cfg, "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 4}}},
            ),
            "scheduler.params.total_num_steps: 4 is below the run's 8 optimizer steps",
        ),
        (
            dict(optimizer=adamw(), config={**cfg, "optimizer": {"type": "AdamW", "params": {"lr": float("nan")}}}),
            "optimizer.params.lr: nan is not a finite number",
        ),
    ]
    for kwargs, needle in cases:
        kwargs = {"model": tiny_llama(), "config": cfg, **kwargs}
        with pytest.raises(ConfigError) as info:
            lift_ds.initialize(**kwargs)
        assert needle in str(info.value), (needle, str(info.value))
        assert not dist.is_initialized()


def test_an_unwritable_or_full_output_directory_is_refused_before_anything_starts(d, capsys, monkeypatch):
    """As root a chmod does not stop writes, so the refusals are made to happen: a read-only file
    system (the write probe fails with EROFS), then a disk with 1 KiB free."""
    import errno
    import shutil
    import tempfile
    from collections import namedtuple

    real = tempfile.mkstemp

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    code, err = run_main(d, ["--output_dir", str(d / "ro" / "run")], capsys)
    check(code, err, ["--output_dir: cannot write in", "(Read-only file system); give a writable directory"])
    monkeypatch.setattr(tempfile, "mkstemp", real)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(2**40, 2**40 - 1024, 1024))
    code, err = run_main(d, ["--output_dir", str(d / "full")], capsys)
    check(
        code,
        err,
        ["--output_dir: ", "has 0.0 GiB free; this run writes about", "--no_checkpoint / --no_final_model write less"],
    )


def test_output_dir_emptiness_is_rank_zeros_question(tmp_path, monkeypatch):
    """Every rank runs the checks before any process group, each at its own pace: a rank must not
    refuse an output directory for what rank 0 has just written, or for another rank's write probe
    (seen: 2 ranks, rank 1 refused the directory for rank 0's probe file). Rank 0 still refuses a used one."""
    import argparse

    from lift_ds import preflight

    out = tmp_path / "run"
    out.mkdir()
    (out / f"{preflight.WRITE_PROBE}abc123").write_text("")  # another rank's probe, caught between write and unlink
    args = argparse.Namespace(output_dir=str(out), resume=False, overwrite_output_dir=False)
    monkeypatch.setenv("RANK", "0")
    assert preflight.output_dir_problems(args) == []
    (out / "metrics.jsonl").write_text("{}\n")  # what rank 0 writes once it runs
    monkeypatch.setenv("RANK", "1")
    assert preflight.output_dir_problems(args) == []
    monkeypatch.setenv("RANK", "0")
    assert "is not empty (metrics.jsonl)" in preflight.output_dir_problems(args)[0]
