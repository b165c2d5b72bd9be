#!/usr/bin/env python3
"""TRL supervised fine-tuning with LIFT: SmolLM2-135M-Instruct, 2 CPU ranks, a few minutes.

    torchrun --standalone --nproc_per_node 2 examples/trl_sft.py            # the built-in model and data
    deepspeed --num_gpus 2 examples/trl_sft.py --max_steps 60
    torchrun ... examples/trl_sft.py --model DIR --data my.jsonl           # "prompt"/"completion" or "messages" lines

The only changes from a plain TRL script: ``LiftSFTTrainer`` instead of ``trl.SFTTrainer``, and a
DeepSpeed config with a ``"lift"`` section (ds_configs/trainer_zero2.json: every value "auto", filled from
the SFTConfig). Without --data it writes prompt/completion lines from the built-in movie reviews
(``Review: ...\\nSentiment:`` -> `` positive`` / `` negative``). Writes OUTPUT_DIR/final (a Hugging Face
model) and OUTPUT_DIR/log_history.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch._dynamo  # noqa: E402,F401  (before any deepspeed.zero.Init)


def builtin_data(out: Path, limit: int) -> Path:
    """prompt/completion JSONL from the built-in movie-review sentiment data."""
    from lift_ds import assets
    from lift_ds.data import classification_prompt, read_jsonl

    train, _ = assets.movie_review_sentiment()
    rows = read_jsonl(train)[:limit]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        "".join(
            json.dumps({"prompt": classification_prompt(r["text"]), "completion": " " + r["label"]}) + "\n"
            for r in rows
        )
    )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF directory (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument(
        "--data", default=None, help="JSONL with prompt/completion (or messages) lines (default: built-in sentiment)"
    )
    p.add_argument("--ds_config", default=str(REPO / "ds_configs" / "trainer_zero2.json"))
    p.add_argument("--max_steps", type=int, default=60)
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--per_device_train_batch_size", type=int, default=4)
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument(
        "--layer_range", default=None, help="FIRST,LAST: train only these layers (default: the config's, all)"
    )
    p.add_argument("--output_dir", default="outputs/trl_sft")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = p.parse_args()

    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from lift_ds import assets
    from lift_ds.integrations.transformers import LiftSFTTrainer
    from lift_ds.run_config import read_config_file

    model_dir = args.model or str(assets.smollm2_135m())
    data = Path(args.data) if args.data else builtin_data(Path(args.output_dir) / "data" / "sft.jsonl", 2000)
    config, _ = read_config_file(args.ds_config)
    if args.layer_range:
        config["lift"]["layer_range"] = [int(x) for x in args.layer_range.split(",")]
    sft = SFTConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.per_device_train_batch_size,
        max_length=args.max_length,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        deepspeed=config,
        bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
    )
    trainer = LiftSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        args=sft,
        train_dataset=datasets.load_dataset("json", data_files=str(data), split="train"),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    trainer.train()
    trainer.save_model(str(Path(args.output_dir) / "final"))
    if trainer.lift_engine.rank == 0:
        (Path(args.output_dir) / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        print(f"training loss {losses[0]:.4f} -> {losses[-1]:.4f}; model in {Path(args.output_dir) / 'final'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
