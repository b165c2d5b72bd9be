"""Streamed frozen layers (``--stream_frozen``) at LLaMA-2 shapes, through launch/train.py, ONE process per run.

    python launch/bench_stream.py llama70b --layers 4,8 --out docs/qlift/llama2_70b_stream.json [--steps 4]
    python launch/bench_stream.py llama7b --out docs/qlift/llama2_7b_stream.json [--steps 6]
    # one run (e.g. a GPU row):
    python launch/bench_stream.py row --shape llama-3-70b --seq_len 2048 --steps 3 --out row.json

Each run is one process running ``lift_ds.train.main`` (what launch/train.py runs) on a model of the
named shapes built layer by layer from its seeded random init (``--random_init``; NF4, bf16, the
torch backend, AdamW8bit: 8-bit moments and no fp32 master for the active layer), on packed text
(movie reviews) at ``--seq_len`` tokens, micro batch 1, training layers 1 and 2 (front2end, grouped:
the backward runs through every frozen layer above). A watchdog kills the run when the machine's
used memory passes ``--kill_gib`` (default 21 GiB) so that the kernel's OOM killer never picks a
victim. Per run: peak RSS (``ru_maxrss``, the whole process: build, training, export) and per step,
step times, losses, the streamer's counters, and (``--export``) a check that the exported trained
layers equal their weights after their last optimizer step (sha256 of each tensor) and an untrained
layer equals its seeded init drawn again.

``llama70b``: LLaMA-2-70B layer shapes with 4 and 8 layers, streamed: the claim is peak RSS flat in
depth; step time per layer and an 80-layer extrapolation are reported. ``llama7b``: LLaMA-2-7B shapes
(32 layers), streamed against resident (Q-LIFT's NF4 layers all in memory), same settings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
SHAPES = {  # the config.json of each model (num_hidden_layers set per run)
    "llama-2-70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
    "llama-2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
    "llama-3-70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
    ),
    "tiny": dict(
        hidden_size=256,
        intermediate_size=688,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=512,
    ),
}
GIB = 2**30


def _used_gib() -> float:
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, v = line.split(":", 1)
        info[k] = int(v.split()[0]) * 1024
    return (info["MemTotal"] - info["MemAvailable"]) / GIB


def prepare(work: Path, shape: str, layers: int) -> tuple[Path, Path]:
    """A model directory (config + a small BPE tokenizer trained on the reviews) and a packed-text file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    from lift_ds import assets

    train, _ = assets.movie_review_sentiment()
    texts = [json.loads(line)["text"] for line in Path(train).read_text().splitlines()]
    model_dir = work / f"{shape}-{layers}"
    model_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=4000, special_tokens=["<eos>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(model_dir)
    cfg = LlamaConfig(
        num_hidden_layers=layers, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, **SHAPES[shape]
    )
    cfg.save_pretrained(model_dir)
    text = work / "reviews.txt"
    text.write_text("\n".join(texts))
    return model_dir, text


def train_argv(spec: dict) -> list[str]:
    """launch/train.py's arguments for one run."""
    work = Path(spec["work"])
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "optimizer": {"type": spec.get("optimizer", "AdamW8bit"), "params": {"lr": 1e-4, "weight_decay": 0.0}},
        "lift": {
            "backend": "torch",
            "frozen_weights": spec.get("frozen_weights", "nf4"),
            "stream_frozen": spec["stream"],
            "layer_range": [1, 2],
            "gradient_checkpointing": spec.get("checkpointing", False),
            "block_store": "disk",
            "block_store_dir": str(work / "store"),
        },
    }
    (work / "ds_config.json").write_text(json.dumps(cfg, indent=1))
    argv = [
        "--ds_config",
        str(work / "ds_config.json"),
        "--model",
        spec["model_dir"],
        "--random_init",
        "--data",
        spec["text"],
        "--format",
        "text",
        "--seq_len",
        str(spec["seq_len"]),
        "--max_steps",
        str(spec["steps"]),
        "--output_dir",
        str(work / "out"),
        "--no_checkpoint",
        "--seed",
        "0",
    ]
    return argv + ([] if spec.get("export") else ["--no_final_model"])


def _sha(t) -> str:
    import torch

    h = hashlib.sha256()
    h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy())  # no copy of the bytes
    return h.hexdigest()


def worker(spec: dict) -> dict:
    """One run in this process: launch/train.py's main, then the export checks."""
    import lift_ds.train as T

    after_step: dict[str, str] = {}  # digest of each trained tensor at the end of its (last) phase
    captured: dict = {}

    def digest_live(engine, names) -> None:
        live = dict(engine.module.named_parameters())
        after_step.update({n: _sha(live[n]) for n in names if n in live})

    real_train, real_export = T.Run.train, T.Run.export
    import lift_ds.recipe as R

    real_step, cpu_steps = R.optimizer_step, []

    # the process's CPU seconds per step (every thread): less sensitive than wall time to a shared machine
    def timed_step(*a, **k):
        c = time.process_time()
        out = real_step(*a, **k)
        cpu_steps.append(time.process_time() - c)
        return out

    R.optimizer_step = timed_step

    def train(self):  # keep the engine; digest each block's weights as its phase ends (not inside a timed steady step)
        engine = captured["engine"] = self.engine
        orig_end = engine.end_phase

        def end_phase(stash=False):
            if engine.active_block_index is not None:
                digest_live(engine, engine.trainable_param_names())
            orig_end(stash)

        engine.end_phase = end_phase
        return real_train(self)

    def export(self):
        digest_live(self.engine, self.engine.saved_param_names())  # the last phase's block is still live
        return real_export(self)

    T.Run.export = export
    T.Run.train = train
    t0 = time.perf_counter()
    rc = T.main(train_argv(spec))
    out = Path(spec["work"]) / "out"
    engine = captured.get("engine")
    steps = (
        [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        if (out / "metrics.jsonl").is_file()
        else []
    )
    steps = [s for s in steps if "loss" in s]
    rec: dict = {
        "rc": rc,
        "wall_seconds": time.perf_counter() - t0,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "steps": [
            {
                **{
                    k: s.get(k)
                    for k in (
                        "step",
                        "block",
                        "loss",
                        "step_s",
                        "peak_rss_gib",
                        "tokens_per_s",
                        "peak_cuda_allocated_gib",
                    )
                },
                "cpu_s": cpu_steps[i] if i < len(cpu_steps) else None,
            }
            for i, s in enumerate(steps)
        ],
    }
    if engine is not None and engine.quant is not None and engine.quant.streamer is not None:
        rec["streamer"] = dict(engine.quant.streamer.stats)
    if (out / "result.json").is_file():
        rec["phase_switch_seconds"] = json.loads((out / "result.json").read_text()).get("phase_switch_seconds")
    if spec.get("export") and (out / "final").is_dir():
        rec["export"] = check_export(out / "final", after_step, spec)
    return rec


def check_export(final: Path, after_step: dict[str, str], spec: dict) -> dict:
    """The exported trained tensors against their digests after the last step; one untrained layer
    against its seeded init drawn again."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from lift_ds.store import init_layer
    from lift_ds.tensorfile import TensorFile

    index = json.loads((final / "model.safetensors.index.json").read_text())["weight_map"]
    mismatched = [n for n, digest in after_step.items() if _sha(TensorFile(final / index[n]).get(n)) != digest]
    cfg = AutoConfig.from_pretrained(spec["model_dir"])
    top = cfg.num_hidden_layers - 1
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    layer = model.model.layers[top]
    init_layer(model, layer, 0, top)
    untrained = [f"model.layers.{top}.{n}" for n, _ in layer.named_parameters()]
    values = dict(layer.named_parameters())
    bad = [
        n
        for n in untrained
        if not torch.equal(TensorFile(final / index[n]).get(n), values[n[len(f"model.layers.{top}.") :]].detach())
    ]
    return {
        "trained_tensors_checked": len(after_step),
        "trained_mismatched": mismatched,
        "untrained_layer": f"model.layers.{top}",
        "untrained_tensors_checked": len(untrained),
        "untrained_mismatched": bad,
    }


def run_isolated(spec: dict, kill_gib: float | None) -> dict:
    """Run :func:`worker` in a fresh process under the memory watchdog."""
    spec_file = Path(spec["work"]) / "spec.json"
    spec_file.write_text(json.dumps(spec))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "TORCHINDUCTOR_COMPILE_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.Popen(
        [sys.executable, __file__, "worker", "--spec", str(spec_file)], env=env, start_new_session=True
    )
    peak_used, killed = 0.0, False

    def watch() -> None:
        nonlocal peak_used, killed
        while proc.poll() is None:
            used = _used_gib()
            peak_used = max(peak_used, used)
            if kill_gib is not None and used > kill_gib:
                killed = True
                os.killpg(proc.pid, signal.SIGKILL)
                return
            time.sleep(0.5)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    proc.wait()
    t.join()
    result_file = Path(spec["work"]) / "result.json"
    rec = json.loads(result_file.read_text()) if result_file.is_file() and not killed else {"rc": proc.returncode}
    rec.update(machine_used_peak_gib=peak_used, killed_by_watchdog=killed)
    return rec


def summarise(rec: dict, layers: int) -> dict:
    """Median step time over the steady steps: not the run's first, not the last of a phase (which ends
    with a switch)."""
    import statistics

    steps = rec.get("steps", [])
    keep = [i for i, s in enumerate(steps) if i > 0 and (i + 1 == len(steps) or steps[i + 1]["block"] == s["block"])]
    med = statistics.median([steps[i]["step_s"] for i in keep]) if keep else None
    cpu = [steps[i].get("cpu_s") for i in keep if steps[i].get("cpu_s") is not None]
    return {
        "median_step_s": med,
        "step_s_per_layer": med / layers if med else None,
        "median_step_cpu_s": statistics.median(cpu) if cpu else None,
        "losses": [s["loss"] for s in steps],
        "peak_rss_gib": rec.get("peak_rss_gib"),
        "peak_rss_gib_training": max((s.get("peak_rss_gib") or 0) for s in steps) if steps else None,
    }


def one_run(
    shape: str,
    layers: int,
    stream: bool = True,
    export: bool = False,
    steps: int = 3,
    seq_len: int = 2048,
    work: Path = Path("/tmp/lift_ds_bench_stream"),
    kill_gib: float | None = 21.0,
) -> dict:
    """One LIFT run (NF4, AdamW8bit, bf16, layers 1 and 2, activation checkpointing above 512 tokens)
    through launch/train.py in its own process: the GPU benchmark's streamed row is
    ``one_run("llama-3-70b", 80, seq_len=2048, kill_gib=None)``. Returns the worker's record with a
    ``summary`` (median steady step time, per layer, peak RSS); on a GPU each step also carries
    ``peak_cuda_allocated_gib`` and ``tokens_per_s``, and ``streamer`` the read-ahead counters
    (``wait_seconds``: transfer time the compute did not hide)."""
    work = work / f"{shape}-{layers}-{'stream' if stream else 'resident'}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model_dir, text = prepare(work, shape, layers)
    spec = {
        "work": str(work),
        "model_dir": str(model_dir),
        "text": str(text),
        "seq_len": seq_len,
        "steps": steps,
        "stream": stream,
        "export": export,
        "checkpointing": seq_len > 512,
    }
    print(f"run: {shape} x {layers} layers, {'streamed' if stream else 'resident'}, {steps} steps", flush=True)
    rec = run_isolated(spec, kill_gib)
    rec.update(shape=shape, layers=layers, streamed=stream, summary=summarise(rec, layers))
    print(
        json.dumps(
            {
                k: rec[k]
                for k in ("shape", "layers", "streamed", "summary", "killed_by_watchdog", "machine_used_peak_gib")
            }
            | ({"export": rec["export"]} if "export" in rec else {}),
            default=str,
        ),
        flush=True,
    )
    shutil.rmtree(work, ignore_errors=True)
    return rec


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("llama70b", "llama7b", "row", "worker"))
    p.add_argument("--out", default=None)
    p.add_argument(
        "--layers",
        default=None,
        help="llama70b: comma-separated depths (default 4,8); row: the depth (default the shape's)",
    )
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--shape", default="llama-3-70b", choices=sorted(SHAPES))
    p.add_argument("--no_stream", action="store_true", help="row: resident frozen layers")
    p.add_argument("--export", action="store_true", help="row: export and check the exported layers")
    p.add_argument("--work", default="/tmp/lift_ds_bench_stream")
    p.add_argument(
        "--kill_gib", type=float, default=21.0, help="kill a run when the machine's used memory passes this (0: never)"
    )
    p.add_argument("--spec", default=None)
    p.add_argument(
        "--repeat", type=int, default=1, help="llama7b: run the streamed / resident pair this many times, alternating"
    )
    args = p.parse_args()
    if args.what == "worker":
        spec = json.loads(Path(args.spec).read_text())
        rec = worker(spec)
        (Path(spec["work"]) / "result.json").write_text(json.dumps(rec, indent=1, default=str))
        return 0

    runs = []
    if args.what == "llama70b":
        runs = [("llama-2-70b", int(n), True, True) for n in (args.layers or "4,8").split(",")]
        steps = args.steps or 4
    elif args.what == "llama7b":
        runs = [("llama-2-7b", 32, True, False), ("llama-2-7b", 32, False, False)] * args.repeat
        steps = args.steps or 6
    else:
        depth = (
            int(args.layers)
            if args.layers
            else {"llama-3-70b": 80, "llama-2-70b": 80, "llama-2-7b": 32, "tiny": 4}[args.shape]
        )
        runs = [(args.shape, depth, not args.no_stream, args.export)]
        steps = args.steps or 3
    record: dict = {
        "runs": [
            one_run(shape, layers, stream, export, steps, args.seq_len, Path(args.work), args.kill_gib or None)
            for shape, layers, stream, export in runs
        ],
        "steps": steps,
        "seq_len": args.seq_len,
        "command": "python " + " ".join(sys.argv),
    }
    a = record["runs"]
    if args.what == "llama70b" and len(a) >= 2 and all(r["summary"]["peak_rss_gib"] for r in a):
        lo, hi = a[0]["summary"], a[-1]["summary"]
        per_layer = hi["step_s_per_layer"]
        record["peak_rss_ratio_deepest_to_shallowest"] = hi["peak_rss_gib"] / lo["peak_rss_gib"]
        if lo["median_step_s"] and hi["median_step_s"]:
            slope = (hi["median_step_s"] - lo["median_step_s"]) / (a[-1]["layers"] - a[0]["layers"])
            record["step_s_per_added_layer"] = slope
            record["step_s_80_layers_extrapolated"] = lo["median_step_s"] + slope * (80 - a[0]["layers"])
        record["step_s_per_layer_deepest"] = per_layer
    if args.what == "llama7b" and len(a) >= 2:

        def best(streamed: bool, key: str) -> float | None:  # the least disturbed of the repeats
            vals = [r["summary"][key] for r in a if r["streamed"] == streamed and r["summary"].get(key)]
            return min(vals) if vals else None

        for key, name in (
            ("peak_rss_gib", "peak_rss"),
            ("median_step_s", "step_time"),
            ("median_step_cpu_s", "step_cpu_time"),
        ):
            s_, r_ = best(True, key), best(False, key)
            if s_ and r_:
                record[f"{name}_streamed_over_resident"] = s_ / r_
    record["load_average_at_end"] = os.getloadavg()
    if args.out:
        from lift_ds.provenance import stamped, write_json

        record = stamped(record)
        write_json(args.out, record)
        print(f"wrote {args.out}")
    print(json.dumps({k: v for k, v in record.items() if k not in ("runs",)}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
