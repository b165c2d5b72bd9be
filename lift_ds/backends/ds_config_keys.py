"""DeepSpeed's configuration vocabulary and the zero_optimization checks, run before any process group starts.

The top-level keys DeepSpeed reads (for the misspelled-key suggestion) and its own pydantic models of
the sections lift_ds validates up front. Private details like :mod:`lift_ds.backends.compat`'s: the
key list is checked against the installed DeepSpeed by tests/test_config.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

OFFLOAD_DEVICES = ("none", "cpu", "nvme")
#: optimizer types DeepSpeed can run offloaded (DeepSpeedCPUAdam, DeepSpeedCPUAdagrad, DeepSpeedCPULion)
OFFLOADABLE_OPTIMIZERS = ("adam", "adamw", "adagrad", "lion")

#: DeepSpeed 0.19's top-level config keys (``DeepSpeedConfig`` and the modules it calls read them;
#: tests/distributed/test_compat.py checks every key the installed DeepSpeed reads is listed). Used to
#: suggest the key a misspelled one meant (:func:`lift_ds.config_scan.misspelled_top_level`).
DEEPSPEED_TOP_LEVEL_KEYS = (
    "activation_checkpointing",
    "aio",
    "amp",
    "autotuning",
    "bf16",
    "bfloat16",
    "checkpoint",
    "comet",
    "comms_logger",
    "communication_data_type",
    "compile",
    "compression_training",
    "csv_monitor",
    "curriculum_learning",
    "data_efficiency",
    "data_types",
    "dataloader_drop_last",
    "datastates_ckpt",
    "disable_allgather",
    "disable_python_gc",
    "dump_state",
    "eigenvalue",
    "elasticity",
    "expert_parallel",
    "flops_profiler",
    "fp16",
    "gradient_accumulation_steps",
    "gradient_allreduce_op",
    "gradient_clipping",
    "gradient_predivide_factor",
    "graph_harvesting",
    "hybrid_engine",
    "log_level",
    "managed_gradient_accumulation",
    "memory_breakdown",
    "nebula",
    "optimizer",
    "pipeline",
    "prescale_gradients",
    "progressive_layer_drop",
    "quantize_training",
    "scheduler",
    "seq_parallel_communication_data_type",
    "sparse_attention",
    "sparse_gradients",
    "steps_per_print",
    "tensor_parallel",
    "tensorboard",
    "timers",
    "torch_autocast",
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "use_data_before_expert_parallelism",
    "vocabulary_size",
    "wall_clock_breakdown",
    "wandb",
    "weight_quantization",
    "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer",
    "zero_optimization",
)


def known_top_level_keys() -> tuple[str, ...]:
    """Every top-level key a lift_ds config may hold: DeepSpeed's and lift_ds's own sections."""
    return (*DEEPSPEED_TOP_LEVEL_KEYS, "lift", "fsdp")


def deepspeed_read_top_level_keys() -> set[str]:
    """The top-level keys the installed DeepSpeed's ``DeepSpeedConfig`` reads (recorded while it
    parses a minimal config; no process group). For the compat test of :data:`DEEPSPEED_TOP_LEVEL_KEYS`."""
    from deepspeed.runtime.config import DeepSpeedConfig

    seen: set[str] = set()

    class Recording(dict):
        def get(self, k: Any, d: Any = None) -> Any:
            seen.add(k)
            return super().get(k, d)

        def __getitem__(self, k: Any) -> Any:
            seen.add(k)
            return super().__getitem__(k)

        def __contains__(self, k: Any) -> bool:
            seen.add(k)
            return super().__contains__(k)

    DeepSpeedConfig(Recording({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}))
    return {k for k in seen if isinstance(k, str)}


def _section_models() -> dict[str, Any]:
    """DeepSpeed's own pydantic models of the sections lift_ds validates up front."""
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return {"zero_optimization": DeepSpeedZeroConfig, "bf16": DeepSpeedBF16Config, "fp16": DeepSpeedFP16Config}


def section_problems(raw: Any, sections: tuple[str, ...], reported: tuple[str, ...] = ()) -> list[str]:
    """Validate config ``sections`` with DeepSpeed's own pydantic models (what ``deepspeed.initialize``
    would refuse only after the process group started), one problem per field, named by its JSON
    path; fields under a path in ``reported`` (already refused with a better message) are skipped."""
    from pydantic import ValidationError

    models = _section_models()
    problems = []
    for key in sections:
        value = raw.get(key)
        if not isinstance(value, dict):
            continue
        try:
            models[key](**value)
        except ValidationError as e:
            for err in e.errors():
                path = ".".join([key, *(str(x) for x in err["loc"])]) if err["loc"] else key
                if any(path == r or path.startswith(r + ".") for r in reported):
                    continue
                got = err.get("input")
                hint = (
                    (
                        ' ("auto" sizes are filled in by Hugging Face\'s own DeepSpeed integration, '
                        "which lift_ds does not use; give a number)"
                    )
                    if got == "auto"
                    else ""
                )
                what = err["msg"]
                if err["type"] == "extra_forbidden":
                    import difflib

                    fields = [a for n, f in models[key].model_fields.items() for a in (n, f.alias) if a]
                    close = difflib.get_close_matches(str(err["loc"][-1]), fields, n=1, cutoff=0.75)
                    what = "unknown key" + (f' (did you mean "{close[0]}"?)' if close else "")
                problems.append(f"{path}: {what}, got {got!r}{hint} (DeepSpeed's {models[key].__name__})")
        except (TypeError, ValueError, AssertionError) as e:  # a validator that raises outside pydantic
            problems.append(f"{key}: {e} (DeepSpeed's {models[key].__name__})")
    return problems


def zero_problems(zero: Any, raw: Mapping[str, Any]) -> list[str]:
    """The ``zero_optimization`` keys DeepSpeed would only reject after its process group started
    (or silently mis-handle)."""
    if not isinstance(zero, Mapping):
        return [f'zero_optimization: must be an object like {{"stage": 2}}, got {zero!r}']
    problems = []
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        problems.append(f"zero_optimization.stage: got {stage!r}; allowed: 0, 1, 2, 3")
    for key in ("offload_optimizer", "offload_param"):
        sec = zero.get(key)
        if sec is None:
            continue
        if not isinstance(sec, Mapping):
            problems.append(f'zero_optimization.{key}: must be an object like {{"device": "cpu"}}, got {sec!r}')
            continue
        dev = sec.get("device", "none") or "none"
        if dev not in OFFLOAD_DEVICES:
            problems.append(f"zero_optimization.{key}.device: got {dev!r}; allowed: {', '.join(OFFLOAD_DEVICES)}")
            continue
        if dev == "none":
            continue
        if dev == "nvme" and not sec.get("nvme_path"):
            problems.append(
                f'zero_optimization.{key}.nvme_path: required with device "nvme" (a directory on a local NVMe drive)'
            )
        if key == "offload_param" and stage != 3:
            problems.append(
                "zero_optimization.offload_param: only ZeRO stage 3 offloads "
                f"parameters (stage is {stage!r}); use offload_optimizer, or stage 3"
            )
        if key == "offload_optimizer":
            if stage not in (1, 2, 3):
                problems.append(f"zero_optimization.offload_optimizer: needs ZeRO stage 1, 2 or 3 (stage is {stage!r})")
            # absent: the optimizer is the client's (lift_ds.initialize checks it: client_optimizer_problems)
            opt = raw.get("optimizer")
            kind = opt.get("type") if isinstance(opt, Mapping) else None
            if opt is not None and (not isinstance(kind, str) or kind.lower() not in OFFLOADABLE_OPTIMIZERS):
                problems.append(
                    f"zero_optimization.offload_optimizer: DeepSpeed runs an offloaded optimizer with its CPU ops "
                    "(DeepSpeedCPUAdam, -Adagrad, -Lion); "
                    f"optimizer.type {kind!r} has none. Use Adam, AdamW, Adagrad or Lion, "
                    "or remove the offload"
                )
    return problems


def offloaded(zero: Mapping[str, Any], key: str) -> bool:
    sec = zero.get(key) or {}
    return isinstance(sec, Mapping) and (sec.get("device") or "none") != "none"


#: the client optimizers DeepSpeed runs over offloaded partitions without ``zero_force_ds_cpu_optimizer: false``
CPU_OP_OPTIMIZERS = ("DeepSpeedCPUAdam", "DeepSpeedCPUAdagrad", "DeepSpeedCPULion")


def client_offload_problems(raw: Mapping[str, Any], optimizer_class: str) -> list[str]:
    """A client optimizer (``optimizer=`` of ``initialize``) with ``offload_optimizer``, judged as DeepSpeed does in
    ``deepspeed.initialize`` (after its process group started): one of its CPU ops, or
    ``zero_force_ds_cpu_optimizer: false``."""
    zero = raw.get("zero_optimization")
    if (
        not isinstance(zero, Mapping)
        or not offloaded(zero, "offload_optimizer")
        or optimizer_class in CPU_OP_OPTIMIZERS
    ):
        return []
    if raw.get("zero_force_ds_cpu_optimizer", True) is False:
        return []
    return [
        f"optimizer: {optimizer_class} given with zero_optimization.offload_optimizer; "
        "DeepSpeed runs a client optimizer over "
        f"offloaded partitions only when it is one of {', '.join(CPU_OP_OPTIMIZERS)} (deepspeed.ops), or with "
        '"zero_force_ds_cpu_optimizer": false (then it steps on the CPU partitions as given)'
    ]
