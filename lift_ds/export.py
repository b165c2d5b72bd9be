"""Write a consolidated Hugging Face checkpoint from a LIFT engine (gathered from ZeRO-3 partitions)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .engine import LiftEngine
from .utils import get_logger

logger = get_logger(__name__)


def save_hf_checkpoint(engine: LiftEngine, output_dir: str | os.PathLike, tokenizer: Any = None) -> Path | None:
    """Save ``engine.module`` as a plain Hugging Face directory (safetensors + config [+ tokenizer]).

    With Q-LIFT (``lift.frozen_weights``) the quantized layers' weights come from the block store:
    every trained layer exactly as trained, every other one as the run started.

    Collective: every rank must call it (ZeRO-3 parameters are gathered one at a time); rank 0
    writes. ``AutoModelForCausalLM.from_pretrained(output_dir)`` loads the result.

    Returns:
        The directory on rank 0, None on the other ranks.
    """
    state = engine.backend.full_state_dict()
    engine.backend.barrier()
    if engine.rank != 0:
        engine.backend.barrier()
        return None
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = engine.module
    if not hasattr(model, "save_pretrained"):
        raise TypeError(
            f"{type(model).__name__} is not a Hugging Face model (no save_pretrained); "
            "save engine.backend.full_state_dict() yourself"
        )
    if engine.quant is not None:
        # Q-LIFT: the exact weights of quantized layers come from the block store, a shard per layer
        from .quant import write_hf_shards

        model.config.save_pretrained(str(out))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(out))
        write_hf_shards(out, state, engine.quant)
    else:
        model.save_pretrained(str(out), state_dict=state, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    logger.info("wrote Hugging Face checkpoint to %s (%d tensors)", out, len(state))
    engine.backend.barrier()
    return out
