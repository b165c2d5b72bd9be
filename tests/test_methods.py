"""The BAdam and LISA presets (lift.method) on one process: their plans, config errors, and BAdam
1.4's own BlockOptimizer as the reference."""

import contextlib
import io
from collections import Counter

import pytest
import torch

import lift_ds
from lift_ds.errors import ConfigError
from lift_ds.optim import optimizer_state_elements
from lift_ds.schedule import badam_phases, lisa_sets, method_plan, phases, plan, plan_fingerprint

from helpers import lm_batches, snapshot, tiny_llama

ADAMW = dict(lr=1e-2, eps=1e-3, weight_decay=0.01)


# --------------------------------------------------------------------------- plans (pure Python)


def test_badam_switches_like_block_optimizer():
    # BAdam switches after step g when (g + 1) % K == 0: the first block gets K - 1 steps, later ones K
    assert badam_phases(4, 12, 3, "end2front") == [(3, 2), (2, 3), (1, 3), (0, 3), (3, 1)]
    assert badam_phases(3, 7, 3, "front2end") == [(0, 2), (1, 3), (2, 2)]
    assert badam_phases(3, 4, 1) == [(0, 1), (1, 1), (2, 1), (0, 1)]


def test_badam_random_is_a_fresh_permutation_per_pass():
    ph = badam_phases(5, 2 + 3 * 19, 3, "random", seed=4)
    blocks = [b for b, _ in ph]
    for p in range(0, 20, 5):
        assert sorted(blocks[p : p + 5]) == list(range(5)), blocks
    assert len({tuple(blocks[p : p + 5]) for p in range(0, 20, 5)}) > 1, "every pass in the same order"
    assert badam_phases(5, 59, 3, "random", seed=4) == ph and badam_phases(5, 59, 3, "random", seed=5) != ph


def test_every_badam_switch_is_a_phase_even_on_the_same_block():
    # a pass may end on the block the next starts with: BAdam still switches (fresh Adam state)
    units, steps = method_plan("badam", 2, 40, "random", switch_every=2, seed=0)
    blocks = [units[u][0] for u in steps]
    assert len(phases(steps)) == len(units) > len(phases(blocks)), "no repeated block at a pass boundary in this plan"


def test_lisa_draws_gamma_distinct_layers_per_period():
    sets = lisa_sets(8, 50, 5, 3, seed=2)
    assert len(sets) == 10 and all(
        len(set(s)) == 3 and list(s) == sorted(s) and 0 <= min(s) and max(s) < 8 for s in sets
    )
    counts = Counter(i for s in lisa_sets(8, 4000, 5, 3, seed=2) for i in s)
    assert min(counts.values()) > 0.8 * max(counts.values()), counts  # uniform over the layers
    units, steps = method_plan("lisa", 8, 12, switch_every=5, lisa_layers=3, seed=2)
    assert steps == [0] * 5 + [1] * 5 + [2] * 2 and units == sets[:3]
    with pytest.raises(ValueError, match="lisa_layers must be at most the 8"):
        lisa_sets(8, 10, 5, 9)


def test_fingerprint_sees_units_and_keeps_lift_digests():
    steps = plan(4, 8)
    assert plan_fingerprint(steps, [(i,) for i in range(4)]) == plan_fingerprint(steps)
    a = method_plan("lisa", 6, 12, switch_every=4, seed=0)
    b = method_plan("lisa", 6, 12, switch_every=4, seed=1)
    assert a[1] == b[1] and plan_fingerprint(a[1], a[0]) != plan_fingerprint(b[1], b[0])


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "lift, needle",
    [
        ({"switch_every": 5}, "lift.switch_every: applies to method badam or lisa, not lift"),
        ({"lisa_layers": 2}, "lift.lisa_layers: applies to method badam or lisa, not lift"),
        ({"method": "badam", "policy": "cyclic"}, "lift.policy: 'cyclic' is LIFT's"),
        ({"method": "lisa", "optimizer_state": "offload"}, "lift.optimizer_state: 'offload' keeps a block's state"),
        ({"method": "lisa", "include_head": True}, "lift.include_head: method lisa trains the embedding and the head"),
        ({"method": "lisa", "schedule": "end2front"}, "lift.schedule: 'end2front' orders LIFT / BAdam blocks"),
        ({"method": "badam", "lisa_layers": 2}, "lift.lisa_layers: applies to method lisa, not badam"),
        ({"method": "lisa", "lisa_layers": 5}, "lift.lisa_layers: 5 is more than the 4 candidate layers"),
        ({"method": "hift"}, "lift.method: got 'hift'; allowed: lift, badam, lisa"),
        ({"method": "badam", "switch_every": 0}, "lift.switch_every: must be an integer >= 1"),
    ],
)
def test_contradicting_keys_are_errors(lift, needle):
    with pytest.raises(ConfigError) as info:
        lift_ds.initialize(
            model=tiny_llama(),
            config={"train_micro_batch_size_per_gpu": 2, "lift": {"total_steps": 8, **lift}},
            optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2),
        )
    assert needle in str(info.value), str(info.value)


# --------------------------------------------------------------------------- on the engine


def _run_lift_ds(lift: dict, steps: int, batches: list) -> tuple[dict, list]:
    model = tiny_llama()
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_clipping": 0.0,
        "lift": {"backend": "torch", "total_steps": steps, **lift},
    }
    engine, _, _, _ = lift_ds.initialize(model=model, config=cfg, optimizer=lambda ps: torch.optim.AdamW(ps, **ADAMW))
    seen = []
    for b in batches[:steps]:
        seen.append(
            (
                engine.active_block,
                sorted(n for n, p in model.named_parameters() if p.requires_grad),
                optimizer_state_elements(engine.optimizer),
            )
        )
        engine.backward(engine(**b).loss)
        engine.step()
    engine.close()
    return snapshot(model), seen


def _run_block_optimizer(mode: str, every: int, steps: int, batches: list, embedding: bool, head: bool) -> dict:
    from badam import BlockOptimizer

    model = tiny_llama()
    base = torch.optim.AdamW(model.parameters(), **ADAMW)
    with contextlib.redirect_stdout(io.StringIO()):  # BAdam prints every switch
        opt = BlockOptimizer(
            base,
            list(model.named_parameters()),
            switch_block_every=every,
            switch_mode=mode,
            include_embedding=embedding,
            include_lm_head=head,
            verbose=0,
        )
        for b in batches[:steps]:
            model(**b).loss.backward()
            opt.step()
    return snapshot(model)


@pytest.mark.parametrize(
    "mode, schedule, embedding, head",
    [
        ("descending", "end2front", True, True),
        ("ascending", "front2end", False, False),
    ],
)
def test_badam_equals_block_optimizer(mode, schedule, embedding, head):
    """BAdam 1.4's BlockOptimizer (same model, data, order, K, AdamW) and --method badam: the same
    weights within 1e-3 of the largest move; parameters outside BAdam's blocks never move."""
    pytest.importorskip("badam")
    batches, steps, every = lm_batches(14, batch=4), 14, 3
    start = snapshot(tiny_llama())
    ref = _run_block_optimizer(mode, every, steps, batches, embedding, head)
    ours, seen = _run_lift_ds(
        {
            "method": "badam",
            "switch_every": every,
            "schedule": schedule,
            "include_embedding": embedding,
            "include_head": head,
        },
        steps,
        batches,
    )
    move = max((ref[n] - start[n]).abs().max().item() for n in ref)
    err = max((ours[n] - ref[n]).abs().max().item() for n in ref)
    assert move > 1e-2 and err <= 1e-3 * move, (err, move)
    assert [s[0] for s in seen][: every + 1] == [seen[0][0]] * (every - 1) + [
        seen[every - 1][0]
    ] * 2  # K-1 steps, then K
    if not head:  # BAdam without its lm_head block trains neither the final norm nor lm_head
        assert torch.equal(ours["lm_head.weight"], start["lm_head.weight"]) and torch.equal(
            ours["model.norm.weight"], start["model.norm.weight"]
        )


def test_badam_clears_adam_state_at_every_switch():
    _, seen = _run_lift_ds(
        {"method": "badam", "switch_every": 2, "schedule": "random", "seed": 3}, 9, lm_batches(9, batch=4)
    )
    # steps 0 | 1 2 | 3 4 | 5 6 | 7 8: a fresh optimizer (no state) at the first step of each
    assert [s[2] == 0 for s in seen] == [True, True, False, True, False, True, False, True, False], seen


def test_lisa_trains_embedding_head_and_the_drawn_layers():
    steps, every = 9, 3
    ours, seen = _run_lift_ds(
        {"method": "lisa", "switch_every": every, "lisa_layers": 2, "seed": 7}, steps, lm_batches(steps, batch=4)
    )
    sets = lisa_sets(4, steps, every, 2, seed=7)
    always = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    start = snapshot(tiny_llama())
    trained = set()
    for k, (name, names, state) in enumerate(seen):
        layers = sets[k // every]
        assert name == "+".join(f"model.layers.{i}" for i in layers), name
        expected = always | {n for n in start if any(n.startswith(f"model.layers.{i}.") for i in layers)}
        assert set(names) == expected, (k, sorted(set(names) ^ expected))
        trained |= expected
        # a fresh AdamW at the start of every period, then the moments of exactly what trains
        assert state == (0 if k % every == 0 else 2 * sum(start[n].numel() for n in expected)), (k, state)
    for n in start:
        assert torch.equal(ours[n], start[n]) == (n not in trained), n
