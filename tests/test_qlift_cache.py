"""Q-LIFT's dense cache (lift.frozen_cache_mb): dense copies of quantized frozen weights, within a
budget, give the training of the uncached run; copies of a layer go when it trains; the layers the
backward passes through keep theirs first."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_quant import make, run

from lift_ds.errors import ConfigError
from lift_ds.qkernels import dequantize
from lift_ds.quant import QuantizedFrozenLinear
from lift_ds.run_config import load_run_config

from helpers import lm_batches

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None, reason="torchao (lift_ds[quant]) not installed"
)


def frozen_modules(engine):
    return {n: m for n, m in engine.module.named_modules() if isinstance(m, QuantizedFrozenLinear)}


def check_cache_consistent(engine):
    """Every copy belongs to a module in the model now, equals its dequantized weight, and is counted."""
    cache = engine.quant.cache
    live = {id(m) for m in frozen_modules(engine).values()}
    held = [m for m, _ in cache._held.values()]
    assert all(id(m) in live for m in held), "a copy of a module no longer in the model"
    assert cache.used == sum(m._dense.numel() * m._dense.element_size() for m in held)
    assert cache.used <= cache.budget
    for m in held:
        assert torch.equal(m._dense, dequantize(m.qweight))


def loss_and_grads(engine, batch, cached: bool):
    """The model's loss and the trained parameters' gradients, through the dense copies or not."""
    mods = frozen_modules(engine).values()
    saved = [m._cache for m in mods]
    if not cached:
        for m in mods:
            m._cache = None
    try:
        loss = engine.module(**batch).loss
        loss.backward()
    finally:
        for m, c in zip(mods, saved):
            m._cache = c
    grads = {n: p.grad.clone() for n, p in engine.module.named_parameters() if p.grad is not None}
    engine.module.zero_grad(set_to_none=True)
    return loss.item(), grads


@pytest.mark.parametrize("mode", ["nf4", "int8"])
@pytest.mark.parametrize("policy", ["grouped", "cyclic"])
def test_cached_layers_give_the_loss_and_gradients_of_dequantizing(mode, policy):
    """At every step of a run (layers trained, frozen again, trained again under cyclic), the loss and
    gradients through the dense copies equal those through the chunked kernel (float noise: one matmul
    against chunked ones), and the copies are those of the weights in the model now."""
    engine = make(mode, steps=8, policy=policy, frozen_cache_mb=16)
    for b in lm_batches(8, vocab=128, seed=1):
        want_loss, want = loss_and_grads(engine, b, cached=False)
        got_loss, got = loss_and_grads(engine, b, cached=True)
        assert got_loss == pytest.approx(want_loss, rel=1e-6)
        assert sorted(got) == sorted(want) and got
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)
        engine.backward(engine(**b).loss)
        engine.step()
        check_cache_consistent(engine)
    assert engine.quant.cache.stats["copies"] > 0 and engine.quant.bytes()["dense_cache_bytes"] > 0


def test_a_layer_that_trains_loses_its_copies_and_the_cache_forgets_nothing_else():
    engine = make("nf4", steps=8, frozen_cache_mb=16)  # front2end, grouped: 2 steps per layer
    run(engine, 1)  # phase 0 (steps 1-2): layer 0 trains, layers 1-3 cached
    cached_layers = {n.rsplit(".", 2)[0] for n, m in frozen_modules(engine).items() if m._dense is not None}
    assert cached_layers == {"model.layers.1", "model.layers.2", "model.layers.3"}
    run(engine, 3)  # phase 1 (steps 3-4): layer 1 active, its copies gone; layer 0 frozen again (new modules)
    assert engine.active_block == "model.layers.1"
    assert not any(n.startswith("model.layers.1.") for n in frozen_modules(engine))
    check_cache_consistent(engine)
    engine.close()
    assert engine.quant.cache.used == 0 and not engine.quant.cache._held


def test_within_a_small_budget_the_layers_above_the_active_one_keep_their_copies():
    """A budget of one layer's weights: in phase 1 (layer 1 active) layer 0 is copied first (forward
    only), then layer 2 (forward and backward) takes its place and layer 3 finds no room."""
    engine = make("nf4", steps=8, frozen_cache_mb=16)
    mods = frozen_modules(engine)
    one_layer = sum(m.qweight.numel() * 4 for n, m in mods.items() if n.startswith("model.layers.3."))
    engine.quant.cache.budget = one_layer
    run(engine, 3)
    assert engine.active_block == "model.layers.1"
    held = {n.rsplit(".", 2)[0] for n, m in frozen_modules(engine).items() if m._dense is not None}
    assert held == {"model.layers.2"}, held
    assert engine.quant.cache.stats["evictions"] > 0
    check_cache_consistent(engine)


@pytest.mark.parametrize(
    "lift, needle",
    [
        ({"frozen_weights": "full"}, "lift.frozen_cache_mb: 64 keeps dense copies of quantized frozen layers"),
        ({"frozen_weights": "nf4", "stream_frozen": True}, "lift.stream_frozen: true keeps no frozen layer in memory"),
    ],
)
def test_cache_with_nothing_to_cache_is_a_config_error(lift, needle):
    with pytest.raises(ConfigError) as info:
        load_run_config({"lift": {"total_steps": 4, "frozen_cache_mb": 64, **lift}})
    assert needle in str(info.value), str(info.value)


def test_negative_budget_is_a_config_error():
    with pytest.raises(ConfigError, match="lift.frozen_cache_mb: must be an integer >= 0, got -1"):
        load_run_config({"lift": {"total_steps": 4, "frozen_weights": "nf4", "frozen_cache_mb": -1}})
