"""LiftPlugin's config side, without axolotl (the project venv): the pydantic input args axolotl merges
into its schema, the settings refused at validation, and the lift_ds config built from an axolotl
config. The plugin inside a real ``axolotl train`` is tests/distributed/test_axolotl.py."""

from __future__ import annotations

import importlib.util
import json

import pytest
from pydantic import ValidationError

from lift_ds.integrations import axolotl as plugin_module
from lift_ds.integrations.axolotl_args import _CONFLICTS, PLUGIN_NAME, LiftArgs, conflicts, lift_config

BASE = {"plugins": [PLUGIN_NAME], "base_model": "m", "micro_batch_size": 2}


def test_the_module_imports_without_axolotl_and_says_what_the_plugin_needs():
    if importlib.util.find_spec("axolotl") is not None:
        pytest.skip("axolotl is installed here")
    with pytest.raises(ImportError, match="LiftPlugin needs axolotl installed"):
        plugin_module.LiftPlugin  # noqa: B018
    assert plugin_module.lift_trainer_class and plugin_module.ARGS_NAME == "lift_ds.integrations.axolotl_args.LiftArgs"


@pytest.mark.parametrize("key", sorted(_CONFLICTS))
def test_every_conflicting_axolotl_setting_is_named(key):
    problems = conflicts({**BASE, key: 3})
    assert len(problems) == 1 and problems[0].startswith(f"{key}: 3 is set; "), problems
    with pytest.raises(ValidationError, match=rf"{PLUGIN_NAME} cannot run this config, 1 problem\(s\):\n  - {key}: "):
        LiftArgs.model_validate({**BASE, key: 3})


@pytest.mark.parametrize("value", [None, False, 0, [], {}])
def test_off_values_of_those_settings_are_fine(value):
    assert conflicts({**BASE, "adapter": value, "lisa_n_layers": value, "unfrozen_parameters": value}) == []


def test_every_problem_at_once_and_only_for_configs_that_use_the_plugin():
    cfg = {
        **BASE,
        "lisa_n_layers": 2,
        "lisa_step_interval": 5,
        "adapter": "lora",
        "unfrozen_parameters": ["lm_head.*"],
        "relora": True,
        "layer_offloading": True,
        "optimizer": "adamw_bnb_8bit",
        "lr_scheduler": "one_cycle",
        "tensor_parallel_size": 2,
    }
    problems = conflicts(cfg)
    for key in (
        "lisa_n_layers",
        "lisa_step_interval",
        "adapter",
        "unfrozen_parameters",
        "relora",
        "layer_offloading",
        "optimizer",
        "lr_scheduler",
        "tensor_parallel_size",
    ):
        assert any(p.startswith(f"{key}: ") for p in problems), key
    assert len(problems) == 9
    LiftArgs.model_validate({**cfg, "plugins": ["some.other.Plugin"]})  # the checks belong to LiftPlugin's configs only
    assert conflicts({**BASE, "optimizer": "adamw_torch_fused", "lr_scheduler": "cosine"}) == []


def test_backends_as_axolotl_configures_them():
    assert conflicts({**BASE, "fsdp_version": 2, "fsdp_config": {"offload_params": False}}) == []
    assert conflicts({**BASE, "fsdp_config": {"fsdp_version": 2}}) == []
    assert conflicts({**BASE, "fsdp_config": {"offload_params": False}}) == [
        "fsdp_version: 1; lift_ds's FSDP backend is FSDP2: set fsdp_version: 2"
    ]
    assert any(
        p.startswith("deepspeed and fsdp_config: both")
        for p in conflicts({**BASE, "deepspeed": {"zero_optimization": {}}, "fsdp_version": 2, "fsdp_config": {"a": 1}})
    )
    # a sharding backend that axolotl does not know of: its final save would write rank 0's shard
    problems = conflicts({**BASE, "lift": {"backend": "fsdp"}})
    assert len(problems) == 1 and problems[0].startswith("lift.backend: 'fsdp' shards the model"), problems
    assert (
        conflicts({**BASE, "lift": {"backend": "torch"}}) == []
        and conflicts({**BASE, "lift": {"method": "badam"}}) == []
    )


def test_the_lift_section_is_checked_by_lift_ds_every_problem_at_once(tmp_path):
    with pytest.raises(ValidationError) as e:
        LiftArgs.model_validate(
            {**BASE, "lift": {"method": "lisa", "policy": "cyclic", "bogus": 1, "layer_range": [3, 1]}}
        )
    text = str(e.value)
    for part in (
        "lift.bogus: unknown key",
        "lift.policy: 'cyclic' is LIFT's",
        "lift.layer_range: must be [first, last]",
    ):
        assert part in text, text
    with pytest.raises(ValidationError, match="lift: must be a mapping"):
        LiftArgs.model_validate({**BASE, "lift": ["method", "lisa"]})
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "lift": {"schedule": "sideways"}}))
    assert conflicts({**BASE, "deepspeed": str(ds)}) == [
        f"{ds}: lift.schedule: got 'sideways'; allowed: front2end, end2front, random"
    ]
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "lift": {"total_steps": "auto"}}))
    assert conflicts({**BASE, "deepspeed": str(ds)}) == []
    assert conflicts({**BASE, "deepspeed": str(ds), "lift": {}}) == [
        f'lift: given in the YAML and as the "lift" section of {str(ds)!r}; keep one'
    ]


def test_lift_config_from_an_axolotl_config(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 3},
                "train_micro_batch_size_per_gpu": "auto",
                "lift": {"include_head": True},
            }
        )
    )
    assert lift_config({"deepspeed": str(ds)}) == {
        "zero_optimization": {"stage": 3},
        "train_micro_batch_size_per_gpu": "auto",
        "lift": {"include_head": True},
    }
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert lift_config({"deepspeed": str(ds), "lift": {"method": "badam"}}) == {
        "zero_optimization": {"stage": 2},
        "lift": {"method": "badam"},
    }
    assert lift_config({"deepspeed": {"zero_optimization": {"stage": 1}}}) == {
        "zero_optimization": {"stage": 1},
        "lift": {},
    }
    assert lift_config(
        {
            "fsdp_version": 2,
            "fsdp_config": {"offload_params": True, "reshard_after_forward": False},
            "lift": {"method": "lisa"},
        }
    ) == {"lift": {"method": "lisa"}, "fsdp": {"cpu_offload": True, "reshard_after_forward": False}}
    assert lift_config({}) == {"lift": {}}  # the plugin line alone: LIFT over every layer, defaults
    section = {"layer_range": [2, 3]}
    built = lift_config({"lift": section})
    built["lift"]["layer_range"].append(9)
    assert section == {"layer_range": [2, 3]}  # a copy: the axolotl config is never changed


def test_the_composed_trainer_hands_the_plugins_config_to_the_mixin(tmp_path):
    """What get_trainer_cls returns, on a class axolotl is not needed for: LiftTrainerMixin in front of
    the base, the lift_ds config built from the axolotl config, the base's own arguments untouched."""
    from transformers import Trainer, TrainingArguments

    from lift_ds.integrations.transformers import LiftTrainerMixin

    from helpers import tiny_llama

    cfg = {"lift": {"backend": "torch", "layer_range": [2, 3]}}
    cls = plugin_module.lift_trainer_class(cfg, base=Trainer)
    assert cls.__mro__[1:4] == (plugin_module._AxolotlLift, LiftTrainerMixin, Trainer) and cls.__name__ == "LiftTrainer"
    assert plugin_module.lift_trainer_class(cfg, base=cls) is cls  # already LIFT: not wrapped twice
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, use_cpu=True, report_to=[])
    trainer = cls(model=tiny_llama(), args=args, train_dataset=[{"input_ids": [1, 2]}] * 4)
    assert trainer.lift_config_source == {"lift": {"backend": "torch", "layer_range": [2, 3]}}
    assert trainer.lift_config_source is not cls._lift_source  # each trainer gets its own copy
    # axolotl's fsdp_config reaches TrainingArguments.fsdp (its final save reads it): accepted here only
    from lift_ds.integrations.trainer_args import unsupported_features

    trainer.args.fsdp = ["full_shard"]
    assert not any(p.startswith("TrainingArguments.fsdp") for p in unsupported_features(trainer))
    trainer.lift_fsdp_from_args = False
    assert any(p.startswith("TrainingArguments.fsdp") for p in unsupported_features(trainer))
