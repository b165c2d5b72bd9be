"""What launch/train.py checks before any weight is loaded or any process group starts: the output
directory, the model and tokenizer directories (or hub ids), and whether the run fits in memory.

Each problem is one line naming the flag, what was given and what to do (collected into the
launcher's one :class:`~lift_ds.errors.ConfigError`, exit 2).

- ``--output_dir``: not a file, not under a file, writable, and either empty, or continued with
  ``--resume``, or cleared of lift_ds's outputs with ``--overwrite_output_dir`` (the Hugging Face
  name); enough free space for a checkpoint and the final model.
- ``--model`` / ``--tokenizer``: a local Hugging Face directory with a readable ``config.json`` of an
  architecture transformers knows, weights (unless ``--random_init``) and tokenizer files; or a hub
  id, fetched once into the Hugging Face cache where the hub is reachable (``HF_HUB_OFFLINE=1``
  honoured: only the cache), safetensors only, nothing executable.
- Memory: the estimated peak host memory of this node's ranks (and device memory per rank on a GPU),
  from :mod:`lift_ds.memory`, against what the machine has; over it is refused with the estimate and
  the fix, unless ``--skip_memory_check``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .memory import GIB

#: what lift_ds writes into --output_dir (removed by --overwrite_output_dir, nothing else is)
OUTPUTS = ("checkpoints", "metrics.jsonl", "final", "result.json", "tensorboard")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
#: a hub snapshot brings configs, safetensors weights and tokenizer files: never code or pickles
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


#: the name prefix of the file each rank writes (and removes) to test that a directory is writable
WRITE_PROBE = ".lift_ds_write_test"


def writable_dir_problems(path: str, flag: str) -> list[str]:
    """A directory lift_ds will create or write into: not a file, not under a file, writable."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        return [f"{flag}: {str(out)!r} is a file, not a directory; give a directory"]
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return [f"{flag}: {str(out)!r} lies under {str(probe)!r}, which is a file, not a directory"]
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=WRITE_PROBE)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        return [f"{flag}: cannot write in {str(probe)!r} ({e.strerror or e}); give a writable directory"]
    return []


def output_dir_problems(args: Any) -> list[str]:
    """``--output_dir`` problems (before any process group; ``args`` is the launcher's namespace)."""
    out = Path(args.output_dir)
    problems = writable_dir_problems(args.output_dir, "--output_dir")
    if problems:
        return problems
    if args.resume and args.overwrite_output_dir:
        problems.append(
            "--overwrite_output_dir: contradicts --resume (one replaces "
            "what --output_dir holds, the other continues it); drop one"
        )
    elif (
        out.is_dir()
        and not args.resume
        and not args.overwrite_output_dir
        and int(os.environ.get("RANK", "0") or 0) == 0
    ):
        # rank 0 only: the other ranks start at their own pace, and would see what rank 0 (or another
        # rank's write probe) has just put there; rank 0's refusal ends the job before any process group
        held = sorted(p.name for p in out.iterdir() if not p.name.startswith(WRITE_PROBE))
        if held:
            shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
            problems.append(
                f"--output_dir: {str(out)!r} is not empty ({shown}) "
                "and --resume is not given: a new run would mix its metrics "
                "and checkpoints with what is there. Continue that run with --resume, "
                "choose another --output_dir, or pass "
                f"--overwrite_output_dir to replace lift_ds's outputs in it ({', '.join(OUTPUTS)})"
            )
    return problems


def clear_outputs(out: Path) -> list[str]:
    """``--overwrite_output_dir``: remove lift_ds's outputs from ``out`` (rank 0); returns what went."""
    gone = []
    for name in OUTPUTS:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        gone.append(name)
    return gone


def _looks_like_path(value: str) -> bool:
    return value.startswith((".", "/", "~")) or os.path.sep in value and not _HUB_ID.match(value)


def resolve_dir(value: str, flag: str, tokenizer_only: bool = False) -> tuple[str, list[str]]:
    """``(local directory, problems)`` for a ``--model`` / ``--tokenizer`` value: a local directory
    as it is; a hub id fetched into (or, with HF_HUB_OFFLINE=1, found in) the Hugging Face cache."""
    if Path(value).expanduser().is_dir():
        return str(Path(value).expanduser()), []
    if Path(value).expanduser().exists():
        return value, [
            f"{flag}: {value!r} is a file; "
            f"give the {'tokenizer' if tokenizer_only else 'model'}'s directory (or a hub id)"
        ]
    if _looks_like_path(value) or not _HUB_ID.match(value):
        return value, [
            f"{flag}: directory {value!r} does not exist (give a "
            "local Hugging Face directory or a hub id like org/name)"
        ]
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # read now, not when huggingface_hub was imported: HF_HUB_OFFLINE and the cache location as they are
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    cache = os.environ.get("HF_HUB_CACHE") or (
        str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME") else None
    )
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.model", "*.txt", "*.tiktoken"] if tokenizer_only else HUB_FILES
        return snapshot_download(value, allow_patterns=patterns, cache_dir=cache, local_files_only=offline), []
    except Exception as e:  # noqa: BLE001 - every way the hub can fail ends the same way here
        why = " ".join(str(e).split())[:200]
        where = (
            "HF_HUB_OFFLINE is set, so only the local cache was searched"
            if offline
            else "the hub could not be reached or has no such repository"
        )
        return value, [
            f"{flag}: {value!r} is not a local directory, "
            f"and as a Hugging Face hub id it could not be fetched ({where}: "
            f"{type(e).__name__}: {why}). Give a local directory, or download it where the hub is reachable "
            f"(huggingface-cli download {value}) and run with that cache (HF_HOME)"
        ]


def model_dir_problems(model_dir: str, random_init: bool) -> list[str]:
    """A model directory's files, read without transformers: config.json, weights, shard index."""
    d = Path(model_dir)
    cfg = d / "config.json"
    if not cfg.is_file():
        return [
            f"--model: {model_dir!r} has no config.json (a Hugging Face model directory, as save_pretrained writes it)"
        ]
    try:
        config = json.loads(cfg.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        return [f"--model: {cfg} is not a valid config.json ({e})"]
    if "model_type" not in config:
        return [f'--model: {cfg} has no "model_type" (the architecture, e.g. "llama")']
    if random_init:
        return []
    weights = sorted(
        p.name for p in d.iterdir() if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")
    )
    if not weights:
        return [
            f"--model: {model_dir!r} has no weights (*.safetensors); "
            "give a directory with them, or --random_init for fresh weights"
        ]
    for index in (d / n for n in weights if n.endswith(".index.json")):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return [f"--model: {index} is not a valid shard index ({e})"]
        missing = sorted(s for s in shards if not (d / s).is_file() or "/" in s or s.startswith("."))
        if missing:
            return [f"--model: {index.name} names shard(s) {', '.join(missing[:3])} that {model_dir!r} does not hold"]
    return []


def tokenizer_dir_problems(tok_dir: str, flag: str) -> list[str]:
    d = Path(tok_dir)
    if not any((d / n).is_file() for n in TOKENIZER_FILES) and not (d / "merges.txt").is_file():
        return [
            f"{flag}: {tok_dir!r} holds no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
            "give --tokenizer a directory that does"
        ]
    return []


def config_problems(model_dir: str) -> list[str]:
    """The model's config as transformers reads it (an unknown ``model_type``, values it refuses),
    and its shapes, before the tokenizer (which reads it too) or any weight is loaded."""
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001 - transformers' many ways of refusing a config
        return [
            f"--model: transformers cannot read {str(Path(model_dir) / 'config.json')!r}: "
            f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        ]
    return architecture_problems(cfg)


def architecture_problems(model_or_config: Any, flag: str = "--model") -> list[str]:
    """Shapes a model's config must have for its forward to work."""
    cfg = getattr(model_or_config, "config", model_or_config)
    problems = []
    hidden, heads = getattr(cfg, "hidden_size", None), getattr(cfg, "num_attention_heads", None)
    kv = getattr(cfg, "num_key_value_heads", None)
    if (
        isinstance(hidden, int)
        and isinstance(heads, int)
        and heads > 0
        and getattr(cfg, "head_dim", None) is None
        and hidden % heads
    ):
        problems.append(f"{flag}: hidden_size {hidden} is not divisible by num_attention_heads {heads} (config.json)")
    if isinstance(heads, int) and isinstance(kv, int) and kv > 0 and heads % kv:
        problems.append(
            f"{flag}: num_attention_heads {heads} is not divisible by num_key_value_heads {kv} (config.json)"
        )
    return problems


def position_limit(model: Any) -> int | None:
    """The longest sequence a model with learned absolute positions can take (None: no table)."""
    import torch

    sizes = [
        m.num_embeddings
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Embedding) and ("position" in n or n.endswith("wpe"))
    ]
    return min(sizes) if sizes else None


def machine_memory() -> tuple[int | None, str]:
    """``(bytes, what)``: this machine's physical memory, or its cgroup limit when lower."""
    total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    what = "physical memory"
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit() and (total is None or int(limit) < total):
            total, what = int(limit), "cgroup memory limit"
    except OSError:
        pass
    return total, what


#: resident memory of a rank before its model (Python, torch, transformers, DeepSpeed): 0.8 GiB, from the
#: LLaMA-2-7B NF4 run's 4.37 GiB after its build less its 3.6 GiB of tensors (docs/qlift/llama2_7b_nf4.json)
RUNTIME_BYTES = 0.8 * GIB


def host_estimate(
    shape: Any,
    method: str,
    ranks: int,
    local_ranks: int,
    zero: int,
    precision: str,
    offload: bool,
    micro_batch: int,
    seq_len: int,
    lora_r: int,
    checkpointing: bool,
    frozen: str,
    store: str,
    on_gpu: bool,
) -> tuple[float, list[tuple[str, float]]]:
    """``(bytes on this node, [(part, bytes per rank)])``: the peak host memory of the launcher's run
    (each rank builds the model in fp32 first; Q-LIFT layer by layer)."""
    from .memory import QUANTIZED_BYTES, estimate

    est = estimate(
        shape,
        "lift" if method in ("lift", "badam", "lisa") else method,
        ranks,
        zero,
        precision,
        offload,
        micro_batch,
        seq_len,
        lora_r,
        checkpointing,
        frozen_weights=frozen if zero < 3 else "full",
    )
    parts: list[tuple[str, float]] = [("Python, torch and libraries", RUNTIME_BYTES)]
    if frozen != "full":
        quantized = shape.layer_linear
        store_w = 2 if precision in ("bf16", "fp16") else 4
        parts.append(
            (
                "quantized model and what stays in full precision",
                quantized * QUANTIZED_BYTES[frozen] + store_w * (shape.total - quantized),
            )
        )
        layer = max(shape.layer_sizes) if shape.layer_sizes else 0
        parts.append(
            (
                "Q-LIFT block store in memory" if store == "memory" else "one layer read from the disk block store",
                store_w * (quantized if store == "memory" else layer),
            )
        )
    else:
        parts.append(("model as loaded (fp32)", 4.0 * shape.total))
    if not on_gpu:
        parts += [("gradients and optimizer state", est.grads + est.optimizer), ("activations", est.activations)]
    elif est.optimizer_on_cpu:
        parts.append(("optimizer state offloaded to CPU", est.optimizer))
    return local_ranks * sum(b for _, b in parts), parts


def memory_problems(
    total_bytes: float, parts: list[tuple[str, float]], local_ranks: int, frozen: str, store: str, zero: int
) -> list[str]:
    """The refusal when the estimate does not fit, with the fix (empty when it fits or is unknown)."""
    have, what = machine_memory()
    if have is None or total_bytes <= have:
        return []
    detail = ", ".join(f"{name} {b / GIB:.1f} GiB" for name, b in parts)
    fixes = []
    if frozen != "full" and store == "memory":
        fixes.append("--block_store disk (the exact weights on disk, one layer in memory)")
    if frozen == "full":
        fixes.append("--frozen_weights nf4 --block_store disk (Q-LIFT: frozen layers held in 4 bits)")
    if local_ranks > 1:
        fixes.append("fewer ranks on this node")
    if zero < 3:
        fixes.append("ZeRO-3 (ds_configs/zero3.json) to partition states across ranks")
    fixes.append("a smaller --micro_batch_size or --seq_len, or --gradient_checkpointing")
    return [
        f"memory: the estimated peak host memory is {total_bytes / GIB:.1f} "
        f"GiB ({local_ranks} rank(s) on this node, each: {detail}; "
        f"lift_ds.memory's estimate), more than this machine's {have / GIB:.1f} GiB ({what}). Fix: {'; '.join(fixes)}. "
        "Or pass --skip_memory_check to run anyway"
    ]


def data_fit_problems(
    model: Any, data: Any, pad_id: int | None, seq_len: int, batch: tuple[int, int, int] | None = None
) -> list[str]:
    """The tokenized data fits the model: every token id (and the pad id) has an embedding row, and
    no sequence is longer than a learned position table."""
    rows = model.get_input_embeddings().num_embeddings
    seqs = list(data.train.input_ids) + (list(data.held.input_ids) if data.held is not None else [])
    top = max((max(s) for s in seqs if s), default=-1)
    problems = []
    if top >= rows or (pad_id is not None and pad_id >= rows):
        problems.append(
            f"--tokenizer: the data has token ids up to {max(top, pad_id or -1)}, "
            f"but the model's embedding has {rows} rows "
            "(the tokenizer is larger than the model's vocabulary); use the model's own tokenizer"
        )
    if batch is not None and len(data.train.input_ids) < batch[0] * batch[1] * batch[2]:
        problems.append(
            f"--micro_batch_size: {len(data.train.input_ids)} training "
            f"examples are fewer than one global batch ({batch[0]} x "
            f"{batch[1]} accumulation step(s) x {batch[2]} ranks); "
            "lower the micro batch or the accumulation, or add data"
        )
    limit = position_limit(model)
    longest = max((len(s) for s in seqs), default=0)
    if limit is not None and longest > limit:
        problems.append(
            f"--seq_len: sequences of up to {longest} tokens, "
            f"but the model has {limit} learned positions; set --seq_len {limit}"
        )
    return problems


def resource_problems(args: Any, config: Any, model_dir: str, model: Any) -> list[str]:
    """Memory (host, and device on a GPU) and disk space for the run, from the meta model's sizes."""
    import torch

    from .backends import get_backend_class
    from .memory import model_shape

    problems = []
    total = sum(p.numel() for p in model.parameters())
    trained = max((sum(p.numel() for p in m.parameters()) for m in _layers(model)), default=total)
    need = (0 if args.no_checkpoint else 4 * total + 12 * trained) + (0 if args.no_final_model else 4 * total)
    out = Path(args.output_dir)
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    if free < need:
        problems.append(
            f"--output_dir: {str(probe)!r} has {free / GIB:.1f} GiB free; "
            f"this run writes about {need / GIB:.1f} GiB (a checkpoint "
            "and the final model); free space or choose another "
            "--output_dir (--no_checkpoint / --no_final_model write less)"
        )
    if args.skip_memory_check:
        return problems
    try:
        shape = model_shape(model_dir, config.lift)
    except Exception:  # noqa: BLE001 - not a causal LM lift_ds.memory can lay out: no estimate
        return problems
    zero, offload = get_backend_class(config.backend).planned_memory_layout(config.backend_options)
    world = config.world_size
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    t = config.training
    on_gpu = torch.cuda.is_available()
    kind = args.baseline or args.method  # full / lora, else lift.method
    host, parts = host_estimate(
        shape,
        kind,
        world,
        local,
        zero,
        t.precision,
        offload,
        t.micro_batch_size,
        args.seq_len,
        args.lora_r,
        config.lift.gradient_checkpointing,
        config.lift.frozen_weights,
        config.lift.block_store,
        on_gpu,
    )
    problems += memory_problems(host, parts, local, config.lift.frozen_weights, config.lift.block_store, zero)
    if on_gpu:
        from .memory import estimate

        est = estimate(
            shape,
            "lift" if kind in ("lift", "badam", "lisa") else kind,
            world,
            zero,
            t.precision,
            offload,
            t.micro_batch_size,
            args.seq_len,
            args.lora_r,
            config.lift.gradient_checkpointing,
            frozen_weights=config.lift.frozen_weights if zero < 3 else "full",
        )
        device = torch.cuda.get_device_properties(
            int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        ).total_memory
        if est.total > device:
            problems.append(
                f"memory: the estimated peak device memory per rank is {est.total / GIB:.1f} GiB (model states "
                f"{est.model_states / GIB:.1f}, activations {est.activations / GIB:.1f}), "
                f"more than the GPU's {device / GIB:.1f} "
                "GiB. Fix: ZeRO-3 or optimizer offload (ds_configs/zero3_offload.json), "
                "more ranks, --gradient_checkpointing, a "
                "smaller --micro_batch_size / --seq_len, or --frozen_weights nf4; or --skip_memory_check"
            )
    return problems


def _layers(model: Any) -> list[Any]:
    from .blocks import find_layer_stack

    try:
        return list(find_layer_stack(model)[1])
    except Exception:  # noqa: BLE001
        return []


def data_digest(data: Any) -> str:
    """SHA-256 of a tokenized training set (ids and labels, in order): the data a run trains on."""
    import hashlib
    from array import array

    h = hashlib.sha256()
    for ids, labels in zip(data.input_ids, data.labels):
        h.update(array("q", ids).tobytes())
        h.update(array("q", labels if isinstance(labels, list) else [labels]).tobytes())
        h.update(b"|")
    return h.hexdigest()[:32]


def model_identity(model_dir: str, random_init: bool) -> str:
    """A digest of a model directory: its config.json, and each weight file's name, size and first
    and last MiB (cheap at any size: the weights of a 70B model are not read whole)."""
    import hashlib

    d = Path(model_dir)
    h = hashlib.sha256((d / "config.json").read_bytes() if (d / "config.json").is_file() else b"")
    h.update(b"random_init" if random_init else b"")
    for p in [] if random_init else sorted(d.glob("*.safetensors")):
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
    return h.hexdigest()[:32]
