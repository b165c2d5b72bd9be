#!/usr/bin/env python
"""A supervised fine-tuning loop in the shape of DeepSpeed-Chat's step 1 (``training/step1_supervised_finetuning/
main.py`` and its ``dschat`` utils, deepspeedai/DeepSpeedExamples), written here, with LIFT's one swap:
``lift_ds.initialize`` for ``deepspeed.initialize``. Its DeepSpeed config is built in code, so the
``"lift"`` section comes in a file given to DeepSpeed's own ``--deepspeed_config`` flag
(``deepspeed.add_config_arguments``), and the run's length from the built
``get_scheduler(..., num_training_steps=N)``, as with the real script.

Like DeepSpeed-Chat it initialises DeepSpeed's process group itself, builds its DeepSpeed config in code
(``bfloat16``/``fp16`` section, ``hybrid_engine``, ``tensorboard``), loads the model under ``HfDeepSpeedConfig``
for ZeRO-3, builds weight-decay / no-decay parameter groups by name, a built Adam optimizer and a built
``get_scheduler`` schedule, passes them with ``args`` and ``dist_init_required=True``, calls
``model.gradient_checkpointing_enable()`` on the engine, evaluates perplexity before and after each epoch
(``model.eval()``), trains with ``model(**batch, use_cache=False)`` / ``model.backward`` / ``model.step``,
prints throughput from ``model.model`` (the wrapped model's attributes through the engine), calls
``model.tput_timer.update_epoch_count()``, and saves: LoRA layers fused through ``model.named_modules()``,
``model.module.state_dict()`` in Hugging Face format, and ZeRO-3 parameters gathered one by one.

Test instrumentation (not in DeepSpeed-Chat): ``--csv_monitor DIR`` (a DeepSpeed ``csv_monitor`` section
beside its ``tensorboard`` one, which needs tensorboard), ``--record FILE`` (rank 0 writes losses, start and final
weights, and the weight decay and lr of every parameter in each step's optimizer), ``--stop_after N`` with
``--save_dir`` (save a checkpoint at step N and stop) and ``--resume_dir`` (load it and continue): the
DeepSpeed engine API a resumable loop of this shape uses.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import deepspeed
import torch
import torch._dynamo  # noqa: F401  (before any deepspeed.zero.Init)
from deepspeed.accelerator import get_accelerator
from deepspeed.ops.adam import DeepSpeedCPUAdam
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from transformers import AutoConfig, AutoModelForCausalLM, SchedulerType, default_data_collator, get_scheduler
from transformers.integrations.deepspeed import HfDeepSpeedConfig

import lift_ds

NO_DECAY = ("bias", "layer_norm.weight", "layernorm.weight", "norm.weight", "ln_f.weight")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="SFT in the shape of DeepSpeed-Chat step 1, with LIFT")
    p.add_argument("--data_path", required=True, help="JSONL of {'input_ids': [...]} rows of one length")
    p.add_argument("--model_name_or_path", required=True)
    p.add_argument("--per_device_train_batch_size", type=int, default=2)
    p.add_argument("--per_device_eval_batch_size", type=int, default=2)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--num_train_epochs", type=int, default=1)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--lr_scheduler_type", type=SchedulerType, default="cosine")
    p.add_argument("--num_warmup_steps", type=int, default=0)
    p.add_argument("--output_dir", default=None)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", -1)))
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--offload", action="store_true")
    p.add_argument("--dtype", default="fp32", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--zero_stage", type=int, default=0)
    p.add_argument("--enable_tensorboard", action="store_true")
    p.add_argument("--tensorboard_path", default="step1_tensorboard")
    p.add_argument("--print_loss", action="store_true")
    p.add_argument("--record", default=None)
    p.add_argument("--save_dir", default=None)
    p.add_argument("--stop_after", type=int, default=None)
    p.add_argument("--resume_dir", default=None)
    p.add_argument("--csv_monitor", default=None, help="a DeepSpeed csv_monitor section writing under this directory")
    p = deepspeed.add_config_arguments(p)
    return p.parse_args(argv)


def train_ds_config(args, world_size: int) -> dict:
    """The DeepSpeed config built in code, as DeepSpeed-Chat's get_train_ds_config does."""
    device = "cpu" if args.offload else "none"
    config = {
        "train_batch_size": args.per_device_train_batch_size * world_size * args.gradient_accumulation_steps,
        "train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
        "steps_per_print": 10,
        "zero_optimization": {
            "stage": args.zero_stage,
            "overlap_comm": False,
            "offload_param": {"device": device},
            "offload_optimizer": {"device": device},
            "stage3_param_persistence_threshold": 0,
            "stage3_max_live_parameters": 3e7,
            "stage3_prefetch_bucket_size": 3e7,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "gradient_clipping": 1.0,
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
        "hybrid_engine": {
            "enabled": False,
            "max_out_tokens": 512,
            "inference_tp_size": 1,
            "release_inference_cache": False,
            "pin_parameters": True,
            "tp_gather_partition_size": 8,
        },
        "tensorboard": {
            "enabled": args.enable_tensorboard,
            "output_path": f"{args.tensorboard_path}/ds_tensorboard_logs/",
            "job_name": "step1_model_tensorboard",
        },
    }
    if args.dtype == "bf16":
        config["bfloat16"] = {"enabled": True}
    elif args.dtype == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale_window": 100}
    if args.csv_monitor:
        config["csv_monitor"] = {"enabled": True, "output_path": args.csv_monitor, "job_name": "step1"}
    return config


class TokenDataset(Dataset):
    def __init__(self, path: str) -> None:
        with open(path) as f:
            self.rows = [json.loads(line)["input_ids"] for line in f if line.strip()]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        ids = torch.tensor(self.rows[i])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def grouped_parameters(model, weight_decay: float) -> list[dict]:
    """Weight decay for all but biases and norms, as get_optimizer_grouped_parameters does."""
    groups = [
        {
            "params": [
                p
                for n, p in model.named_parameters()
                if not any(nd in n.lower() for nd in NO_DECAY) and p.requires_grad
            ],
            "weight_decay": weight_decay,
        },
        {
            "params": [
                p for n, p in model.named_parameters() if any(nd in n.lower() for nd in NO_DECAY) and p.requires_grad
            ],
            "weight_decay": 0.0,
        },
    ]
    return [g for g in groups if g["params"]]


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t / torch.distributed.get_world_size()


def gathered(params):
    """ZeRO-3 parameters that are partitioned now (dschat's _z3_params_to_fetch)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return [p for p in params if hasattr(p, "ds_id") and p.ds_status == ZeroParamStatus.NOT_AVAILABLE]


def full_weights(module) -> dict:
    out = {}
    for n, p in module.named_parameters():
        if hasattr(p, "full_tensor"):  # lift.backend "fsdp": a DTensor shard
            out[n] = p.full_tensor().detach().float().cpu().clone()
            continue
        with deepspeed.zero.GatheredParameters(gathered([p]), enabled=hasattr(p, "ds_id")):
            out[n] = p.detach().float().cpu().clone()
    return out


def print_throughput(hf_model, args, seconds: float, rank: int) -> None:
    if rank > 0:
        return
    numel = sum(p.ds_numel if hasattr(p, "ds_tensor") else p.numel() for p in hf_model.parameters())
    cfg = hf_model.config
    factor = 4 if args.gradient_checkpointing else 3
    flops = 24 * factor * args.per_device_train_batch_size * cfg.num_hidden_layers * cfg.hidden_size**2
    print(
        f"Model Parameters: {numel / 1e9:.6f} B, Latency: {seconds:.3f}s, TFLOPs: {flops / seconds / 1e12:.6f}",
        flush=True,
    )


def phase_groups(engine) -> dict:
    """{parameter name: (weight_decay, lr)} of the optimizer DeepSpeed (or FSDP/torch) steps now."""
    names = {id(p): n for n, p in engine.module.named_parameters()}
    opt = engine.optimizer
    if opt is None:
        return {}
    # ZeRO-1/2, ZeRO-3: the model's params per group
    owners = getattr(opt, "bit16_groups", None) or getattr(opt, "fp16_groups", None)
    out = {}
    for i, g in enumerate(opt.param_groups):
        for p in owners[i] if owners is not None else g["params"]:
            if id(p) in names:
                out[names[id(p)]] = (g["weight_decay"], g["lr"])
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.local_rank == -1:
        device = torch.device(get_accelerator().device_name())
    else:
        get_accelerator().set_device(args.local_rank)
        device = torch.device(get_accelerator().device_name(), args.local_rank)
        deepspeed.init_distributed()
    args.global_rank = torch.distributed.get_rank()
    ds_config = train_ds_config(args, torch.distributed.get_world_size())
    torch.manual_seed(args.seed)
    torch.distributed.barrier()

    dschf = HfDeepSpeedConfig(ds_config) if args.zero_stage == 3 else None  # noqa: F841  (from_pretrained builds under zero.Init)
    model = AutoModelForCausalLM.from_pretrained(
        args.model_name_or_path, config=AutoConfig.from_pretrained(args.model_name_or_path)
    )
    model.config.use_cache = False
    start = full_weights(model) if args.record else None

    dataset = TokenDataset(args.data_path)
    n_eval = max(len(dataset) // 8, 2 * torch.distributed.get_world_size())
    train_dataset = torch.utils.data.Subset(dataset, range(n_eval, len(dataset)))
    eval_dataset = torch.utils.data.Subset(dataset, range(n_eval))
    train_sampler = DistributedSampler(train_dataset, seed=args.seed)
    train_dataloader = DataLoader(
        train_dataset,
        collate_fn=default_data_collator,
        sampler=train_sampler,
        batch_size=args.per_device_train_batch_size,
    )
    eval_dataloader = DataLoader(
        eval_dataset,
        collate_fn=default_data_collator,
        sampler=DistributedSampler(eval_dataset, shuffle=False),
        batch_size=args.per_device_eval_batch_size,
    )

    def evaluation(model, eval_dataloader):
        model.eval()
        losses = 0
        for step, batch in enumerate(eval_dataloader):  # noqa: B007 (DeepSpeed-Chat's loop, as written there)
            with torch.no_grad():
                losses += model(**to_device(batch, device)).loss.float()
        losses = all_reduce_mean(losses / (step + 1))
        return math.exp(losses.item()), losses.item()

    # DeepSpeed-Chat: DeepSpeedCPUAdam with --offload (FusedAdam otherwise; torch's AdamW here: no op to compile)
    AdamOptimizer = DeepSpeedCPUAdam if args.offload else torch.optim.AdamW
    optimizer = AdamOptimizer(grouped_parameters(model, args.weight_decay), lr=args.learning_rate, betas=(0.9, 0.95))
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    lr_scheduler = get_scheduler(
        name=args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.num_warmup_steps,
        num_training_steps=args.num_train_epochs * num_update_steps_per_epoch,
    )

    model, optimizer, _, lr_scheduler = lift_ds.initialize(  # was: deepspeed.initialize
        model=model,
        optimizer=optimizer,
        args=args,
        config=ds_config,
        lr_scheduler=lr_scheduler,
        dist_init_required=True,
    )
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if args.resume_dir:
        model.load_checkpoint(args.resume_dir)

    record = {"losses": [], "groups": [], "lrs": [], "eval": []}
    perplexity, eval_loss = evaluation(model, eval_dataloader)
    record["eval"].append(eval_loss)
    if args.global_rank == 0:
        print(f"ppl: {perplexity}, loss: {eval_loss}", flush=True)
    done = model.global_steps * args.gradient_accumulation_steps  # micro-batches a resumed run has already trained
    for epoch in range(args.num_train_epochs):
        model.train()
        train_sampler.set_epoch(epoch)
        for step, batch in enumerate(train_dataloader):
            if epoch * len(train_dataloader) + step < done:
                continue
            start_time = time.time()
            record["groups"].append(phase_groups(model))
            outputs = model(**to_device(batch, device), use_cache=False)
            loss = outputs.loss
            if args.print_loss:
                print(f"Epoch: {epoch}, Step: {step}, Rank: {torch.distributed.get_rank()}, loss = {loss}", flush=True)
            model.backward(loss)
            model.step()
            record["losses"].append(float(all_reduce_mean(loss.detach().clone())))
            record["lrs"].append(list(lr_scheduler.get_last_lr()))
            if torch.distributed.get_rank() == 0:
                print_throughput(model.model, args, time.time() - start_time, args.global_rank)
            if args.stop_after is not None and model.global_steps == args.stop_after:
                model.save_checkpoint(args.save_dir)
                return finish(args, model, start, record)
        perplexity, eval_loss = evaluation(model, eval_dataloader)
        record["eval"].append(eval_loss)
        if args.global_rank == 0:
            print(f"ppl: {perplexity}, loss: {eval_loss}", flush=True)
        model.tput_timer.update_epoch_count()

    if args.output_dir is not None:
        model = fuse_lora(model)
        if args.global_rank == 0:
            save_hf_format(model, args.output_dir)
        if args.zero_stage == 3:
            save_zero_three_model(model, args.global_rank, args.output_dir)
    return finish(args, model, start, record)


def fuse_lora(model):
    """convert_lora_to_linear_layer's walk: nothing to fuse here (no --lora_dim), but the walk runs."""
    fused = [name for name, module in model.named_modules() if type(module).__name__ == "LinearLayer_LoRA"]
    assert not fused
    return model


def save_hf_format(model, output_dir: str) -> None:
    model_to_save = model.module if hasattr(model, "module") else model
    os.makedirs(output_dir, exist_ok=True)
    torch.save(
        {k: v for k, v in model_to_save.state_dict().items() if "lora" not in k},
        os.path.join(output_dir, "pytorch_model.bin"),
    )
    model_to_save.config.to_json_file(os.path.join(output_dir, "config.json"))


def save_zero_three_model(model, global_rank: int, save_dir: str) -> None:
    model_to_save = model.module if hasattr(model, "module") else model
    state = {}
    for k, v in model_to_save.named_parameters():
        with deepspeed.zero.GatheredParameters(gathered([v]), enabled=hasattr(v, "ds_id")):
            value = v.data.cpu()
        if global_rank == 0 and "lora" not in k:
            state[k] = value
    if global_rank == 0:
        torch.save(state, os.path.join(save_dir, "pytorch_model.bin"))


def finish(args, model, start, record) -> int:
    if args.record:
        final = full_weights(model.module)
        if args.global_rank == 0:
            record.update(
                start=start,
                final=final,
                global_steps=model.global_steps,
                world_size=model.world_size,
                samples_per_sec=model.tput_timer.avg_samples_per_sec(),
                epochs=model.tput_timer.epoch_count,
            )
            torch.save(record, args.record)
    model.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
