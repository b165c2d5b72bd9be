"""LIFT, BAdam and LISA inside axolotl: one line in the YAML.

    plugins:
      - lift_ds.integrations.axolotl.LiftPlugin
    lift:                      # optional: the keys of lift_ds's "lift" section (defaults: LIFT over every layer)
      method: lisa
      lisa_layers: 2
      switch_every: 10
    deepspeed: zero2.json      # or fsdp_version: 2 + fsdp_config, or neither

axolotl then builds the trainer class it would have built (``AxolotlTrainer`` or the class its config
selects) with :class:`~lift_ds.integrations.transformers.LiftTrainerMixin` in front, so training runs
through lift_ds's engine: one unit of blocks trains per phase and the DeepSpeed engine (or FSDP2
optimizer) is rebuilt over it, so each rank holds optimizer state for its share of the active unit
only. axolotl's dataset loading, prompt formats, tokenization, evaluation, checkpoint directories
(``output_dir/checkpoint-N``, ``resume_from_checkpoint``, ``auto_resume_from_checkpoints``) and final
save stay axolotl's. The ``lift`` section may instead be the ``"lift"`` section of the DeepSpeed JSON the
YAML names. Settings LIFT cannot honour (axolotl's own ``lisa_*``, ``relora``, ``unfrozen_parameters``,
adapters, ``layer_offloading``, ...) are refused when axolotl validates the config
(:mod:`lift_ds.integrations.axolotl_args`).

This module imports without axolotl; ``LiftPlugin`` is built on first access (it subclasses axolotl's
``BasePlugin``), so it needs axolotl installed. See docs/axolotl.md.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

from ..errors import ConfigError
from ..utils import get_logger
from .axolotl_args import PLUGIN_NAME, lift_config
from .transformers import LiftTrainerMixin

__all__ = ["LiftPlugin", "lift_config", "lift_trainer_class"]  # noqa: F822 (LiftPlugin: built by __getattr__)

logger = get_logger(__name__)

ARGS_NAME = "lift_ds.integrations.axolotl_args.LiftArgs"


def axolotl_trainer_class(cfg: Any) -> type:
    """The trainer class axolotl's causal builder picks for ``cfg`` when no plugin picks one."""
    from axolotl.core.builders import HFCausalTrainerBuilder
    from axolotl.utils.dict import DictDefault

    probe = SimpleNamespace(cfg=DictDefault({**cfg, "plugins": None}))
    return HFCausalTrainerBuilder._get_trainer_cls(probe)


class _AxolotlLift:
    """Hands the plugin's lift_ds config to :class:`LiftTrainerMixin` (axolotl builds the trainer
    with its own keyword arguments only)."""

    _lift_source: Any = None
    #: axolotl configures FSDP through TrainingArguments (its final save reads the accelerator's FSDP
    #: plugin); lift_ds's FSDP2 backend does the sharding, so the mixin accepts it here
    lift_fsdp_from_args = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("lift_config", copy.deepcopy(self._lift_source))
        super().__init__(*args, **kwargs)


def lift_trainer_class(cfg: Any, base: type | None = None) -> type:
    """``LiftTrainerMixin`` composed with the trainer class axolotl would build for ``cfg``."""
    base = base or axolotl_trainer_class(cfg)
    if issubclass(base, LiftTrainerMixin):
        return base
    return type(
        f"Lift{base.__name__}",
        (_AxolotlLift, LiftTrainerMixin, base),
        {
            "_lift_source": lift_config(cfg),
            "__module__": __name__,
            "__doc__": f"axolotl's ``{base.__name__}`` training through lift_ds's engine (LiftPlugin).",
        },
    )


class _LiftPluginHooks:
    """The hooks of ``LiftPlugin`` (axolotl's ``BasePlugin`` supplies every other hook)."""

    def get_input_args(self) -> str:
        return ARGS_NAME

    def load_datasets(self, cfg: Any, preprocess: bool = False) -> None:
        # the first hook after axolotl's normalize_config: on a host without an accelerator, axolotl
        # 0.19 still maps each rank's model to accelerator index LOCAL_RANK ({"": 0}), which
        # transformers cannot load; keep it on the CPU (no effect where a GPU is found)
        if (
            cfg.get("device") == "cpu"
            and isinstance(cfg.get("device_map"), dict)
            and any(isinstance(v, int) and not isinstance(v, bool) for v in cfg["device_map"].values())
        ):
            cfg["device_map"] = {"": "cpu"}
        return None  # axolotl loads the datasets

    def get_trainer_cls(self, cfg: Any) -> type:
        return lift_trainer_class(cfg)

    def get_training_args(self, cfg: Any) -> dict[str, Any]:
        # axolotl turns load_best_model_at_end on by itself when eval and save steps line up
        return {"load_best_model_at_end": False}

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        if not isinstance(trainer, LiftTrainerMixin):
            raise ConfigError(
                [
                    f"plugins: another plugin chose the trainer class ({type(trainer).__name__}) before {PLUGIN_NAME}; "
                    "list LiftPlugin first, or remove the other plugin"
                ],
                source="axolotl config",
            )
        logger.info(
            "LIFT: %s trains through lift_ds (method %s)",
            type(trainer).__name__,
            (trainer.lift_config_source.get("lift") or {}).get("method", "lift"),
        )


def _build_plugin() -> type:
    from axolotl.integrations.base import BasePlugin

    return type(
        "LiftPlugin",
        (_LiftPluginHooks, BasePlugin),
        {
            "__module__": __name__,
            "__doc__": (
                "axolotl plugin: the trainer axolotl builds runs through lift_ds's engine (LIFT, "
                "BAdam or LISA; see the module docstring)."
            ),
        },
    )


def __getattr__(name: str) -> Any:
    if name == "LiftPlugin":  # axolotl is optional: built on first use
        try:
            cls = _build_plugin()
        except ImportError as e:
            raise ImportError(
                f"lift_ds.integrations.axolotl.LiftPlugin needs axolotl installed ({e}); see docs/axolotl.md"
            ) from e
        globals()["LiftPlugin"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
