"""Single-process LIFT on a tiny LLaMA with the torch reference backend."""

import copy

import pytest
import torch

import lift_ds
from lift_ds.errors import ConfigError
from lift_ds.optim import optimizer_state_elements

from helpers import lm_batches, per_block_adam_reference, snapshot, tiny_llama


def make(model=None, lift=None, opt=None, sched=None, **top):
    model = model or tiny_llama()
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_clipping": 0.0,
        **top,
        "lift": {"total_steps": 8, **(lift or {})},
    }
    opt = opt or (lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    engine, optimizer, _, lr = lift_ds.initialize(model=model, config=cfg, optimizer=opt, lr_scheduler=sched)
    return engine, optimizer, lr


def train(engine, batches):
    losses = []
    for b in batches:
        loss = engine(**b).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def test_only_active_block_changes_each_step():
    engine, _, _ = make(
        lift={"total_steps": 12, "include_embedding": True, "include_head": True, "always_trainable": ["model.norm"]}
    )
    model = engine.module
    for b in lm_batches(12):
        block = engine.candidates[engine.active_block_index]
        allowed = set(block.param_names) | {"model.norm.weight"}
        before = snapshot(model)
        engine.backward(engine(**b).loss)
        engine.step()
        for n, p in model.named_parameters():
            if n in allowed:
                assert not torch.equal(p, before[n]), f"{n} of active block {block.name} did not change"
            else:
                assert torch.equal(p, before[n]), f"{n} changed while {block.name} was active"


def test_requires_grad_follows_phase_and_optimizer_state_is_active_block_only():
    engine, _, _ = make(lift={"total_steps": 8})
    seen = []
    for b in lm_batches(8):
        names = {n for n, p in engine.module.named_parameters() if p.requires_grad}
        assert names == set(engine.trainable_param_names())
        seen.append(engine.active_block)
        active = [p for p in engine.module.parameters() if p.requires_grad]
        engine.backward(engine(**b).loss)
        if engine.optimizer is not None:
            # a fresh optimizer per phase ("reset"): no state at a phase's first step, then exactly the block's moments
            held = optimizer_state_elements(engine.optimizer)
            assert held == (0 if engine.global_step % 2 == 0 else 2 * sum(p.numel() for p in active))
        engine.step()
    assert seen == [f"model.layers.{i // 2}" for i in range(8)]
    assert engine.done and engine.active_block is None
    assert not any(p.requires_grad for p in engine.module.parameters())
    with pytest.raises(RuntimeError, match="plan finished"):
        engine.step()


def test_loss_goes_down_over_a_run():
    torch.manual_seed(0)
    engine, _, _ = make(lift={"total_steps": 60, "include_head": True, "include_embedding": True})
    held_out = lm_batches(2, seed=99)

    def eval_loss():
        with torch.no_grad():
            return sum(engine(**b).loss.item() for b in held_out) / len(held_out)

    before = eval_loss()
    train(engine, lm_batches(60))
    after = eval_loss()
    assert after < before - 0.5, (before, after)


def test_truncated_backward_grads_and_hooks():
    model = tiny_llama(layers=4)
    engine, _, _ = make(
        model=model,
        lift={"total_steps": 4, "layer_range": [3, 3], "include_head": True},
        opt=lambda ps: torch.optim.SGD(ps, lr=0.1),
    )
    fired = {}
    layers = model.model.layers
    mods = {"embed": model.model.embed_tokens, **{f"layer{i}": layers[i] for i in range(4)}}
    for name, m in mods.items():
        m.register_full_backward_hook(lambda mod, gi, go, name=name: fired.__setitem__(name, fired.get(name, 0) + 1))
    b = lm_batches(1)[0]
    assert engine.active_block == "model.layers.2"
    # torch says so: the embedding output needs no grad
    with pytest.warns(UserWarning, match="no inputs require gradients"):
        engine(**b).loss.backward()  # plain autograd, no engine step: inspect grads
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {n for n in dict(model.named_parameters()) if n.startswith("model.layers.2.")}
    assert fired.get("layer2", 0) == 1 and fired.get("layer3", 0) == 1
    assert "embed" not in fired and "layer0" not in fired and "layer1" not in fired


def count_forward_calls(module, counts, key):
    """Count calls of ``module.forward`` itself (transformers checkpoints a layer's forward inside its
    hooks, so a forward hook would not see a recomputation)."""
    inner = module.forward

    def counted(*a, **k):
        counts[key] = counts.get(key, 0) + 1
        return inner(*a, **k)

    module.forward = counted


def test_truncated_backward_with_gradient_checkpointing():
    from lift_ds.blocks import enable_gradient_checkpointing

    model = tiny_llama(layers=4)
    enable_gradient_checkpointing(model)
    model.train()
    engine, _, _ = make(
        model=model, lift={"total_steps": 4, "layer_range": [2, 3]}, opt=lambda ps: torch.optim.SGD(ps, lr=0.1)
    )
    calls = {}
    for i in (0, 1):
        count_forward_calls(model.model.layers[i].mlp, calls, i)
    b = lm_batches(1)[0]
    engine(**b).loss.backward()
    grads = {n.split(".")[2] for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {"1"}
    # layer 0 ran forward once and was not recomputed (no backward reached it); the active layer 1 was
    assert calls == {0: 1, 1: 2}, calls


def test_gradient_accumulation_matches_big_batch():
    data = lm_batches(4, batch=4)
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.5)  # noqa: E731
    e1, _, _ = make(lift={"total_steps": 4}, opt=sgd)
    train(e1, data)
    e2, _, _ = make(lift={"total_steps": 4}, opt=sgd, gradient_accumulation_steps=2, train_micro_batch_size_per_gpu=2)
    halves = [{k: v[i : i + 2] for k, v in b.items()} for b in data for i in (0, 2)]
    seen_steps = []
    for h in halves:
        e2.backward(e2(**h).loss)
        e2.step()
        seen_steps.append(e2.global_step)
    assert seen_steps == [0, 1, 1, 2, 2, 3, 3, 4]
    for (n, a), (_, b) in zip(e1.module.named_parameters(), e2.module.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)


def test_lr_schedule_runs_across_phases():
    lam = lambda step: 1.0 / (1 + step)  # noqa: E731
    sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lam)  # noqa: E731
    engine, optimizer, lr = make(lift={"total_steps": 8}, opt=lambda ps: torch.optim.SGD(ps, lr=0.2), sched=sched)
    seen = []
    for b in lm_batches(8):
        engine.backward(engine(**b).loss)
        seen.append(optimizer.param_groups[0]["lr"])
        engine.step()
    assert seen == pytest.approx([0.2 * lam(k) for k in range(8)])
    assert lr.get_last_lr()[0] == pytest.approx(0.2 * lam(8))


def test_deepspeed_scheduler_section():
    engine, optimizer, _ = make(
        lift={"total_steps": 6},
        opt=lambda ps: torch.optim.SGD(ps, lr=0.1),
        scheduler={
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.1, "warmup_num_steps": 4, "warmup_type": "linear"},
        },
    )
    seen = []
    for b in lm_batches(6):
        engine.backward(engine(**b).loss)
        engine.step()
        if optimizer._engine.optimizer is not None:
            seen.append(optimizer.param_groups[0]["lr"])
    assert seen[0] < seen[1] < seen[2] and seen[-1] == pytest.approx(0.1)


def test_gradient_clipping_on_and_off():
    b = lm_batches(1)[0]

    def update(clip):
        model = tiny_llama()
        start = snapshot(model)
        engine, _, _ = make(
            model=model, lift={"total_steps": 2}, opt=lambda ps: torch.optim.SGD(ps, lr=1.0), gradient_clipping=clip
        )
        names = engine.trainable_param_names()
        engine.backward(engine(**b).loss)
        engine.step()
        return torch.sqrt(sum(((dict(model.named_parameters())[n] - start[n]) ** 2).sum() for n in names)).item()

    free = update(0.0)
    assert free > 0.01
    assert update(free / 4) == pytest.approx(free / 4, rel=1e-3)  # clipped to the norm asked
    assert update(free * 10) == pytest.approx(free, rel=1e-5)  # a large clip changes nothing


@pytest.mark.parametrize("schedule,policy", [("random", "cyclic"), ("front2end", "grouped")])
def test_checkpoint_resume_is_exact(tmp_path, schedule, policy):
    lift = {"total_steps": 10, "schedule": schedule, "policy": policy, "seed": 3, "include_head": True}
    sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))  # noqa: E731
    data = lm_batches(10)
    ref, _, _ = make(lift=lift, sched=sched)
    train(ref, data)

    first, _, _ = make(lift=lift, sched=sched)
    train(first, data[:5])
    first.save_checkpoint(tmp_path, client_state={"epoch": 7})
    assert (tmp_path / "latest").read_text() == "global_step5"
    train(first, data[5:6])  # diverges from the checkpoint: must not matter

    resumed, _, _ = make(lift=lift, sched=sched)
    path, client = resumed.load_checkpoint(tmp_path)
    assert client == {"epoch": 7} and resumed.global_step == 5
    train(resumed, data[5:])
    for (n, a), (_, b) in zip(ref.module.named_parameters(), resumed.module.named_parameters()):
        assert torch.equal(a, b), n


def test_load_checkpoint_without_checkpoint(tmp_path):
    engine, _, _ = make()
    assert engine.load_checkpoint(tmp_path) == (None, {})


def test_optimizer_state_offload_keeps_each_blocks_state():
    """cyclic revisits blocks: with "offload" a block's Adam state continues where it stopped."""
    data = lm_batches(9)
    model = tiny_llama(layers=3)
    ref_model = copy.deepcopy(model)
    opt = lambda ps: torch.optim.Adam(ps, lr=1e-2, eps=1e-3)  # noqa: E731
    engine, _, _ = make(model=model, lift={"total_steps": 9, "policy": "cyclic", "optimizer_state": "offload"}, opt=opt)
    train(engine, data)
    per_block_adam_reference(ref_model, data, opt, layers=3)  # one persistent Adam per layer, stepping in turn
    for (n, a), (_, b) in zip(model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=n)
    # and "reset" really differs
    model2 = copy.deepcopy(ref_model)
    e2, _, _ = make(model=tiny_llama(layers=3), lift={"total_steps": 9, "policy": "cyclic"}, opt=opt)
    train(e2, data)
    assert not torch.allclose(
        e2.module.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight, atol=1e-6
    )
    del model2


def test_initialize_errors():
    model = tiny_llama()
    with pytest.raises(ConfigError, match="lift.total_steps: required"):
        lift_ds.initialize(model=model, config={"lift": {}}, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    with pytest.raises(ConfigError, match="optimizer: none given"):
        lift_ds.initialize(model=model, config={"lift": {"total_steps": 4}})
    with pytest.raises(
        ConfigError,
        match="lr_scheduler: must be a callable optimizer -> scheduler, or a scheduler built on an optimizer",
    ):
        lift_ds.initialize(
            model=model,
            config={"lift": {"total_steps": 4}},
            optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1),
            lr_scheduler=0.5,
        )
    stranger = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ConfigError, match="the SGD you passed holds none of the model's parameters"):
        lift_ds.initialize(model=model, config={"lift": {"total_steps": 4}}, optimizer=stranger)
    with pytest.raises(ConfigError, match="optimizer.type: 'Lamb'"):
        lift_ds.initialize(
            model=model, config={"optimizer": {"type": "Lamb", "params": {}}, "lift": {"total_steps": 4}}
        )
    with pytest.raises(ConfigError, match="always_trainable"):
        lift_ds.initialize(
            model=model,
            config={"lift": {"total_steps": 4, "always_trainable": ["nothing"]}},
            optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1),
        )


def test_config_optimizer_section_and_optimizer_instance():
    model = tiny_llama()
    cfg = {"optimizer": {"type": "Adam", "params": {"lr": 1e-3, "weight_decay": 0.1}}, "lift": {"total_steps": 4}}
    engine, opt, _, _ = lift_ds.initialize(model=model, config=cfg)
    assert isinstance(engine.optimizer, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 0.1
    model = tiny_llama()
    inst = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    engine, opt, _, _ = lift_ds.initialize(model=model, config={"lift": {"total_steps": 4}}, optimizer=inst)
    assert isinstance(engine.optimizer, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9
    assert len(opt.param_groups[0]["params"]) == 9  # one layer's tensors, not the instance's


def test_dataloader_from_training_data():
    ds = [{"input_ids": torch.arange(8), "labels": torch.arange(8)} for _ in range(10)]
    _, _, loader, _ = lift_ds.initialize(
        model=tiny_llama(),
        config={"train_micro_batch_size_per_gpu": 3, "lift": {"total_steps": 4}},
        optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1),
        training_data=ds,
    )
    sizes = [b["input_ids"].shape for b in loader]
    assert sizes == [torch.Size([3, 8])] * 3


def test_load_checkpoint_into_a_finished_engine(tmp_path):
    lift = {"total_steps": 8, "policy": "cyclic"}
    data = lm_batches(8)
    ref, _, _ = make(lift=lift)
    train(ref, data)
    engine, _, _ = make(lift=lift)
    train(engine, data[:3])
    engine.save_checkpoint(tmp_path)
    train(engine, data[3:])
    assert engine.done
    engine.load_checkpoint(tmp_path)
    assert not engine.done and engine.global_step == 3 and engine.active_block is not None
    train(engine, data[3:])
    for (n, a), (_, b) in zip(ref.module.named_parameters(), engine.module.named_parameters()):
        assert torch.equal(a, b), n


def test_resume_with_another_global_batch_needs_allow_batch_change(tmp_path, caplog):
    """The data position is a global sample index: another global batch size changes what every later
    step reads, so it is refused unless allowed (then the run continues from the samples read so far)."""
    from lift_ds.errors import ResumeError

    engine, _, _ = make(lift={"total_steps": 8})
    train(engine, lm_batches(3))
    engine.save_checkpoint(tmp_path)
    assert engine.samples_seen == 3 * 4
    other, _, _ = make(lift={"total_steps": 8}, gradient_accumulation_steps=2)
    with pytest.raises(ResumeError, match="the global batch changes from 4 to 8 samples per optimizer step"):
        other.load_checkpoint(tmp_path)
    other, _, _ = make(lift={"total_steps": 8}, gradient_accumulation_steps=2)
    with caplog.at_level("WARNING"):
        path, _ = other.load_checkpoint(tmp_path, allow_batch_change=True)
    assert path is not None and other.global_step == 3 and other.samples_seen == 12 and other.micro_steps == 6
    assert "will not equal an uninterrupted run" in caplog.text
    b = lm_batches(1)[0]
    other.backward(other(**b).loss)
    other.step()  # half an optimizer step: the engine's progress cannot be saved now, and nothing is written
    with pytest.raises(RuntimeError, match="in the middle of gradient accumulation"):
        other.save_checkpoint(tmp_path / "mid")
    assert not (tmp_path / "mid").exists()


def test_checkpoint_is_portable_between_backends_and_layouts(tmp_path):
    """What a checkpoint holds is full tensors: the weights file and the optimizer state name every
    parameter of the active block with its full shape, and a fresh engine gets that state back."""
    import torch as T

    from lift_ds.backends.state import OPTIMIZER_FILE, WEIGHTS_FILE

    lift = {"total_steps": 8, "policy": "cyclic", "optimizer_state": "offload"}
    engine, _, _ = make(lift=lift)
    train(engine, lm_batches(5))  # block 2 of 4 active (1 step done on it), blocks 1, 3, 4 stashed
    saved_state = engine.backend.full_optimizer_state()
    path = engine.save_checkpoint(tmp_path)
    assert (path / WEIGHTS_FILE).is_file() and (path / OPTIMIZER_FILE).is_file()
    state = T.load(path / OPTIMIZER_FILE, weights_only=False)
    named = dict(engine.module.named_parameters())
    assert sorted(state["master"]) == sorted(engine.trainable_param_names()) and state["step"] == 1.0
    for n, t in state["master"].items():
        assert t.shape == named[n].shape and state["state"][n]["exp_avg"].shape == named[n].shape
    fresh, _, _ = make(lift=lift)
    fresh.load_checkpoint(tmp_path)
    got = fresh.backend.full_optimizer_state()
    for n in saved_state["master"]:
        assert T.equal(got["master"][n], saved_state["master"][n])
        assert T.equal(got["state"][n]["exp_avg_sq"], saved_state["state"][n]["exp_avg_sq"])
    assert sorted(fresh.stash) == sorted(engine.stash) == [0, 2, 3]


def test_gradient_checkpointing_key_keeps_weights_and_truncated_backward():
    """lift.gradient_checkpointing: the same weights as without it (float noise), the active layer
    recomputed in backward (so it is on), blocks before the active one run forward once and get no
    gradient (neither recomputed nor back-propagated)."""
    lift = {"total_steps": 6, "layer_range": [2, 4], "include_head": True}
    data = lm_batches(6)
    plain, _, _ = make(lift=lift)
    train(plain, data)
    ckpt, _, _ = make(lift={**lift, "gradient_checkpointing": True})
    assert ckpt.module.is_gradient_checkpointing
    layers = ckpt.module.model.layers
    calls = {}
    for i in (0, 1):
        count_forward_calls(layers[i].mlp, calls, i)
    assert ckpt.active_block == "model.layers.1"
    loss = ckpt(**data[0]).loss
    ckpt.backward(loss)
    assert calls == {0: 1, 1: 2}, calls  # layer 0 once (frozen, before the active block); layer 1 recomputed
    assert all(p.grad is None for p in layers[0].parameters())
    ckpt.step()
    train(ckpt, data[1:])
    for (n, a), (_, b) in zip(plain.module.named_parameters(), ckpt.module.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)


def test_bf16_weights_train_through_fp32_masters():
    """Torch backend with bf16: every weight is 16-bit, the active block steps on fp32 masters (the
    checkpointed master is fp32 and rounds to the weight), and the loss falls."""
    engine, _, _ = make(lift={"total_steps": 16, "layer_range": [4, 4], "include_head": True}, bf16={"enabled": True})
    assert {p.dtype for p in engine.module.parameters()} == {torch.bfloat16}
    losses = train(engine, lm_batches(8))
    state = engine.backend.full_optimizer_state()
    named = dict(engine.module.named_parameters())
    for n, master in state["master"].items():
        assert master.dtype == torch.float32 and torch.equal(master.bfloat16(), named[n].detach())
    losses += train(engine, lm_batches(8, seed=2))
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05, losses
