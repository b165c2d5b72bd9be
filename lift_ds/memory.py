"""Bytes per rank of model states (and a first-order activation term): LIFT vs full fine-tuning vs LoRA.

    python -m lift_ds.memory --model <dir | config.json | preset> --ranks 8 --zero 3 [--gib 80]

The model is built on the meta device from its config (no weights, any size). Accounting per rank,
for P parameters of which T train at a time (LIFT: the largest candidate block; full: all; LoRA: the
adapters), N data-parallel ranks, mixed precision (bf16/fp16 weights with fp32 master and Adam):

| ZeRO stage | parameters | gradients | optimizer (fp32 master + Adam m, v) |
|---|---|---|---|
| 0 | 2P | 2T | 12T |
| 1 | 2P | 2T | 12T/N |
| 2 | 2P | 2T/N | 12T/N |
| 3 / FSDP | 2P/N | 2T/N | 12T/N |

In fp32 the parameters and gradients take 4 bytes and the optimizer 8 (no master copy). With
optimizer offload the optimizer column lives on CPU. DeepSpeed's own estimators
(``estimate_zero2/3_model_states_mem_needs``, which also count fp32 gradient copies and the largest
layer's gathered weights) are reported next to it for full fine-tuning.

Activations, first order (Korthikanti et al. 2022, no recomputation, fused attention): 34 s b h bytes
per layer in 16-bit, plus the logits (:func:`logits_bytes`). LIFT stores activations only from the
active block upward (backward stops there), so its peak is set by the lowest candidate block.

The logits depend on ``lift.loss``. The model's own loss (``model``) holds the 16-bit logits of every
position and their fp32 log-softmax: 6 s b V bytes (12 in fp32). lift_ds's chunked loss (``chunked``,
what ``auto`` runs on CPU and for the models it covers) holds one chunk of them at a time
(``lift_ds.loss.CHUNK_ELEMENTS`` fp32 elements: the logits in the model's dtype, their fp32 softmax and
the gradient in the model's dtype) plus the gradient of the hidden states it hands back (2 s b h),
and, when the head trains, its weight gradient until backward (the chunks' logits gradients in 16-bit,
2 s b V, or an fp32 sum, 4 V h, whichever is smaller). Llama-3-8B at sequence 2048: 1.47 GiB of
logits per sequence with the model's loss, 0.08 GiB with the chunked one.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config import LiftConfig

GIB = 1024**3

PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    ),
    "llama-2-7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
    "llama-3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
    "llama-2-13b": dict(
        vocab_size=32000,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
    ),
    "llama-2-70b": dict(
        vocab_size=32000,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
    ),
    "llama-3-70b": dict(
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
    ),
}


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts of a model, per block, and of the candidate blocks of a LIFT plan."""

    name: str
    total: int
    layer_sizes: list[int]
    embedding: int
    head: int
    hidden: int
    vocab: int
    lora_per_rank_unit: int  # LoRA parameters per unit of rank r on q, k, v, o (sum of in + out)
    # what trains in each distinct phase unit of the plan (lift_ds.plan.resolve_plan), in order
    candidate_sizes: list[int]
    lowest_candidate_layer: int  # 1-indexed layer of the candidate nearest the input (0: the embedding)
    layer_linear: int = 0  # parameters of the decoder layers' linear weights (what Q-LIFT would quantize)

    @property
    def num_layers(self) -> int:
        return len(self.layer_sizes)


def _config_of(model_or_config: str) -> Any:
    from transformers import AutoConfig, LlamaConfig

    if model_or_config in PRESETS:
        return LlamaConfig(**PRESETS[model_or_config])
    p = Path(model_or_config)
    if p.is_file():
        if p.name != "config.json":
            raise ValueError(f"--model: {p} is not a config.json")
        return AutoConfig.from_pretrained(str(p.parent))
    if p.is_dir():
        return AutoConfig.from_pretrained(str(p))
    raise ValueError(
        f"--model: {model_or_config!r} is neither a file, a directory, nor a preset ({', '.join(PRESETS)})"
    )


def model_shape(model_or_config: str, lift: LiftConfig | None = None) -> ModelShape:
    """Count parameters per block of a preset name, a config.json, or a Hugging Face directory (meta
    device), and the candidates of ``lift``'s plan (default: every layer)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .plan import resolve_plan

    cfg = _config_of(model_or_config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    named = dict(model.named_parameters())
    size = lambda names: sum(named[n].numel() for n in names)  # noqa: E731
    plan = resolve_plan(model, lift or LiftConfig(), total_steps=10**6)
    blocks = plan.blocks
    lora = sum(
        m.in_features + m.out_features
        for n, m in model.named_modules()
        if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj") and hasattr(m, "in_features")
    )
    lowest = min((b.layer_number or 0) if b.kind != "head" else cfg.num_hidden_layers + 1 for b in plan.candidates)
    stack = {n for b in blocks if b.kind == "layer" for n in b.param_names}
    linear = sum(
        m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and f"{n}.weight" in stack
    )
    return ModelShape(
        name=str(model_or_config),
        total=sum(p.numel() for p in named.values()),
        layer_sizes=[size(b.param_names) for b in blocks if b.kind == "layer"],
        embedding=sum(size(b.param_names) for b in blocks if b.kind == "embedding"),
        head=sum(size(b.param_names) for b in blocks if b.kind == "head"),
        hidden=cfg.hidden_size,
        vocab=cfg.vocab_size,
        lora_per_rank_unit=lora,
        candidate_sizes=[size(plan.trainable_param_names(plan.units.index(u))) for u in dict.fromkeys(plan.units)],
        lowest_candidate_layer=lowest,
        layer_linear=linear,
    )


@dataclass(frozen=True)
class Estimate:
    method: str
    trained: int
    params: float
    grads: float
    optimizer: float
    optimizer_on_cpu: bool
    activations: float

    @property
    def model_states(self) -> float:
        """Bytes of model states on the accelerator."""
        return self.params + self.grads + (0.0 if self.optimizer_on_cpu else self.optimizer)

    @property
    def total(self) -> float:
        return self.model_states + self.activations


#: bytes per parameter of a quantized frozen weight: NF4 with 64-element blocks and double-quantized
#: scales (4.127 bits, as QLoRA/bitsandbytes and torchao's NF4Tensor store it); int8 weight-only with
#: one scale per output row (about 1 byte)
QUANTIZED_BYTES = {"nf4": 4.127 / 8, "int8": 1.0}
#: frozen layers a streamed run holds at once (lift_ds.stream.CAPACITY: the one computing, two read ahead)
STREAMED_LAYERS = 3
#: optimizer bytes per trained parameter with ``optimizer`` ``adamw8bit`` (torchao's AdamW8bit: 8-bit m and
#: v, an fp32 scale per 256 of each; no fp32 master, the 16-bit weight takes the update with stochastic rounding)
ADAMW8BIT_BYTES = 2 + 2 * 4 / 256


def _streamed_params(shape: ModelShape, trained: int, w: int, frozen_weights: str) -> float:
    """Device bytes of parameters when frozen layers stream: everything but the decoder layers' linear
    weights, the active block, and :data:`STREAMED_LAYERS` frozen layers' linear weights."""
    per_layer = shape.layer_linear / max(1, shape.num_layers)
    frozen = QUANTIZED_BYTES.get(frozen_weights, w)
    return (shape.total - shape.layer_linear) * w + min(trained, per_layer) * w + STREAMED_LAYERS * per_layer * frozen


#: ``lift.loss`` values the estimate tells apart (``auto`` runs ``chunked`` for the models it covers)
LOSSES = ("chunked", "model")


def logits_bytes(
    shape: ModelShape,
    seq_len: int,
    micro_batch: int = 1,
    precision: str = "bf16",
    loss: str = "chunked",
    head_trains: bool = False,
) -> float:
    """Peak bytes of the logits and the loss of one micro-batch (see the module docstring)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    w = 2 if precision in ("bf16", "fp16") else 4
    tokens, vocab = seq_len * micro_batch, shape.vocab
    if loss == "model":
        return 6 * tokens * vocab * (w / 2)
    from .loss import chunk_rows

    rows = min(tokens, chunk_rows(vocab))
    weight_grad = min(tokens * w, 4 * shape.hidden) * vocab if head_trains else 0
    return rows * vocab * (2 * w + 4) + tokens * shape.hidden * w + weight_grad


def estimate(
    shape: ModelShape,
    method: str,
    ranks: int,
    zero: int,
    precision: str = "bf16",
    offload: bool = False,
    micro_batch: int = 1,
    seq_len: int = 2048,
    lora_r: int = 8,
    checkpointing: bool = False,
    frozen_weights: str = "full",
    loss: str = "chunked",
    stream_frozen: bool = False,
    optimizer: str = "adamw",
) -> Estimate:
    """Bytes per rank for one method. ``zero`` 0-3 (FSDP = 3). LIFT trains the largest of the
    shape's candidate blocks (``model_shape(..., lift)``) at a time. With ``checkpointing`` a stored
    layer keeps only its input (2 s b h bytes in 16-bit) and one layer's activations exist at a time
    during its recomputation. ``frozen_weights`` ``nf4`` / ``int8`` (LIFT and LoRA, i.e. Q-LIFT and
    QLoRA): the decoder layers' frozen linear weights held quantized (:data:`QUANTIZED_BYTES`), the
    active block, norms, embeddings and head in 16-bit. ``stream_frozen`` (LIFT): only
    :data:`STREAMED_LAYERS` frozen layers' linear weights are on the device (quantized or 16-bit).
    ``optimizer`` ``adamw8bit``: :data:`ADAMW8BIT_BYTES` per trained parameter, 16-bit gradients."""
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"zero must be 0, 1, 2 or 3, got {zero}")
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    if method == "lift":
        trained = max(shape.candidate_sizes)
    elif method == "full":
        trained = shape.total
    elif method == "lora":
        trained = lora_r * shape.lora_per_rank_unit
    else:
        raise ValueError(f"method must be lift, full or lora, got {method!r}")
    params, grads, optimizer_bytes = state_bytes(shape.total, trained, ranks, zero, precision)
    if frozen_weights != "full":
        if frozen_weights not in QUANTIZED_BYTES or method == "full" or zero == 3:
            raise ValueError(
                f"frozen_weights {frozen_weights!r}: allowed full, "
                f"{', '.join(QUANTIZED_BYTES)}, for lift and lora below ZeRO-3"
            )
        w = 2 if precision in ("bf16", "fp16") else 4
        active_linear = min(trained, shape.layer_linear) if method == "lift" else 0
        quantized = shape.layer_linear - active_linear
        params = quantized * QUANTIZED_BYTES[frozen_weights] + (shape.total - quantized) * w
    if stream_frozen:
        if method != "lift" or zero == 3:
            raise ValueError("stream_frozen: LIFT below ZeRO-3 only")
        params = _streamed_params(shape, trained, 2 if precision in ("bf16", "fp16") else 4, frozen_weights)
    if optimizer == "adamw8bit":
        if method == "full" and zero:
            raise ValueError("optimizer adamw8bit: the torch backend (zero 0) only")
        optimizer_bytes = ADAMW8BIT_BYTES * trained
        grads = (2 if precision in ("bf16", "fp16") else 4) * trained
    elif optimizer != "adamw":
        raise ValueError(f"optimizer must be adamw or adamw8bit, got {optimizer!r}")
    half = precision in ("bf16", "fp16")
    act_bytes = 2 if half else 4
    per_layer = 34 * seq_len * micro_batch * shape.hidden * act_bytes / 2
    logits = logits_bytes(shape, seq_len, micro_batch, precision, loss, head_trains=method == "full")
    # LIFT stores activations from its lowest candidate block upward (backward stops there)
    stored_layers = (
        shape.num_layers if method != "lift" else shape.num_layers - max(shape.lowest_candidate_layer, 1) + 1
    )
    if checkpointing:
        activations = stored_layers * 2 * seq_len * micro_batch * shape.hidden * act_bytes / 2 + per_layer + logits
    else:
        activations = stored_layers * per_layer + logits
    return Estimate(method, trained, params, grads, optimizer_bytes, offload, activations)


def state_bytes(total: int, trained: int, ranks: int, zero: int, precision: str = "bf16") -> tuple[float, float, float]:
    """``(parameters, gradients, optimizer)`` bytes per rank for ``total`` parameters of which
    ``trained`` train, under ZeRO stage ``zero`` (FSDP = 3), by the table in the module docstring."""
    half = precision in ("bf16", "fp16")
    w = 2 if half else 4
    opt_per = 12 if half else 8
    P, T, N = total, trained, ranks
    return w * P / (N if zero == 3 else 1), w * T / (N if zero >= 2 else 1), opt_per * T / (N if zero >= 1 else 1)


def deepspeed_full_estimate(shape: ModelShape, ranks_per_node: int, nodes: int, zero: int, offload: bool) -> float:
    """DeepSpeed's own estimate of accelerator bytes for full fine-tuning (its formulas, ZeRO-2/3)."""
    P, N = shape.total, ranks_per_node * nodes
    largest_layer = max(shape.layer_sizes + [shape.embedding, shape.head])
    if zero == 3:
        return 4 * largest_layer + (0 if offload else int(18 * P / N))
    if zero == 2:
        return 2 * P + (0 if offload else int(18 * P / N))
    raise ValueError("DeepSpeed ships estimators for ZeRO-2 and ZeRO-3 only")


def table(shape: ModelShape, ranks: int, zero: int, **kw: Any) -> list[Estimate]:
    """LIFT, full fine-tuning and LoRA (:func:`estimate` for each)."""
    return [estimate(shape, m, ranks, zero, **kw) for m in ("lift", "full", "lora")]


#: rows of the one-GPU table: (label, method, frozen weights, streamed, optimizer)
ONE_GPU_METHODS = (
    ("LIFT-NF4 streamed, AdamW8bit", "lift", "nf4", True, "adamw8bit"),
    ("LIFT-NF4 streamed", "lift", "nf4", True, "adamw"),
    ("LIFT streamed (bf16 layers)", "lift", "full", True, "adamw"),
    ("LIFT-NF4", "lift", "nf4", False, "adamw"),
    ("LIFT", "lift", "full", False, "adamw"),
    ("LoRA r=16", "lora", "full", False, "adamw"),
    ("QLoRA-style LoRA r=16", "lora", "nf4", False, "adamw"),
    ("full fine-tuning", "full", "full", False, "adamw"),
)


def one_gpu_table(
    models: tuple[str, ...] = ("llama-2-7b", "llama-3-8b", "llama-2-70b", "llama-3-70b"),
    gpus: tuple[int, ...] = (80, 48, 24, 12),
    seq_len: int = 2048,
    loss: str = "chunked",
) -> str:
    """Which models fit on one GPU of each size, per method: a markdown table of estimated GiB (bf16
    weights, fp32 master and Adam for what trains unless AdamW8bit, micro batch 1, activation
    checkpointing; streamed: :data:`STREAMED_LAYERS` frozen layers on the device)."""
    shapes = {m: model_shape(m) for m in models}
    head = "| method | " + " | ".join(models) + " | " + " | ".join(f"fits {g} GiB" for g in gpus) + " |"
    lines = [head, "|---" * (1 + len(models) + len(gpus)) + "|"]
    for label, method, frozen, stream, opt in ONE_GPU_METHODS:
        totals = {
            m: estimate(
                s,
                method,
                1,
                0,
                "bf16",
                seq_len=seq_len,
                lora_r=16,
                checkpointing=True,
                frozen_weights=frozen,
                stream_frozen=stream,
                optimizer=opt,
                loss=loss,
            ).total
            / GIB
            for m, s in shapes.items()
        }
        fits = [", ".join(m for m in models if totals[m] <= g) or "none" for g in gpus]
        lines.append(f"| {label} | " + " | ".join(f"{totals[m]:.1f}" for m in models) + " | " + " | ".join(fits) + " |")
    return "\n".join(lines)


def largest_fitting(gib: float, ranks: int, zero: int, **kw: Any) -> dict[str, str | None]:
    """The largest preset model whose total estimate fits in ``gib`` per rank, per method."""
    shapes = sorted((model_shape(n) for n in PRESETS), key=lambda s: s.total)
    out: dict[str, str | None] = {}
    for method in ("lift", "full", "lora"):
        fits = [s.name for s in shapes if estimate(s, method, ranks, zero, **kw).total <= gib * GIB]
        out[method] = fits[-1] if fits else None
    return out


def peak_memory() -> dict[str, float]:
    """Peak memory of this process so far, named for what it is: on CUDA the allocator's peak
    (``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``, GiB), else the peak resident set
    size (RSS, GiB)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {
            "peak_cuda_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
            "peak_cuda_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
        }
    import resource

    # ru_maxrss is KiB on Linux
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}


def live_tensor_bytes() -> int:
    """Bytes of all live tensor storages in this process, each storage counted once (a census of what
    is held, the measured counterpart of :func:`estimate`; walks ``gc.get_objects()``, so not for hot paths)."""
    import gc

    import torch

    from .backends.distributed import local_tensor

    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if not torch.is_tensor(obj):
                continue
            t = local_tensor(obj)
            if t.device.type == "meta":
                continue
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        except Exception:  # noqa: BLE001 - odd tensor subclasses
            continue
    return sum(seen.values())


def _fmt(b: float) -> str:
    return f"{b / GIB:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lift_ds.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help=f"HF directory, config.json, or a preset: {', '.join(PRESETS)}")
    p.add_argument("--ranks", type=int, default=8, help="ranks per node")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--zero", type=int, default=3, choices=(0, 1, 2, 3), help="ZeRO stage (3 also stands for FSDP)")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--offload", action="store_true", help="optimizer state on CPU")
    p.add_argument("--micro_batch", type=int, default=1)
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--lora_r", type=int, default=8)
    p.add_argument(
        "--checkpointing", action="store_true", help="activation (gradient) checkpointing: a layer keeps only its input"
    )
    p.add_argument("--gib", type=float, default=80.0, help="memory per rank for the 'largest model that fits' line")
    p.add_argument(
        "--loss",
        default="chunked",
        choices=LOSSES,
        help=("lift.loss: chunked (lift_ds's loss, the default) or model (the model's own: logits at every position)"),
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--frozen_weights",
        default="full",
        choices=("full", *QUANTIZED_BYTES),
        help="LIFT / LoRA: frozen decoder layers quantized",
    )
    p.add_argument(
        "--stream_frozen", action="store_true", help="LIFT: frozen layers streamed (3 on the device at a time)"
    )
    p.add_argument(
        "--optimizer",
        default="adamw",
        choices=("adamw", "adamw8bit"),
        help="adamw8bit: torchao's 8-bit AdamW, no fp32 master",
    )
    p.add_argument(
        "--one_gpu",
        action="store_true",
        help=(
            "which presets fit on one 80 / 48 / 24 / 12 GiB GPU with LIFT (streamed or not, "
            "NF4 or not), LoRA, QLoRA-style LoRA and full fine-tuning (ignores the other options except --seq_len)"
        ),
    )
    args = p.parse_args(argv)
    if args.one_gpu:
        print(one_gpu_table(seq_len=args.seq_len, loss=args.loss))
        return 0
    if args.model is None:
        p.error("--model: required (or --one_gpu)")
    try:
        shape = model_shape(args.model)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = args.ranks * args.nodes
    kw = dict(
        precision=args.precision,
        offload=args.offload,
        micro_batch=args.micro_batch,
        seq_len=args.seq_len,
        lora_r=args.lora_r,
        checkpointing=args.checkpointing,
        loss=args.loss,
    )
    rows = table(shape, n, args.zero, **kw)
    lift_kw = dict(frozen_weights=args.frozen_weights, stream_frozen=args.stream_frozen, optimizer=args.optimizer)
    if any(v != d for v, d in zip(lift_kw.values(), ("full", False, "adamw"))):
        try:
            rows[0] = estimate(shape, "lift", n, args.zero, **kw, **lift_kw)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    fit = largest_fitting(args.gib, n, args.zero, **kw)
    if args.json:
        print(
            json.dumps(
                {
                    "model": shape.name,
                    "params": shape.total,
                    "ranks": n,
                    "zero": args.zero,
                    "rows": [{**asdict(r), "model_states": r.model_states, "total": r.total} for r in rows],
                    "largest_fitting": fit,
                },
                indent=1,
            )
        )
        return 0
    print(
        f"{shape.name}: {shape.total / 1e6:.1f}M parameters, {shape.num_layers} layers; {n} ranks, ZeRO-{args.zero}, "
        f"{args.precision}{', optimizer offload' if args.offload else ''}; "
        f"micro batch {args.micro_batch} x {args.seq_len}\n"
    )
    print(
        "| method | trained params | params GiB | grads GiB | optimizer "
        "GiB | model states GiB | activations GiB | total GiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        opt = _fmt(r.optimizer) + (" (CPU)" if r.optimizer_on_cpu else "")
        print(
            f"| {r.method} | {r.trained / 1e6:.1f}M | {_fmt(r.params)} | {_fmt(r.grads)} "
            f"| {opt} | {_fmt(r.model_states)} | {_fmt(r.activations)} | {_fmt(r.total)} |"
        )
    full, lift = rows[1], rows[0]
    chunked, own = (logits_bytes(shape, args.seq_len, args.micro_batch, args.precision, loss) for loss in LOSSES)
    print(
        "\nlogits (in the activations, per micro-batch): "
        f"{_fmt(chunked)} GiB with lift.loss chunked, {_fmt(own)} GiB with the "
        f"model's own loss (lift.loss model): {_fmt(own - chunked)} GiB less; counted here: {args.loss}"
    )
    print(f"model states, full / LIFT: {full.model_states / lift.model_states:.2f}x")
    if args.zero in (2, 3):
        print(
            f"DeepSpeed's own estimate for full fine-tuning (ZeRO-{args.zero}): "
            f"{_fmt(deepspeed_full_estimate(shape, args.ranks, args.nodes, args.zero, args.offload))} GiB per rank"
        )
    print(
        f"largest preset that fits in {args.gib:g} GiB per rank: "
        + ", ".join(f"{m}: {v or 'none'}" for m, v in fit.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
