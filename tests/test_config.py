import json
import subprocess
import sys
from pathlib import Path

import pytest

from lift_ds.config import DEFAULT_GRADIENT_CLIPPING, LiftConfig, parse_lift_section, resolve_training
from lift_ds.errors import ConfigError
from lift_ds.run_config import load_run_config


def parse_config(config):
    r = load_run_config(config)
    return r.lift, r.training, r.raw


def test_defaults():
    c = parse_lift_section({})
    assert c == LiftConfig()
    assert (c.schedule, c.policy, c.optimizer_state, c.backend) == ("front2end", "grouped", "reset", "auto")
    # "auto" follows the config: no ZeRO or FSDP section on one process is the torch reference
    assert load_run_config({}).backend == "torch"
    assert c.include_embedding is False and c.include_head is False and c.layer_range is None


def test_all_problems_reported_at_once_with_paths():
    with pytest.raises(ConfigError) as e:
        parse_lift_section(
            {
                "schedule": "sideways",
                "policy": 3,
                "total_steps": 0,
                "layer_range": [5, 2],
                "include_head": "yes",
                "seed": "x",
                "optimizer_state": "keep",
                "backend": "jax",
                "always_trainable": [1],
                "layer_rnage": [1, 2],
            }
        )
    probs = e.value.problems
    for path in [
        "lift.schedule",
        "lift.policy",
        "lift.total_steps",
        "lift.layer_range",
        "lift.include_head",
        "lift.seed",
        "lift.optimizer_state",
        "lift.backend",
        "lift.always_trainable",
        "lift.layer_rnage",
    ]:
        assert any(p.startswith(path + ":") for p in probs), (path, probs)
    assert len(probs) == 10
    assert "'sideways'" in str(e.value) and "front2end" in str(e.value)


def test_layer_range_and_patterns_parsed():
    c = parse_lift_section({"layer_range": [6, 8], "always_trainable": "score", "total_steps": "auto"})
    assert c.layer_range == (6, 8) and c.always_trainable == ("score",) and c.total_steps is None


@pytest.mark.parametrize(
    "cfg,world,expect",
    [
        ({}, 1, (1, 1, 1)),
        ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, 2, (4, 2, 16)),
        ({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4}, 2, (4, 2, 16)),
        ({"train_batch_size": 16, "gradient_accumulation_steps": 2}, 2, (4, 2, 16)),
        ({"train_batch_size": 8}, 2, (4, 1, 8)),
        (
            {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": "auto"},
            2,
            (2, 1, 4),
        ),
    ],
)
def test_batch_sizes_resolve(cfg, world, expect):
    t = resolve_training(cfg, world)
    assert (t.micro_batch_size, t.gradient_accumulation_steps, t.train_batch_size) == expect


def test_batch_sizes_that_do_not_multiply_out():
    with pytest.raises(ConfigError, match="train_batch_size: 10 != .* = 16"):
        resolve_training(
            {"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, 2
        )
    with pytest.raises(ConfigError, match="multiple of 8"):
        resolve_training({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4}, 2)


def test_gradient_clipping_has_one_stated_default():
    assert resolve_training({}, 1).gradient_clipping == DEFAULT_GRADIENT_CLIPPING == 1.0
    assert resolve_training({"gradient_clipping": 0}, 1).gradient_clipping == 0.0
    with pytest.raises(ConfigError, match="gradient_clipping"):
        resolve_training({"gradient_clipping": -1}, 1)


def test_precision():
    assert resolve_training({"bf16": {"enabled": True}}, 1).precision == "bf16"
    with pytest.raises(ConfigError, match="only one"):
        resolve_training({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, 1)
    with pytest.raises(ConfigError, match="fp16.enabled: the torch reference backend"):
        parse_config({"fp16": {"enabled": True}})


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"lift": {"schedule": "front2end",}}')
    with pytest.raises(ConfigError, match="line 1"):
        parse_config(bad)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "lift": {"total_steps": 10}}))
    lift, training, raw = parse_config(good)
    assert lift.total_steps == 10 and training.micro_batch_size == 2 and raw["lift"]["total_steps"] == 10


def test_lift_and_top_level_problems_together():
    with pytest.raises(ConfigError) as e:
        parse_config({"gradient_clipping": "big", "lift": {"policy": "x"}})
    assert len(e.value.problems) == 2


def test_import_is_light():
    code = (
        "import sys, lift_ds; import lift_ds.config, lift_ds.schedule; "
        "print('torch' in sys.modules, 'deepspeed' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
    # the class swaps are importable from the top level, as the
    # README's one-line swap writes them; transformers loads then
    code = (
        "import sys, lift_ds; print('transformers' in sys.modules); from lift_ds import LiftTrainer, LiftSFTTrainer; "
        "import lift_ds.integrations.transformers as t; "
        "print(LiftTrainer is t.LiftTrainer, LiftSFTTrainer is t.LiftSFTTrainer)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True", "True"]


def test_fsdp_rejects_what_it_cannot_honour():
    with pytest.raises(ConfigError) as e:
        parse_config(
            {
                "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                "fp16": {"enabled": True},
                "fsdp": {"cpu_ofload": True, "reshard_after_forward": "yes"},
                "lift": {"backend": "fsdp"},
            }
        )
    text = str(e.value)
    for needle in [
        "zero_optimization.stage: 2",
        "zero_optimization.offload_*",
        "fp16.enabled",
        "fsdp.cpu_ofload: unknown key",
        "fsdp.reshard_after_forward: must be true or false",
    ]:
        assert needle in text, needle
    with pytest.raises(ConfigError, match="fsdp: this section only applies"):
        parse_config({"fsdp": {"cpu_offload": True}, "lift": {"backend": "deepspeed"}})
    lift, _, _ = parse_config(
        {"zero_optimization": {"stage": 0}, "fsdp": {"cpu_offload": True}, "lift": {"backend": "fsdp"}}
    )
    assert lift.backend == "fsdp"


def test_deepspeed_top_level_keys_are_the_installed_deepspeeds():
    """ds_config_keys.DEEPSPEED_TOP_LEVEL_KEYS (the spelling suggestions' vocabulary) holds every top-level key
    the installed DeepSpeed's config parser reads; a new DeepSpeed release that reads more fails here."""
    from lift_ds.backends import ds_config_keys as compat

    read = compat.deepspeed_read_top_level_keys()
    assert read and read <= set(compat.DEEPSPEED_TOP_LEVEL_KEYS), sorted(read - set(compat.DEEPSPEED_TOP_LEVEL_KEYS))
    for cfg in ("zero1", "zero2", "zero3", "zero2_offload", "zero3_offload", "fsdp", "quickstart_cpu", "trainer_zero2"):
        raw = json.loads((Path(__file__).resolve().parents[1] / "ds_configs" / f"{cfg}.json").read_text())
        assert not [k for k in raw if k not in compat.known_top_level_keys() and not k.startswith("_comment")], cfg
        # DeepSpeed's models accept the shipped configs
        assert compat.section_problems(raw, ("zero_optimization", "bf16", "fp16")) == [], cfg


def test_deepspeeds_own_models_validate_the_sections_it_reads():
    from lift_ds.backends import ds_config_keys as compat

    problems = compat.section_problems(
        {
            "zero_optimization": {"stage": 2, "overlap_com": True, "reduce_bucket_size": "big"},
            "fp16": {"enabled": True, "loss_scale": -1},
        },
        ("zero_optimization", "bf16", "fp16"),
    )
    text = "\n".join(problems)
    assert 'zero_optimization.overlap_com: unknown key (did you mean "overlap_comm"?)' in text
    assert "zero_optimization.reduce_bucket_size: Input should be a valid integer" in text and "fp16.loss_scale" in text


def test_one_resolved_backend_field():
    """``lift.backend`` is the resolved backend; what ``auto`` followed is the reason, and the merged config
    (log, checkpoints) names the backend that runs."""
    for raw, backend, reason in [
        ({}, "torch", "one process"),
        ({"zero_optimization": {"stage": 2}}, "deepspeed", "zero_optimization section"),
        ({"lift": {"backend": "torch"}}, "torch", "lift.backend"),
    ]:
        run = load_run_config(raw)
        assert run.lift.backend == run.backend == backend and reason in run.backend_reason
        assert run.to_dict()["lift"]["backend"] == backend
    assert load_run_config({"lift": {"backend": "auto"}}, world_size=2).backend == "deepspeed"
    assert load_run_config({}).with_lift(total_steps=3).backend == "torch"


def test_replace_checks_what_the_section_checks():
    base = parse_lift_section({"layer_range": [2, 3], "total_steps": 8})
    changed = base.replace(total_steps=5, always_trainable=["score"], layer_range=[1, 2])
    assert (changed.total_steps, changed.always_trainable, changed.layer_range, changed.schedule) == (
        5,
        ("score",),
        (1, 2),
        "front2end",
    )
    assert base.total_steps == 8 and base.replace() == base
    for changes in [
        {"schedule": "sideways"},
        {"total_steps": 0},
        {"layer_range": [3, 1]},
        {"always_trainable": [3]},
        {"method": "lisa", "schedule": "end2front"},
        {"method": "badam", "optimizer_state": "offload"},
    ]:
        with pytest.raises(ConfigError) as replaced:
            base.replace(**changes)
        with pytest.raises(ConfigError) as parsed:
            parse_lift_section({**base.to_dict(), **changes})
        assert replaced.value.problems == parsed.value.problems, changes
    with pytest.raises(ConfigError, match=r"lift.shedule: unknown key; allowed keys are .*schedule"):
        base.replace(shedule="random")
    with pytest.raises(ConfigError, match="lift.switch_every: applies to method badam or lisa"):
        base.replace(switch_every=3)


def test_backends_check_the_typed_lift_section():
    """A backend judges Q-LIFT / streaming from the typed section it is given, never from the raw JSON's ``lift``."""
    from lift_ds.backends import get_backend_class
    from lift_ds.config import TrainingConfig

    t = TrainingConfig(optimizer={"type": "AdamW", "params": {"lr": 1e-3}})
    for lift, needle in [
        (LiftConfig(frozen_weights="int8"), "lift.frozen_weights: 'int8'"),
        (LiftConfig(stream_frozen=True), "lift.stream_frozen: true"),
    ]:
        _, problems = get_backend_class("fsdp").check_config(
            lift, t, {}, 2
        )  # the raw config has no lift section at all
        assert any(p.startswith(f"{needle}: FSDP2 shards") for p in problems), problems
        _, problems = get_backend_class("deepspeed").check_config(lift, t, {"zero_optimization": {"stage": 3}}, 2)
        assert any(p.startswith(f"{needle} needs the frozen layers whole") for p in problems), problems
        options, problems = get_backend_class("deepspeed").check_config(lift, t, {"zero_optimization": {"stage": 2}}, 2)
        assert problems == [] and options.zero_stage == 2
    _, problems = get_backend_class("deepspeed").check_config(
        LiftConfig(), t, {"zero_optimization": {"stage": 3}}, 2, "lora"
    )
    assert any(p.startswith("--baseline lora: use a ZeRO-1/2 config") for p in problems)
    run = load_run_config({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    assert (
        run.backend_options is not None and run.backend_options.zero_stage == 2
    )  # always there where a backend is built


def test_with_lift_refuses_another_backend():
    """The backend and its options are resolved together, once: a copy with another backend would carry the
    first one's options (the backends no longer re-check), so with_lift refuses it."""
    from lift_ds.run_config import load_run_config

    run = load_run_config({"train_micro_batch_size_per_gpu": 1, "lift": {"total_steps": 4, "backend": "torch"}})
    assert run.with_lift(total_steps=8).lift.total_steps == 8
    assert run.with_lift(backend="torch").backend == "torch"
    with pytest.raises(ValueError, match="resolved once"):
        run.with_lift(backend="deepspeed")
