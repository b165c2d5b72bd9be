"""The drop-in surface on one process (torch backend): LiftEngine as an nn.Module with DeepSpeedEngine's
members, a built optimizer's parameter groups kept per parameter, built schedulers driving one curve
across phases (each against the same scheduler on a plain loop), and the Trainer's config rules.
The 2-rank runs of real client loops are tests/distributed/test_clients.py."""

from __future__ import annotations

import pytest
import torch

import lift_ds
from lift_ds.errors import ConfigError, NotUnderLiftError
from lift_ds.facade import NOT_UNDER_LIFT

from helpers import lm_batches, snapshot, tiny_llama

# 4 blocks x 2 steps; embedding and layers.0 never train
LIFT = {"total_steps": 8, "layer_range": [2, 4], "include_head": True}


def make(model=None, opt=None, sched=None, lift=None, **top):
    model = model or tiny_llama()
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.0, **top, "lift": {**LIFT, **(lift or {})}}
    return lift_ds.initialize(
        model=model, config=cfg, optimizer=opt or (lambda ps: torch.optim.SGD(ps, lr=0.1)), lr_scheduler=sched
    )


def train(engine, batches, metric=None):
    """Train; the phase optimizer's (lr, weight decay, tensors) per group at each step. ``metric(k)``:
    passed to the scheduler as engine.step(lr_kwargs={"metrics": ...})."""
    seen = []
    for k, b in enumerate(batches):
        loss = engine(**b).loss
        engine.backward(loss)
        seen.append([(g["lr"], g["weight_decay"], len(g["params"])) for g in engine.optimizer.param_groups])
        engine.step(**({"lr_kwargs": {"metrics": metric(k)}} if metric else {}))
    return seen


# ----------------------------------------------------------------- the engine as a DeepSpeedEngine


def test_engine_is_a_module_wrapping_the_model():
    model = tiny_llama()
    engine, *_ = make(model)
    assert isinstance(engine, torch.nn.Module) and engine.module is model
    assert [n for n, _ in engine.named_parameters()] == [f"module.{n}" for n, _ in model.named_parameters()]
    assert list(engine.state_dict()) == [f"module.{k}" for k in model.state_dict()]
    assert engine.eval() is engine and not model.training and not engine.training
    engine.train()
    assert model.training and all(m.training for m in model.modules())
    # names neither the engine nor DeepSpeedEngine has come from the model, as DeepSpeedEngine forwards them
    assert engine.model is model.model and engine.get_input_embeddings() is model.get_input_embeddings()
    assert len(list(engine.named_modules())) == len(list(model.named_modules())) + 1
    with pytest.raises(AttributeError, match="nor has the LlamaForCausalLM it wraps"):
        engine.no_such_member  # noqa: B018 (the attribute access raises)


def test_a_plan_resolved_before_the_weights_is_used_as_is():
    """The launcher resolves the plan once, on a meta-device copy, and hands it on: initialize takes it
    as is (it does not resolve it again) and refuses one made for another length or with fixed_trainable."""
    from transformers import LlamaForCausalLM

    from lift_ds.run_config import load_run_config

    from helpers import tiny_llama_config

    with torch.device("meta"):
        meta = LlamaForCausalLM(tiny_llama_config())
    run = load_run_config({"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.0, "lift": LIFT})
    plan = lift_ds.resolve_plan(meta, run.lift)
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.1)  # noqa: E731
    engine, *_ = lift_ds.initialize(model=tiny_llama(), config=run, optimizer=sgd, plan=plan)
    assert engine.plan is plan and engine.active_block == "model.layers.1"
    with pytest.raises(ConfigError, match="plan: resolved for 8 steps, but lift.total_steps is 4"):
        lift_ds.initialize(model=tiny_llama(), config=run, optimizer=sgd, plan=plan, total_steps=4)
    with pytest.raises(ConfigError, match="plan: give plan or fixed_trainable, not both"):
        lift_ds.initialize(model=tiny_llama(), config=run, optimizer=sgd, plan=plan, fixed_trainable=["lm_head.weight"])


def test_deepspeed_members_and_what_cannot_mean_the_same():
    engine, *_ = make(gradient_accumulation_steps=2)
    assert (engine.global_rank, engine.local_rank, engine.world_size, engine.dp_world_size) == (0, 0, 1, 1)
    assert (
        engine.get_batch_info() == (8, 4, 2)
        and engine.zero_optimization_stage() == 0
        and not engine.zero_optimization()
    )
    assert not engine.bfloat16_enabled() and not engine.fp16_enabled() and engine.gradient_clipping() == 0.0
    b = lm_batches(1)[0]
    assert not engine.is_gradient_accumulation_boundary()
    # agrees with LIFT's count: accepted (accelerate calls it every backward)
    engine.set_gradient_accumulation_boundary(False)
    with pytest.raises(NotUnderLiftError, match="LIFT counts micro-steps itself"):
        engine.set_gradient_accumulation_boundary(True)
    for _ in range(2):
        engine.backward(engine(**b).loss)
        engine.step()
    assert engine.global_steps == 1 and engine.global_samples == 8 and engine.micro_steps == 2
    assert (
        engine.get_global_grad_norm() > 0
        and engine.was_step_applied()
        and engine.get_lr() == [0.1]
        and engine.get_mom() == [0]
    )
    assert (
        engine.tput_timer.micro_step_count == 2
        and engine.tput_timer.global_step_count == 1
        and not engine.monitor.enabled
    )
    for name, why in NOT_UNDER_LIFT.items():
        assert name == "compile" or not hasattr(engine, name)  # nn.Module's compile is overridden: calling it says why
        with pytest.raises(NotUnderLiftError, match=why[:30].replace("(", r"\(")):
            getattr(engine, name)()
    # a DeepSpeedEngine member on a backend with no DeepSpeed engine says so
    with pytest.raises(NotUnderLiftError, match="this run's backend is 'torch', which builds no DeepSpeed engine"):
        engine.zero_reduce_bucket_size()
    with pytest.raises(NotUnderLiftError, match="save_latest=False"):
        engine.save_checkpoint("unused", save_latest=False)
    with pytest.raises(NotUnderLiftError, match="load_module_only"):
        engine.load_checkpoint("unused", load_module_only=True)


def test_no_sync_gradient_checkpointing_and_16bit_save(tmp_path):
    model = tiny_llama()
    start = snapshot(model)
    engine, *_ = make(model)
    engine.gradient_checkpointing_enable()  # DeepSpeed-Chat calls it on the engine after initialize
    assert model.is_gradient_checkpointing
    b = lm_batches(1)[0]
    with engine.no_sync():
        engine.backward(engine(**b).loss)
        with pytest.raises(RuntimeError, match="inside no_sync"):
            engine.step()
    engine.step()
    assert engine.zero_gather_16bit_weights_on_model_save()
    assert engine.save_16bit_model(tmp_path, "model.bin", exclude_frozen_parameters=True)
    saved = torch.load(tmp_path / "model.bin", weights_only=True)
    assert (
        not any(n.startswith(("model.embed_tokens.", "model.layers.0.")) for n in saved) and "lm_head.weight" in saved
    )
    for n, t in saved.items():
        assert torch.equal(t, dict(model.named_parameters())[n])
    assert not torch.equal(saved["model.layers.1.mlp.up_proj.weight"], start["model.layers.1.mlp.up_proj.weight"])
    assert set(engine._zero3_consolidated_16bit_state_dict()) == set(model.state_dict())
    engine.destroy()
    assert engine.optimizer is None


# ----------------------------------------------------------------- a built optimizer and scheduler


def groups_of(model, decay: float, no_decay_lr: float) -> list[dict]:
    """DeepSpeed-Chat's grouping: weight decay except norms, and here an lr of their own for the norms."""
    norm = [p for n, p in model.named_parameters() if "norm" in n]
    rest = [p for n, p in model.named_parameters() if "norm" not in n]
    return [{"params": rest, "weight_decay": decay}, {"params": norm, "weight_decay": 0.0, "lr": no_decay_lr}]


def plain_lift_loop(model, data, lam) -> None:
    """The reference, written without lift_ds: per block (2 steps each) a fresh AdamW over the block's
    parameters with each parameter's group settings, the lr following one LambdaLR curve for the whole run."""
    blocks = [f"model.layers.{i}." for i in (1, 2, 3)] + ["HEAD"]
    for k, b in enumerate(data):
        prefix = blocks[k // 2]
        names = [
            n
            for n, _ in model.named_parameters()
            if (n.startswith(prefix) if prefix != "HEAD" else n in ("model.norm.weight", "lm_head.weight"))
        ]
        if k % 2 == 0:
            named = dict(model.named_parameters())
            groups = [
                {"params": [named[n] for n in names if "norm" not in n], "weight_decay": 0.1, "lr": 1e-2},
                {"params": [named[n] for n in names if "norm" in n], "weight_decay": 0.0, "lr": 3e-2},
            ]
            opt = torch.optim.AdamW([g for g in groups if g["params"]], eps=1e-3)
            base = [g["lr"] for g in opt.param_groups]
        for p in model.parameters():
            p.requires_grad_(False)
        for n in names:
            dict(model.named_parameters())[n].requires_grad_(True)
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * lam(k)
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_built_optimizer_keeps_each_parameters_group_and_built_scheduler_one_curve():
    """An AdamW instance over DeepSpeed-Chat-style groups (weight decay 0.1 / 0.0, an lr of its own for
    norms) and a LambdaLR built on it: every phase optimizer holds the groups restricted to its block, and
    the run equals the same training written as a plain loop."""
    lam = lambda s: 1.0 / (1 + s)  # noqa: E731
    data = lm_batches(8)
    model, ref = tiny_llama(), tiny_llama()
    user = torch.optim.AdamW(groups_of(model, 0.1, 3e-2), lr=1e-2, eps=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(user, lam)
    engine, _, _, lr = make(model, opt=user, sched=sched)
    seen = train(engine, data)
    plain_lift_loop(ref, data, lam)
    for (n, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=n)
    # the layers' phases: 7 decayed tensors at lr, 2 norms undecayed
    # at their own lr; the head: lm_head and the final norm
    assert seen[0] == [(1e-2, 0.1, 7), (3e-2, 0.0, 2)] and seen[3] == [
        pytest.approx((1e-2 / 4, 0.1, 7)),
        pytest.approx((3e-2 / 4, 0.0, 2)),
    ]
    assert seen[6] == [pytest.approx((1e-2 / 7, 0.1, 1)), pytest.approx((3e-2 / 7, 0.0, 1))]
    # the scheduler's own attributes
    assert lr.get_last_lr() == pytest.approx([1e-2 / 9, 3e-2 / 9]) and lr.last_epoch == 8
    assert all(g["lr"] == pytest.approx(lr.get_last_lr()[i]) for i, g in enumerate(user.param_groups))


def test_an_optimizer_over_other_parameters_is_refused():
    model = tiny_llama()
    partial = torch.optim.SGD([p for n, p in model.named_parameters() if "layers.2" not in n], lr=0.1)
    with pytest.raises(
        ConfigError, match=r"9 parameters LIFT trains are in none of the optimizer's parameter groups \(model.layers.2"
    ):
        make(model, opt=partial)


def plain_lrs(make_sched, steps: int, metric=None) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = make_sched(opt)
    out = []
    for k in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step(metric(k)) if metric else sched.step()
    return out


@pytest.mark.parametrize("kind", ["get_scheduler", "onecycle", "plateau", "deepspeed_warmup"])
def test_built_schedulers_drive_one_curve_across_phases(kind):
    """Each built scheduler, handed to initialize as deepspeed.initialize takes it, gives the phase
    optimizers the lr the same scheduler gives on a plain loop, step by step across 4 phase switches.
    ReduceLROnPlateau steps when engine.step(lr_kwargs={"metrics": ...}) gives it a metric."""
    from transformers import get_scheduler

    makers = {
        "get_scheduler": lambda o: get_scheduler("cosine", optimizer=o, num_warmup_steps=2, num_training_steps=8),
        "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.3, total_steps=8),
        "plateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5),
    }
    if kind == "deepspeed_warmup":
        from deepspeed.runtime.lr_schedules import WarmupDecayLR

        makers[kind] = lambda o: WarmupDecayLR(
            o, total_num_steps=8, warmup_min_lr=0.0, warmup_max_lr=0.1, warmup_num_steps=3
        )
    metric = (lambda k: 1.0 if k % 3 else 2.0) if kind == "plateau" else None  # worse every third step: the lr halves
    model = tiny_llama()
    user = torch.optim.SGD(model.parameters(), lr=0.1)
    engine, *_ = make(model, opt=user, sched=makers[kind](user))
    seen = [s[0][0] for s in train(engine, lm_batches(8), metric)]
    want = plain_lrs(makers[kind], 8, metric)
    assert seen == pytest.approx(want, abs=1e-12) and len(set(want)) > 2, (seen, want)


def test_config_built_in_code_takes_lift_section_from_deepspeed_config_flag_and_length_from_schedule(tmp_path):
    """DeepSpeed-Chat's shape: the DeepSpeed config is a dict built in code, the "lift" section a file given
    to DeepSpeed's --deepspeed_config flag, the run's length the built get_scheduler's num_training_steps.
    Two configs (a file with more than a "lift" section, or two "lift" sections) and a schedule that does
    not know the run's length are ConfigErrors naming what to do."""
    import argparse

    import deepspeed
    from transformers import get_scheduler

    def args_for(section):
        (tmp_path / "lift.json").write_text(__import__("json").dumps(section))
        return deepspeed.add_config_arguments(argparse.ArgumentParser()).parse_args(
            ["--deepspeed_config", str(tmp_path / "lift.json")]
        )

    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.0}
    lift = {k: v for k, v in LIFT.items() if k != "total_steps"}
    model = tiny_llama()
    user = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = get_scheduler("cosine", optimizer=user, num_warmup_steps=1, num_training_steps=6)
    engine, *_ = lift_ds.initialize(
        model=model, optimizer=user, args=args_for({"lift": lift}), config=cfg, lr_scheduler=sched
    )
    assert engine.plan.total_steps == 6 and [b.name for b in engine.plan.candidates] == [
        "model.layers.1",
        "model.layers.2",
        "model.layers.3",
        "head",
    ]
    seen = [s[0][0] for s in train(engine, lm_batches(6))]
    assert seen == pytest.approx(
        plain_lrs(lambda o: get_scheduler("cosine", optimizer=o, num_warmup_steps=1, num_training_steps=6), 6)
    )
    engine.close()
    with pytest.raises(
        ConfigError, match=r"holds nothing but a \"lift\" section \(this one has keys \['zero_optimization'\]\)"
    ):
        lift_ds.initialize(
            model=tiny_llama(), args=args_for({"lift": lift, "zero_optimization": {"stage": 2}}), config=cfg
        )
    with pytest.raises(ConfigError, match=r"lift: given both in config="):
        lift_ds.initialize(model=tiny_llama(), args=args_for({"lift": lift}), config={**cfg, "lift": LIFT})
    model = tiny_llama()
    user = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"lift.total_steps: required .*\(get_scheduler\(..., num_training_steps=N\)"):
        lift_ds.initialize(
            model=model,
            optimizer=user,
            args=args_for({"lift": lift}),
            config=cfg,
            lr_scheduler=torch.optim.lr_scheduler.LambdaLR(user, lambda s: 1.0),
        )


def test_client_optimizer_with_offload_is_judged_as_deepspeed_judges_it():
    """ZeRO offload with no "optimizer" section: the client's optimizer runs, so it is checked (before any
    process group) as deepspeed.initialize checks it: DeepSpeed's CPU ops pass, torch's AdamW only with
    zero_force_ds_cpu_optimizer false. DeepSpeed-Chat passes DeepSpeedCPUAdam with --offload."""
    from lift_ds.backends.deepspeed import DeepSpeedBackend

    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
        "lift": LIFT,
    }
    lift_ds.load_run_config(cfg)  # no optimizer section: nothing to refuse yet
    model = tiny_llama()
    for opt in (torch.optim.AdamW(model.parameters(), lr=1e-3), lambda ps: torch.optim.AdamW(ps, lr=1e-3)):
        with pytest.raises(
            ConfigError, match=r"optimizer: AdamW given with zero_optimization.offload_optimizer; .*DeepSpeedCPUAdam"
        ):
            lift_ds.initialize(model=model, optimizer=opt, config=cfg)
    assert DeepSpeedBackend.client_optimizer_problems(cfg, "DeepSpeedCPUAdam") == []
    assert DeepSpeedBackend.client_optimizer_problems({**cfg, "zero_force_ds_cpu_optimizer": False}, "AdamW") == []
    # a config section that cannot run offloaded
    with pytest.raises(ConfigError, match=r"optimizer.type 'SGD' has none"):
        lift_ds.load_run_config({**cfg, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})


def test_resume_with_a_built_scheduler(tmp_path):
    from transformers import get_scheduler

    def fresh():
        model = tiny_llama()
        user = torch.optim.AdamW(groups_of(model, 0.1, 3e-2), lr=1e-2, eps=1e-3)
        return make(
            model, opt=user, sched=get_scheduler("linear", optimizer=user, num_warmup_steps=2, num_training_steps=8)
        )[0]

    data = lm_batches(8)
    ref = fresh()
    train(ref, data)
    first = fresh()
    train(first, data[:3])
    first.save_checkpoint(tmp_path)
    resumed = fresh()
    resumed.load_checkpoint(tmp_path)
    train(resumed, data[3:])
    for (n, a), (_, b) in zip(ref.module.named_parameters(), resumed.module.named_parameters()):
        assert torch.equal(a, b), n
    assert resumed.get_lr() == ref.get_lr()


# ----------------------------------------------------------------- Trainer's config rules


def trainer(tmp_path, lift_config, **args):
    from transformers import TrainingArguments

    from lift_ds.integrations.transformers import LiftTrainer

    rows = [
        {"input_ids": b["input_ids"][0].tolist(), "labels": b["labels"][0].tolist()} for b in lm_batches(16, batch=1)
    ]
    collate = lambda rs: {k: torch.tensor([r[k] for r in rs]) for k in rs[0]}  # noqa: E731
    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=8,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        learning_rate=1e-2,
        weight_decay=0.1,
    )
    return LiftTrainer(
        model=tiny_llama(),
        args=TrainingArguments(**{**base, **args}),
        train_dataset=rows,
        data_collator=collate,
        lift_config=lift_config,
    )


def test_absent_precision_follows_the_training_arguments(tmp_path):
    from lift_ds.integrations.trainer_args import trainer_config

    cfg = {"train_micro_batch_size_per_gpu": "auto", "lift": {"backend": "torch"}}
    t = trainer(tmp_path, cfg, bf16=True)
    assert trainer_config(t, cfg, 8)["bf16"] == {"enabled": True}
    # DeepSpeed's older name
    assert trainer_config(t, {**cfg, "bfloat16": {"enabled": True}}, 8)["bf16"] == {"enabled": True}
    with pytest.raises(
        ConfigError, match="bf16.enabled: False in the DeepSpeed config, but TrainingArguments says True"
    ):
        trainer_config(t, {**cfg, "bf16": {"enabled": False}}, 8)


@pytest.mark.parametrize("path", ["arguments", "config_optimizer", "optimizers"])
def test_trainer_no_decay_groups_on_every_optimizer_path(tmp_path, path):
    """Norms (and biases) get no weight decay whether the optimizer comes from the TrainingArguments, the
    DeepSpeed config's "optimizer" section, or optimizers=(a built optimizer, a built scheduler)."""
    import os

    cfg = {
        "train_micro_batch_size_per_gpu": "auto",
        "lift": {"backend": "torch", "layer_range": [2, 4], "include_head": True},
    }
    if path == "config_optimizer":
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}}
    t = trainer(tmp_path, cfg)
    if path == "optimizers":
        decay = set(t.get_decay_parameter_names(t.model))
        groups = [
            {"params": [p for n, p in t.model.named_parameters() if n in decay], "weight_decay": 0.1},
            {"params": [p for n, p in t.model.named_parameters() if n not in decay], "weight_decay": 0.0},
        ]
        t.optimizer = torch.optim.AdamW(groups, lr=1e-2)
        t.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(t.optimizer, lambda s: 1 - s / 8)
    trace = tmp_path / "trace.jsonl"
    os.environ["LIFT_DS_TRACE"] = str(trace)
    try:
        t.train()
    finally:
        del os.environ["LIFT_DS_TRACE"]
    import json

    phases = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(phases) == 4
    for p in phases:
        wd = {n: g["weight_decay"] for g in p["groups"] for n in g["params"]}
        assert all(v == (0.0 if "norm" in n else 0.1) for n, v in wd.items()) and 0.0 in wd.values(), (path, p)


def test_a_peft_model_with_frozen_base_weights_is_refused_up_front(tmp_path):
    """LIFT trains every weight of the active block: handed a PEFT model, it would train the base
    weights PEFT froze, and a PEFT save keeps only the adapter (seen with TRL's sft.py --use_peft: base
    weights moved by 0.019, the saved adapter silently without that training). lift_ds.initialize and
    the Trainer class swap refuse it before anything runs; the same base model trains."""
    peft = pytest.importorskip("peft")
    from transformers import TrainingArguments

    from lift_ds.integrations.transformers import LiftTrainer

    def adapted():
        return peft.get_peft_model(
            tiny_llama(layers=2), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        )

    with pytest.raises(ConfigError) as info:
        make(model=adapted())
    text = str(info.value)
    assert "model: a PEFT model (PeftModel" in text and "frozen base weights (e.g. base_model.model." in text
    assert "pass the base model (no peft_config)" in text
    rows = [
        {"input_ids": b["input_ids"][0].tolist(), "labels": b["labels"][0].tolist()} for b in lm_batches(4, batch=1)
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=4,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    with pytest.raises(ConfigError, match="model: a PEFT model"):
        LiftTrainer(model=adapted(), args=args, train_dataset=rows, lift_config={"lift": {"total_steps": 4}})
    engine, *_ = make(model=tiny_llama(layers=2), lift={"layer_range": [1, 2]})  # the base model: LIFT as usual
    assert engine.plan.total_steps > 0
