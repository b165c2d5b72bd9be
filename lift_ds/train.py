"""The training loop behind launch/train.py: LIFT, full fine-tuning or LoRA on the same data."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from . import faults
from .cli import Launch, build_parser, check_model, resolve
from .errors import TRAINING_FAULT, ConfigError, LiftError
from .utils import get_logger

logger = get_logger("lift_ds.train")


class Run:
    """One training run: engine, data, evaluation, metrics, checkpoints."""

    def __init__(self, launch: Launch) -> None:
        self.launch = launch
        self.args = launch.args
        self.out = Path(self.args.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self._tb: Any = None
        #: the step of the newest checkpoint this run wrote or resumed from
        self.saved_step: int | None = None

    def setup(self) -> None:
        import torch

        from . import assets, preflight, recipe
        from .api import initialize
        from .data import RankBatches

        args = self.args
        model_dir = args.model or str(assets.smollm2_135m())
        problems = preflight.config_problems(model_dir)
        if problems:
            raise ConfigError(problems, source=args.ds_config)
        try:
            self.tokenizer = recipe.load_tokenizer(args.tokenizer or model_dir)
        except Exception as e:  # noqa: BLE001 - transformers' many ways of refusing a tokenizer directory
            flag = "--tokenizer" if args.tokenizer else "--model (its tokenizer; or give --tokenizer)"
            raise ConfigError(
                [
                    f"{flag}: cannot load a tokenizer from {args.tokenizer or model_dir!r}: {type(e).__name__}: "
                    f"{' '.join(str(e).split())[:300]}"
                ],
                source=args.ds_config,
            ) from None
        train_path, eval_path = args.data, args.eval_data
        if self.launch.builtin:
            train_path, eval_path = (str(p) for p in assets.movie_review_sentiment())
        self.data = recipe.load_task_data(
            train_path,
            eval_path,
            self.launch.fmt,
            self.tokenizer,
            args.seq_len,
            labels=args.labels.split(",") if args.labels else None,
            classifier_head=args.classifier_head,
            truncate=not args.no_truncate,
            eval_limit=args.eval_limit,
        )
        pad = self.tokenizer.pad_token_id
        config, plan = check_model(self.launch, model_dir, self.data, pad)
        lift = config.lift
        # Q-LIFT / streaming: layer by layer, never the whole model in memory
        if lift.frozen_weights != "full" or lift.stream_frozen:
            from .quant import make_store, make_streamer, store_dtype
            from .quant_load import build_quantized_model

            dtype = store_dtype(config.training.precision) or torch.float32
            self.model = build_quantized_model(
                model_dir,
                lift.frozen_weights,
                make_store(lift.block_store, lift.block_store_dir),
                random_init=args.random_init,
                seed=args.seed,
                num_labels=self.data.num_labels,
                pad_id=pad,
                dtype=dtype,
                streamer=make_streamer(lift.block_store_dir) if lift.stream_frozen else None,
            )
        else:
            self.model = recipe.build_model(
                model_dir, num_labels=self.data.num_labels, pad_id=pad, random_init=args.random_init, seed=args.seed
            )
        fixed = None
        if args.baseline == "lora":
            from peft import LoraConfig, get_peft_model

            self.model = get_peft_model(
                self.model,
                LoraConfig(
                    r=args.lora_r,
                    lora_alpha=2 * args.lora_r,
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                    lora_dropout=0.0,
                ),
            )
            fixed = [n for n, p in self.model.named_parameters() if p.requires_grad]
        elif args.baseline == "full":
            fixed = [n for n, _ in self.model.named_parameters()]
        self.engine, _, _, _ = initialize(model=self.model, config=config, fixed_trainable=fixed, plan=plan)
        self.batches = RankBatches(
            self.data.train,
            self.engine.train_micro_batch_size_per_gpu(),
            self.engine.rank,
            self.engine.world_size,
            args.seed,
            pad,
            accumulation=self.engine.gradient_accumulation_steps(),
        )
        self.engine.run_fingerprint.update(run_fingerprint(args, model_dir, self.data))
        if self.engine.rank == 0:
            if args.overwrite_output_dir:
                from .preflight import clear_outputs

                gone = clear_outputs(self.out) if self.out.is_dir() else []
                if gone:
                    logger.warning("--overwrite_output_dir: removed %s from %s", ", ".join(gone), self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            logger.info("backend %s, chosen by %s", config.backend, config.backend_reason)
            logger.info(
                "configuration (merged):\n%s",
                json.dumps({"args": vars(args), "config": config.to_dict()}, indent=1, default=str),
            )
        torch.manual_seed(args.seed + self.engine.rank)

    def evaluate(self) -> dict[str, float]:
        from .recipe import evaluate

        return evaluate(self.engine, self.data, self.tokenizer, self.args.seq_len, self.args.eval_batch_size)

    def log(self, record: dict[str, Any]) -> None:
        """Append to output_dir/metrics.jsonl (and TensorBoard when it is installed), rank 0 only."""
        if self.engine.rank != 0:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:
                self._tb = False
        if self._tb:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, record["step"])

    def save(self) -> None:
        self.engine.save_checkpoint(self.ckpt_dir, client_state={"samples_seen": self.engine.samples_seen})
        self.saved_step = self.engine.global_step
        # the oldest go (renamed aside, then deleted), never the one just written
        self.engine.checkpointer.rotate(self.ckpt_dir, "global_step", self.args.keep_checkpoints)

    def continue_metrics(self) -> None:
        """On resume: drop records past the resumed step from metrics.jsonl (those steps run again), so
        the file reads as one run (rank 0)."""
        f = self.out / "metrics.jsonl"
        if self.engine.rank != 0 or not f.is_file():
            return
        lines = f.read_text().splitlines()
        keep = (
            [ln for ln in lines if ln.strip() and _step_of(ln) <= self.engine.global_step]
            if self.engine.global_step > 0
            else []
        )
        if len(keep) != len(lines):
            tmp = f.with_suffix(".partial")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            os.replace(tmp, f)
            logger.info(
                "metrics.jsonl: %d records after step %d dropped (those steps run again)",
                len(lines) - len(keep),
                self.engine.global_step,
            )

    def train(self) -> dict[str, Any]:
        from tqdm import tqdm

        from .memory import peak_memory
        from .recipe import optimizer_step

        args, engine = self.args, self.engine
        engine.train()  # also when resuming past step 0 (from_pretrained returns a model in eval mode)
        if args.resume:
            path, _ = engine.load_checkpoint(self.ckpt_dir, allow_batch_change=args.allow_batch_change)
            if path is None:
                logger.warning("--resume: no checkpoint in %s, starting from the beginning", self.ckpt_dir)
            else:
                self.saved_step = engine.global_step
            self.continue_metrics()
        before = self.evaluate() if engine.global_step == 0 else {}
        if before:
            logger.info("before training: %s", _fmt(before))
            self.log({"step": 0, **before})
        total = engine.plan.total_steps
        t_loop = time.perf_counter()
        bar = tqdm(
            total=total, initial=engine.global_step, disable=engine.rank != 0, dynamic_ncols=True, file=sys.stderr
        )
        t_step = time.perf_counter()
        while not engine.done:
            block = engine.active_block
            phase = engine.cursor.phase.index + 1
            loss, tokens = optimizer_step(
                engine, self.batches, nan_loss=faults.armed("nan_loss", engine.global_step + 1, engine.rank)
            )
            dt = time.perf_counter() - t_step
            rec = {
                "step": engine.global_step,
                "loss": loss,
                "lr": engine.get_lr()[0],
                "block": block,
                "phase": phase,
                "grad_norm": engine.last_grad_norm,
                "tokens_per_s": tokens / dt,
                "step_s": dt,
                **peak_memory(),
            }
            if engine.last_step_skipped:
                rec["skipped"] = True
            if engine.skipped_steps:
                rec["skipped_steps"] = engine.skipped_steps
            self.log(rec)
            mem = rec.get("peak_cuda_allocated_gib", rec.get("peak_rss_gib", 0.0))
            bar.set_postfix(
                phase=f"{phase}/{len(engine.plan.phases)}",
                block=block,
                loss=f"{rec['loss']:.4f}",
                tok_s=f"{rec['tokens_per_s']:.0f}",
                **{"peak_gpu_GiB" if "peak_cuda_allocated_gib" in rec else "peak_rss_GiB": f"{mem:.2f}"},
            )
            bar.update(1)
            t_step = time.perf_counter()
            faults.maybe_kill("kill", engine.global_step, engine.rank)
            if args.eval_every and engine.global_step % args.eval_every == 0 and not engine.done:
                ev = self.evaluate()
                self.log({"step": engine.global_step, **ev})
                logger.info("step %d: %s", engine.global_step, _fmt(ev))
            if args.save_every and engine.global_step % args.save_every == 0:
                if engine.consecutive_skipped_steps:
                    # keep the newest checkpoint one from before the run of skipped (NaN/inf) steps
                    logger.warning(
                        "step %d: checkpoint not written, the last %d steps were skipped for NaN/inf",
                        engine.global_step,
                        engine.consecutive_skipped_steps,
                    )
                else:
                    self.save()
        bar.close()
        loop_seconds = time.perf_counter() - t_loop
        after = self.evaluate()
        if after:
            self.log({"step": engine.global_step, **after})
        # not the step just saved (or resumed from) again
        if not args.no_checkpoint and self.saved_step != engine.global_step:
            self.save()
        if not args.no_final_model:
            self.export()
        return {
            "before": before,
            "after": after,
            "phase_switch_seconds": engine.phase_switch_seconds,
            "skipped_steps": engine.skipped_steps,
            "train_loop_seconds": loop_seconds,
        }

    def export(self) -> None:
        from .export import save_hf_checkpoint

        final = self.out / "final"
        if self.args.baseline == "lora":  # ZeRO-1/2 only (checked up front): every rank holds full weights
            if self.engine.rank == 0:
                merged = self.model.merge_and_unload()
                merged.save_pretrained(final, safe_serialization=True)
                self.tokenizer.save_pretrained(final)
            self.engine.backend.barrier()
        else:
            save_hf_checkpoint(self.engine, final, tokenizer=self.tokenizer)


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError, TypeError):
        return 0


def run_fingerprint(args: Any, model_dir: str, data: Any) -> dict[str, Any]:
    """What decides a launcher run's result besides the config: the tokenized training data, the
    data seed (also the initialisation of new weights), the model, what trains (``"method"``: the baseline
    if any, else lift.method, as checkpoints have always recorded it)."""
    from .preflight import data_digest, model_identity

    out = {
        "data": data_digest(data.train),
        "data_seed": args.seed,
        "model": model_identity(model_dir, args.random_init),
        "method": args.baseline or args.method,
        "classifier_head": bool(args.classifier_head),
    }
    if args.baseline == "lora":
        out["lora_r"] = args.lora_r
    return out


def write_result(run: Run, result: dict[str, Any]) -> None:
    """``output_dir/result.json``: what this run measured, where and when (the data behind the
    README's quickstart figures)."""
    import datetime
    import platform

    from .backends.hardware import cpu_model

    engine = run.engine
    record = {
        **result,
        "steps": engine.global_step,
        "world_size": engine.world_size,
        "backend": engine.backend.name,
        "method": run.args.baseline or run.args.method,
        "phase_switches": engine.phase_switches,
        "process_seconds": time.process_time(),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    from .provenance import write_json

    write_json(run.out / "result.json", record)


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def _report(e: LiftError, run: Run | None) -> None:
    """The one-paragraph message of an error that ends the run (a fault during training says where the newest
    checkpoint is), on rank 0, or on every rank before the engine exists."""
    where = ""
    if e.exit_code == TRAINING_FAULT and run is not None:
        latest = run.ckpt_dir / "latest"
        where = (
            (
                f" The newest checkpoint is {run.ckpt_dir / latest.read_text().strip()}; "
                "continue from it with the same command and --resume."
            )
            if latest.is_file()
            else " No checkpoint was written (use --save_every N)."
        )
    engine = getattr(run, "engine", None)
    if engine is None or engine.rank == 0:
        print(f"error: {e}{where}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of launch/train.py; a :class:`~lift_ds.errors.LiftError` with an ``exit_code`` ends it with
    that status (2 bad input, 3 a fault during training) and a one-paragraph message."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = build_parser().parse_args(argv)
    run: Run | None = None
    try:
        run = Run(resolve(args))
        run.setup()
        result = run.train()
    except LiftError as e:  # exit status by class: a ResumeError (another number of ranks) 2, a DivergenceError 3
        if e.exit_code is None:
            raise
        _report(e, run)
        return e.exit_code
    if run.engine.rank == 0:
        b, a = result["before"], result["after"]
        for key in ("eval_accuracy", "eval_loss"):
            if key in a:
                print(f"held-out {key.split('_')[1]}: before {b.get(key, float('nan')):.4f} -> after {a[key]:.4f}")
        if result["skipped_steps"]:
            print(
                f"{result['skipped_steps']} optimizer steps were skipped "
                "for a NaN/inf loss or gradient (see metrics.jsonl)"
            )
        print(f"phase switches took {result['phase_switch_seconds']:.1f} s; outputs in {run.out}")
        write_result(run, result)
    run.engine.close()
    return 0
