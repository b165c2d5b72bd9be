"""Streamed frozen layers (lift.stream_frozen) and the origin-backed block store, on one process:
the same weights as resident layers, at most K layers in memory, nothing untrained written, resume,
and an export whose untrained layers are the origin's, bit for bit."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import lift_ds
from lift_ds.errors import ConfigError
from lift_ds.run_config import load_run_config
from lift_ds.stream import CAPACITY, StreamedFrozenLinear

from helpers import lm_batches, make_model_dir, snapshot, tiny_llama, tiny_llama_config

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None, reason="torchao (lift_ds[quant]) not installed"
)


def make(model, steps=8, **lift):
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.0, "lift": {"total_steps": steps, **lift}}
    engine, _, _, _ = lift_ds.initialize(model=model, config=cfg, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    return engine


def run(engine, n=None):
    losses = []
    for b in lm_batches(engine.plan.total_steps, vocab=128, seed=1)[engine.global_step : n]:
        loss = engine(**b).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def weights(engine):
    return {**snapshot(engine.module), **(engine.quant.exact_weights() if engine.quant is not None else {})}


@pytest.mark.parametrize("mode, checkpointing", [("nf4", False), ("int8", False), ("full", False), ("nf4", True)])
def test_streamed_run_equals_resident_run(mode, checkpointing):
    """Every weight and every loss of a streamed run equals the resident run's, bit for bit (the
    frozen layers' arithmetic is the same; only where their weights live changes), with activation
    checkpointing's recomputation too; the layers really were streamed and read ahead."""
    kw = dict(steps=10, policy="cyclic", frozen_weights=mode, gradient_checkpointing=checkpointing)
    resident, streamed = (
        make(tiny_llama(layers=5, hidden=64), **kw),
        make(tiny_llama(layers=5, hidden=64), stream_frozen=True, **kw),
    )
    assert run(resident) == run(streamed)
    a, b = weights(resident), weights(streamed)
    assert sorted(a) == sorted(b) and len(a) == sum(1 for _ in tiny_llama(layers=5, hidden=64).parameters())
    for n in a:
        assert torch.equal(a[n], b[n]), n
    stats = streamed.quant.streamer.stats
    assert stats["loads"] >= 10 * 3 and stats["misses"] == 0, stats
    assert any(isinstance(m, StreamedFrozenLinear) for m in streamed.module.modules())


def _replay(trace):
    """Layers in memory after each event, from the streamer's own log of loads and evictions."""
    resident, most, served_from_memory = set(), 0, True
    for event, layer in trace:
        if event == "load":
            resident.add(layer)
        elif event == "evict":
            resident.discard(layer)
        else:
            served_from_memory &= layer in resident
        most = max(most, len(resident))
    return most, served_from_memory


@pytest.mark.parametrize("layers", [4, 10])
def test_at_most_capacity_layers_in_memory_whatever_the_depth(layers):
    """Counted from the load / evict log: never more than CAPACITY frozen layers in memory, every weight
    served from memory, none during an optimizer step, and the buffers (reused from layer to layer)
    and their bytes do not grow with depth; each frozen layer is read at most twice per step
    (forward and backward)."""
    engine = make(
        tiny_llama(layers=layers, hidden=64), steps=4, layer_range=[1, 1], frozen_weights="nf4", stream_frozen=True
    )
    streamer = engine.quant.streamer
    streamer.trace = []
    during_step = []
    handle = register_optimizer_step_pre_hook(
        lambda *a: during_step.append(len(streamer.materialised()) + len(streamer._pool))
    )
    try:
        run(engine)
    finally:
        handle.remove()
    assert during_step == [0] * 4  # nothing frozen in memory beside the step's gradients and moments
    most, served = _replay(streamer.trace)
    assert most <= CAPACITY and served and streamer.stats["peak_materialised"] <= CAPACITY
    assert len(streamer.materialised()) + len(streamer._pool) <= CAPACITY
    held = sum(t.numel() * t.element_size() for bufs in streamer._pool for t in bufs.values())
    one_layer = streamer.file_bytes() / len(streamer.layers())
    assert held <= CAPACITY * one_layer * 1.01
    frozen = layers - 1
    assert streamer.stats["loads"] <= 4 * 2 * frozen and streamer.stats["misses"] == 0


def _recorder(model):
    last = {}

    def hook(opt, args, kwargs):
        names = {id(p): n for n, p in model.named_parameters()}
        last.update({names[id(p)]: p.detach().clone() for g in opt.param_groups for p in g["params"] if id(p) in names})

    return last, register_optimizer_step_post_hook(hook)


def _exported(engine, path):
    import json

    from lift_ds.export import save_hf_checkpoint
    from lift_ds.tensorfile import read_file

    save_hf_checkpoint(engine, path)
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    return {n: read_file(path / f, [n])[n] for n, f in index.items()}


@pytest.mark.parametrize("source", ["checkpoint", "random_init"])
def test_origin_backed_store_writes_only_trained_layers_and_exports_exactly(tmp_path, source):
    """A model built layer by layer, streamed: the disk store writes the two layers that trained and no
    other; the export's untrained layers equal the origin bit for bit (the checkpoint's tensors, or the
    seeded init drawn again by a fresh build) and its trained layers their weights after the last step."""
    from transformers import AutoModelForCausalLM

    from lift_ds.quant import make_streamer
    from lift_ds.quant_load import build_quantized_model
    from lift_ds.store import BlockStore

    d = make_model_dir(tmp_path / "m", layers=4, hidden=64)

    def build(store_dir, backed=True):
        return build_quantized_model(
            str(d),
            "nf4",
            BlockStore("disk", store_dir),
            random_init=source == "random_init",
            seed=3,
            streamer=make_streamer(None),
            origin_backed=backed,
        )

    model = build(tmp_path / "store")
    # what the run starts from: the checkpoint, or the values a build that writes every layer drew
    start = build(tmp_path / "written", backed=False).lift_block_store
    origin = (
        snapshot(AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32))
        if source == "checkpoint"
        else {n: t for b in (f"model.layers.{i}" for i in range(4)) for n, t in start.get(b).items()}
    )
    assert list((tmp_path / "store").iterdir()) == []
    last, handle = _recorder(model)
    try:
        engine = make(model, steps=4, layer_range=[2, 3], frozen_weights="nf4", stream_frozen=True)
        run(engine)
    finally:
        handle.remove()
    assert model.lift_block_store.written() == ["model.layers.1"]  # the last phase's layer is still live
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["model.layers.1.safetensors"]
    out = _exported(engine, tmp_path / "hf")
    trained = {n for n in last if n.startswith(("model.layers.1.", "model.layers.2."))}
    assert len(trained) == 18
    for n in trained:
        assert torch.equal(out[n], last[n]), n
    for i in (0, 3):
        names = [n for n in out if n.startswith(f"model.layers.{i}.") and n.endswith("proj.weight")]
        assert len(names) == 7
        for n in names:
            assert torch.equal(out[n], origin[n]), n


def test_kill_and_resume_streamed_equals_uninterrupted(tmp_path):
    """Save mid-phase (step 3 of 8, grouped), resume in a fresh, freshly built, streamed engine: the
    same final weights, bit for bit, as the uninterrupted run."""
    from lift_ds.quant import make_streamer
    from lift_ds.quant_load import build_quantized_model
    from lift_ds.store import BlockStore

    d = make_model_dir(tmp_path / "m", layers=4, hidden=64)

    def engine():
        model = build_quantized_model(str(d), "nf4", BlockStore("memory"), streamer=make_streamer(None))
        return make(model, steps=8, frozen_weights="nf4", stream_frozen=True)

    full = engine()
    run(full)
    want = weights(full)
    first = engine()
    run(first, 3)
    first.save_checkpoint(tmp_path / "ck")
    first.close()
    second = engine()
    path, _ = second.load_checkpoint(tmp_path / "ck")
    assert path is not None and second.global_step == 3
    assert len(run(second)) == 5
    got = weights(second)
    assert sorted(got) == sorted(want)
    for n in want:
        assert torch.equal(got[n], want[n]), n


def test_a_layer_built_streamed_trains_its_linear_weights(tmp_path):
    """The plan sees a streamed layer's linear weights (they are not parameters while frozen): when the
    layer becomes active they come back as parameters and change."""
    from lift_ds.quant import make_streamer
    from lift_ds.quant_load import build_quantized_model
    from lift_ds.store import BlockStore

    model = build_quantized_model(
        "unused",
        "full",
        BlockStore("memory"),
        random_init=True,
        config=tiny_llama_config(layers=3, hidden=64),
        streamer=make_streamer(None),
    )
    before = model.lift_block_store.get("model.layers.0")["model.layers.0.mlp.up_proj.weight"].clone()
    engine = make(model, steps=2, layer_range=[1, 1], stream_frozen=True)
    assert "model.layers.0.mlp.up_proj.weight" in engine.trainable_param_names()
    run(engine)
    assert not torch.equal(dict(model.named_parameters())["model.layers.0.mlp.up_proj.weight"], before)


@pytest.mark.parametrize(
    "top, lift, method, needle",
    [
        (
            {"zero_optimization": {"stage": 3}},
            {"backend": "deepspeed"},
            "lift",
            "lift.stream_frozen: true needs the frozen layers whole",
        ),
        ({"fsdp": {}}, {"backend": "fsdp"}, "lift", "lift.stream_frozen: true: FSDP2 shards every layer"),
        ({}, {}, "full", "lift.stream_frozen: true streams LIFT's frozen layers; --baseline full"),
        (
            {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW8bit", "params": {"lr": 1e-3}}},
            {"backend": "deepspeed"},
            "lift",
            (
                "optimizer.type: 'AdamW8bit' updates 16-bit weights "
                "without fp32 masters, which only the torch backend runs"
            ),
        ),
    ],
)
def test_refused_combinations_are_config_errors(top, lift, method, needle):
    cfg = {**top, "lift": {"total_steps": 4, "stream_frozen": True, **lift}}
    with pytest.raises(ConfigError) as info:
        load_run_config(cfg, world_size=2 if lift.get("backend") else 1, method=method)
    assert needle in str(info.value), str(info.value)


@pytest.mark.slow  # torchao compiles its step (about 20-100 s on 2 cores the first time; cached after)
def test_adamw8bit_trains_bf16_weights_without_fp32_masters():
    """The active layer's memory option chosen for a 70B layer on 24 GB: torchao's AdamW8bit updates
    the bf16 weights itself (stochastic rounding, no fp32 master, bf16 gradients); its moments take
    about a quarter of AdamW's fp32 moments; the loss on a repeated batch falls."""
    model = tiny_llama(layers=2, hidden=64)
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW8bit", "params": {"lr": 3e-3, "weight_decay": 0.0}},
        "lift": {"total_steps": 6, "layer_range": [2, 2], "frozen_weights": "nf4", "stream_frozen": True},
    }
    engine, _, _, _ = lift_ds.initialize(model=model, config=cfg)
    assert type(engine.optimizer).__name__ == "AdamW8bit" and engine.optimizer.bf16_stochastic_round
    params = engine.backend.active_params()
    assert engine.backend._masters is engine.backend._params and all(p.dtype == torch.bfloat16 for p in params)
    batch = lm_batches(1, vocab=128, seed=4)[0]
    losses = []
    while not engine.done:
        loss = engine(**batch).loss
        engine.backward(loss)
        assert all(p.grad.dtype == torch.bfloat16 for p in params)
        engine.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    big = [p for p in params if p.numel() >= 4096]
    state = sum(
        t.codes.numel() + t.scale.numel() * 4
        for p in big
        for t in (engine.optimizer.state[p]["exp_avg"], engine.optimizer.state[p]["exp_avg_sq"])
    )
    assert state < 0.27 * sum(8 * p.numel() for p in big)
