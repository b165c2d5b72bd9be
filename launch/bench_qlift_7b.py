"""Q-LIFT at LLaMA-2-7B shapes in ONE process on a CPU machine: NF4 frozen layers, the exact weights in
a disk block store, a few AdamW steps over two phases.

    python launch/bench_qlift_7b.py --out docs/qlift/llama2_7b_nf4.json [--store_dir /tmp/qlift7b_store] [--steps 4]

The model (LLaMA-2-7B's config: 32 layers, hidden 4096, MLP 11008, vocab 32000) is built layer by layer
with its own random init (lift_ds.quant_load), never whole in full precision: each layer is initialised
in bf16, written to the block store on disk, and quantized to NF4. LIFT then trains layers 31 and 32
(front2end, grouped: steps/2 steps each) on one fixed batch, bf16 weights with fp32 master and AdamW
state for the active layer only (torch backend). It records the loss per step (it must fall on a
repeated batch), step times, the live bytes of the quantized layers against bf16, the store's size on
disk, and peak RSS (``ru_maxrss``) after the build and at the end. ``--tiny`` runs the same on a small
config (a smoke check).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--store_dir", default="/tmp/qlift7b_store")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--tiny", action="store_true", help="a 4-layer, hidden-256 model (smoke check)")
    args = p.parse_args()
    from transformers import LlamaConfig

    import lift_ds
    from lift_ds.backends.hardware import cpu_model
    from lift_ds.memory import live_tensor_bytes
    from lift_ds.quant import BlockStore
    from lift_ds.quant_load import build_quantized_model

    if args.tiny:
        cfg = LlamaConfig(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=1000,
            max_position_embeddings=256,
        )
    else:  # meta-llama/Llama-2-7b-hf's config.json
        cfg = LlamaConfig(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
        )
    layers = cfg.num_hidden_layers
    shutil.rmtree(args.store_dir, ignore_errors=True)
    record: dict = {
        "model": "LLaMA-2-7B shapes (random init)" if not args.tiny else "tiny",
        "layers": layers,
        "steps": args.steps,
        "seq_len": args.seq_len,
        "batch": 1,
        "lr": args.lr,
        "store_dir": args.store_dir,
    }
    t0 = time.perf_counter()
    model = build_quantized_model(
        "unused", "nf4", BlockStore("disk", args.store_dir), random_init=True, config=cfg, dtype=torch.bfloat16
    )
    record["build_seconds"] = time.perf_counter() - t0
    record["peak_rss_gib_after_build"] = peak_rss_gib()
    record["params_total"] = sum(p.numel() for p in model.parameters()) + sum(
        m.in_features * m.out_features for m in model.modules() if hasattr(m, "qweight")
    )
    print(
        f"built in {record['build_seconds']:.0f} s, peak RSS {record['peak_rss_gib_after_build']:.2f} GiB", flush=True
    )
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "weight_decay": 0.0}},
        "lift": {
            "backend": "torch",
            "total_steps": args.steps,
            "layer_range": [layers - 1, layers],
            "frozen_weights": "nf4",
            "block_store": "disk",
        },
    }
    engine, _, _, _ = lift_ds.initialize(model=model, config=config)
    census = engine.quant.bytes()
    record["census"] = {
        **census,
        "ratio_to_bf16": census["quantized_bytes"] / census["bf16_bytes"],
        "live_tensor_bytes": live_tensor_bytes(),
    }
    record["store_bytes_on_disk"] = sum(f.stat().st_size for f in Path(args.store_dir).glob("*.safetensors"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, args.seq_len), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone()}
    engine.train()
    steps = []
    while not engine.done:
        t = time.perf_counter()
        block = engine.active_block
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        steps.append(
            {
                "step": engine.global_step,
                "block": block,
                "loss": loss.item(),
                "seconds": time.perf_counter() - t,
                "peak_rss_gib": peak_rss_gib(),
            }
        )
        print(json.dumps(steps[-1]), flush=True)
    with torch.no_grad():
        record["loss_after"] = engine(**batch).loss.item()
    record["steps_log"] = steps
    record["peak_rss_gib"] = peak_rss_gib()
    record["phase_switch_seconds"] = engine.phase_switch_seconds
    record.update(
        machine={
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(),
        },
        finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command="python " + " ".join(sys.argv),
    )
    engine.close()
    shutil.rmtree(args.store_dir, ignore_errors=True)
    from lift_ds.provenance import write_json

    write_json(args.out, record)
    losses = [s["loss"] for s in steps]
    print(
        f"losses {[f'{x:.3f}' for x in losses]} -> {record['loss_after']:.3f} "
        f"after the last step; peak RSS {record['peak_rss_gib']:.2f} GiB; "
        f"NF4 layers {census['quantized_bytes'] / 2**30:.2f} GiB = {record['census']['ratio_to_bf16']:.3f}x bf16; "
        f"store on disk {record['store_bytes_on_disk'] / 2**30:.1f} GiB; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
