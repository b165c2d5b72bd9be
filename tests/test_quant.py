"""Q-LIFT (lift.frozen_weights int8 / nf4) on one process: the block store's semantics, resume, and
the combinations refused before anything starts."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import lift_ds
from lift_ds.errors import ConfigError
from lift_ds.quant import QuantizedFrozenLinear, quantize_weight, tensor_bytes
from lift_ds.run_config import load_run_config

from helpers import lm_batches, snapshot, tiny_llama

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None, reason="torchao (lift_ds[quant]) not installed"
)

LAYERS = [f"model.layers.{i}" for i in range(4)]


def make(mode="nf4", steps=8, model=None, **lift):
    model = model or tiny_llama(layers=4, hidden=64)
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_clipping": 0.0,
        "lift": {"total_steps": steps, "frozen_weights": mode, **lift},
    }
    engine, _, _, _ = lift_ds.initialize(model=model, config=cfg, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    return engine


class StepRecorder:
    """The active parameters' values right before and right after every optimizer step."""

    def __init__(self, model):
        self.model, self.pre, self.post = model, [], []
        self.handles = [
            register_optimizer_step_pre_hook(lambda o, a, k: self.pre.append(self._values(o))),
            register_optimizer_step_post_hook(lambda o, a, k: self.post.append(self._values(o))),
        ]

    def _values(self, opt):
        names = {id(p): n for n, p in self.model.named_parameters()}
        return {names[id(p)]: p.detach().clone() for g in opt.param_groups for p in g["params"] if id(p) in names}

    def close(self):
        for h in self.handles:
            h.remove()


def run(engine, n=None, seed=1):
    data = lm_batches(engine.plan.total_steps, vocab=128, seed=seed)
    losses = []
    for b in data[engine.global_step : n]:
        loss = engine(**b).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def exported(engine, tmp_path):
    from transformers import AutoModelForCausalLM

    from lift_ds.export import save_hf_checkpoint

    save_hf_checkpoint(engine, tmp_path / "hf")
    return snapshot(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"))


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_frozen_layers_are_quantized_and_the_active_one_is_not(mode):
    engine = make(mode, policy="cyclic")
    layers = engine.module.model.layers
    for _ in range(4):
        active = engine.active_block
        for name, layer in zip(LAYERS, layers):
            kinds = {type(m) for m in (layer.self_attn.q_proj, layer.mlp.down_proj)}
            assert kinds == ({torch.nn.Linear} if name == active else {QuantizedFrozenLinear}), (name, active, kinds)
        trainable = [n for n, p in engine.module.named_parameters() if p.requires_grad]
        assert trainable and all(n.startswith(active + ".") for n in trainable)
        run(engine, engine.global_step + 1)
    # embedding and head are never quantized
    assert type(engine.module.lm_head) is torch.nn.Linear


@pytest.mark.parametrize("mode, bound", [("nf4", 0.30), ("int8", 0.55)])
def test_census_of_quantized_bytes(mode, bound):
    engine = make(mode)
    counts = engine.quant.bytes()
    assert counts["bf16_bytes"] == 2 * sum(
        p.numel()
        for n, p in tiny_llama(layers=4, hidden=64).named_parameters()
        if "proj" in n and not n.startswith(engine.active_block + ".")
    )
    assert counts["quantized_bytes"] <= bound * counts["bf16_bytes"], counts
    # the count is of the tensors themselves
    w = torch.randn(128, 64)
    assert tensor_bytes(quantize_weight(w, mode)) < tensor_bytes(w)


def test_store_holds_exactly_what_the_optimizer_produced_and_export_is_the_store(tmp_path):
    """layer_range [2, 3], grouped, 2 steps per layer: layers 1 and 4 never train (bit-identical to the
    start in the export); a trained layer in the export equals its weights after its last optimizer
    step, not a dequantized copy of them."""
    model = tiny_llama(layers=4, hidden=64)
    start = snapshot(model)
    rec = StepRecorder(model)
    try:
        engine = make("nf4", steps=4, model=model, layer_range=[2, 3])
        run(engine)
    finally:
        rec.close()
    out = exported(engine, tmp_path)
    assert sorted(out) == sorted(start)
    for n in start:
        if n.startswith(("model.layers.0.", "model.layers.3.", "model.embed", "lm_head", "model.norm")):
            assert torch.equal(out[n], start[n]), n
    last = {}
    for post in rec.post:
        last.update(post)
    assert sorted(last) == sorted(n for n in start if n.startswith(("model.layers.1.", "model.layers.2.")))
    for n, value in last.items():
        assert torch.equal(out[n], value), n
        if n.endswith("proj.weight"):
            dequantized = quantize_weight(value, "nf4").get_original_weight()
            assert not torch.equal(out[n], dequantized), n


def test_cyclic_layer_comes_back_with_its_trained_weights():
    """Each layer is active twice (cyclic, 8 steps): the second time it starts from the weights its
    first phase ended with, exactly (from the store, not from its quantized copy)."""
    model = tiny_llama(layers=4, hidden=64)
    rec = StepRecorder(model)
    try:
        engine = make("nf4", steps=8, model=model, policy="cyclic")
        run(engine)
    finally:
        rec.close()
    assert len(rec.pre) == 8
    for first in range(4):
        second = first + 4
        assert sorted(rec.pre[second]) == sorted(rec.post[first])
        for n, value in rec.post[first].items():
            assert torch.equal(rec.pre[second][n], value), n


def test_disk_store_equals_memory_store(tmp_path):
    mem = make("nf4", policy="cyclic")
    run(mem)
    disk = make("nf4", policy="cyclic", block_store="disk", block_store_dir=str(tmp_path / "store"))
    run(disk)
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == sorted(f"{n}.safetensors" for n in LAYERS)
    a, b = mem.quant.exact_weights(), disk.quant.exact_weights()
    assert sorted(a) == sorted(b) and a
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    """Save at step 3 (mid-phase, grouped, 2 steps per layer), resume in a fresh engine: the same final
    weights, bit for bit, as the uninterrupted run; the trained layers' exact weights come from the
    checkpoint's block store (loading it is what makes the test pass)."""
    full = make("nf4", steps=8)
    run(full)
    want = {**snapshot(full.module), **full.quant.exact_weights()}

    first = make("nf4", steps=8)
    run(first, 3)
    first.save_checkpoint(tmp_path / "ck")
    assert (tmp_path / "ck" / "global_step3" / "block_store.safetensors").is_file()
    second = make("nf4", steps=8)
    path, _ = second.load_checkpoint(tmp_path / "ck")
    assert path is not None and second.global_step == 3 and second.active_block == "model.layers.1"
    assert len(run(second)) == 5
    got = {**snapshot(second.module), **second.quant.exact_weights()}
    assert sorted(got) == sorted(want)
    for n in want:
        assert torch.equal(got[n], want[n]), n


@pytest.mark.parametrize(
    "top, lift, method, needle",
    [
        ({"zero_optimization": {"stage": 3}}, {"backend": "deepspeed"}, "lift", "ZeRO-3 partitions them"),
        ({"fsdp": {}}, {"backend": "fsdp"}, "lift", "FSDP2 shards every layer"),
        ({}, {}, "full", "--baseline full"),
        ({}, {"block_store_dir": "/tmp/x"}, "lift", "lift.block_store_dir: set, but lift.block_store is 'memory'"),
        ({}, {"block_store": "tape"}, "lift", "lift.block_store: got 'tape'; allowed: memory, disk"),
    ],
)
def test_invalid_combinations_are_config_errors(top, lift, method, needle):
    cfg = {**top, "lift": {"total_steps": 4, "frozen_weights": "nf4", **lift}}
    with pytest.raises(ConfigError) as info:
        load_run_config(cfg, world_size=2 if lift.get("backend") else 1, method=method)
    assert needle in str(info.value), str(info.value)


def test_unknown_mode_and_missing_torchao_are_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match="lift.frozen_weights: got 'fp4'; allowed: full, int8, nf4"):
        load_run_config({"lift": {"total_steps": 4, "frozen_weights": "fp4"}})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'lift_ds\[quant\]'"):
        load_run_config({"lift": {"total_steps": 4, "frozen_weights": "int8"}})


def test_nf4_weight_of_unsupported_size_is_a_clear_error():
    model = tiny_llama(layers=4, hidden=24)  # k_proj 12 x 24 = 288 elements: not a multiple of NF4's block of 64
    with pytest.raises(
        ConfigError,
        match=(
            r"nf4 needs weights whose size is a multiple of 64; "
            r"model.layers.\d.self_attn.k_proj.weight has shape \[12, 24\]"
        ),
    ):
        make("nf4", model=model)


@pytest.mark.parametrize("tie", [False, True])
def test_layer_by_layer_build_equals_loading_then_quantizing(tmp_path, tie):
    """build_quantized_model reads the checkpoint layer by layer; its store, backed by the checkpoint,
    writes nothing and gives the checkpoint's exact weights, its quantized layers equal quantizing the
    loaded model, and a LIFT run on it equals a run on the loaded model (the engine adopts its store)."""
    from transformers import AutoModelForCausalLM

    from lift_ds.quant import BlockStore
    from lift_ds.quant_load import build_quantized_model

    from helpers import make_model_dir

    d = make_model_dir(tmp_path / "m", hidden=64, tie=tie)
    loaded = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    loaded.config.use_cache = False
    want = snapshot(loaded)
    built = build_quantized_model(str(d), "nf4", BlockStore("disk", tmp_path / "store"))
    assert list((tmp_path / "store").iterdir()) == [] and built.lift_block_store.written() == []
    live = snapshot(built)
    stored = {n: t for b in LAYERS for n, t in built.lift_block_store.get(b).items()}
    assert sorted(live) + sorted(stored) and sorted([*live, *stored]) == sorted(want)
    for n, t in {**live, **stored}.items():
        assert torch.equal(t, want[n]), n
    q = built.model.layers[2].mlp.up_proj.qweight
    assert torch.equal(
        q.get_original_weight(), quantize_weight(want["model.layers.2.mlp.up_proj.weight"], "nf4").get_original_weight()
    )
    if tie:
        assert built.lm_head.weight is built.model.embed_tokens.weight
    a, b = make("nf4", model=loaded, policy="cyclic"), make("nf4", model=built, policy="cyclic")
    assert b.quant.store is built.lift_block_store
    run(a), run(b)
    wa, wb = {**snapshot(a.module), **a.quant.exact_weights()}, {**snapshot(b.module), **b.quant.exact_weights()}
    for n in wa:
        assert torch.equal(wa[n], wb[n]), n


def test_layer_by_layer_random_init_has_the_models_init(tmp_path):
    from lift_ds.quant import BlockStore
    from lift_ds.quant_load import build_quantized_model

    from helpers import tiny_llama_config

    cfg = tiny_llama_config(layers=4, hidden=64)
    built = build_quantized_model("unused", "int8", BlockStore("memory"), random_init=True, config=cfg)
    w = built.lift_block_store.get("model.layers.1")["model.layers.1.mlp.up_proj.weight"]
    assert (
        abs(w.std().item() - cfg.initializer_range) < 0.002 and built.model.layers[1].input_layernorm.weight.eq(1).all()
    )
    assert built.model.rotary_emb.inv_freq.is_meta is False
    out = built(input_ids=torch.randint(0, 128, (2, 8)), labels=torch.randint(0, 128, (2, 8)))
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_casting_the_model_keeps_the_layers_quantized(mode):
    """The torch backend casts the model to bf16 (``model.to(dtype=...)``): a quantized weight must stay
    quantized (torchao's NF4 ``.to(dtype)`` would return a dense tensor)."""
    engine = make(mode)
    before = engine.quant.bytes()
    engine.module.to(dtype=torch.bfloat16)
    engine.module.to("cpu")
    assert engine.quant.bytes() == before
    q = engine.module.model.layers[3].mlp.up_proj.qweight
    assert type(q).__name__ in ("NF4Tensor", "Int8Tensor")


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantized_layers_survive_a_replaced_functional_linear(monkeypatch, mode):
    """A ZeRO-3 engine leaves torch.nn.functional.linear replaced by DeepSpeed's own (seen: a 2-rank
    job whose ZeRO-3 scenario ran first); quantized layers must not go through it."""
    engine = make(mode)
    real = torch.nn.functional.linear

    def replaced(x, w, b=None):
        assert type(w) in (torch.Tensor, torch.nn.Parameter), (
            f"a quantized weight went through the replaced linear: {type(w).__name__}"
        )
        return real(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", replaced)
    b = lm_batches(1, vocab=128)[0]
    loss = engine(**b).loss
    engine.backward(loss)
    engine.step()
    assert torch.isfinite(loss)
