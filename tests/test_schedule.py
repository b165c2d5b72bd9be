import itertools
from collections import Counter

import pytest

from lift_ds.schedule import POLICIES, SCHEDULES, PhaseCursor, phases, plan, slot_order


@pytest.mark.parametrize("schedule,policy", list(itertools.product(SCHEDULES, POLICIES)))
@pytest.mark.parametrize("n,t", [(1, 1), (4, 8), (4, 10), (5, 3), (12, 100), (7, 7)])
def test_plan_length_counts_and_shape(schedule, policy, n, t):
    steps = plan(n, t, schedule, policy, seed=5)
    assert len(steps) == t
    assert all(0 <= b < n for b in steps)
    order = slot_order(n, schedule, seed=5)
    base, extra = divmod(t, n)
    # every slot gets floor(t/N), the first t mod N slots one more
    expected = Counter()
    for i, b in enumerate(order):
        expected[b] += base + (1 if i < extra else 0)
    assert Counter(steps) == +expected


def test_paper_examples():
    assert plan(4, 8, "front2end", "cyclic") == [0, 1, 2, 3, 0, 1, 2, 3]
    assert plan(4, 8, "front2end", "grouped") == [0, 0, 1, 1, 2, 2, 3, 3]
    assert plan(4, 8, "end2front", "grouped") == [3, 3, 2, 2, 1, 1, 0, 0]
    assert plan(4, 8, "end2front", "cyclic") == [3, 2, 1, 0, 3, 2, 1, 0]


def test_remainder_goes_to_first_slots():
    assert plan(4, 10, "front2end", "grouped") == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    assert plan(4, 10, "end2front", "grouped") == [3, 3, 3, 2, 2, 2, 1, 1, 0, 0]
    assert plan(4, 6, "front2end", "cyclic") == [0, 1, 2, 3, 0, 1]
    assert plan(4, 3, "front2end", "grouped") == [0, 1, 2]


def test_random_is_seeded_uniform_with_replacement():
    assert plan(8, 40, "random", seed=1) == plan(8, 40, "random", seed=1)
    orders = {tuple(slot_order(8, "random", seed=s)) for s in range(50)}
    assert len(orders) > 40  # seeds matter
    # with replacement: some orders repeat a block (a permutation never would)
    assert any(len(set(o)) < 8 for o in orders)
    # uniform: every block drawn about equally often over many seeds
    c = Counter(b for s in range(2000) for b in slot_order(8, "random", seed=s))
    assert min(c.values()) > 0.8 * 2000 and max(c.values()) < 1.2 * 2000


def test_random_does_not_touch_global_rng():
    import random

    random.seed(123)
    a = random.random()
    random.seed(123)
    plan(6, 30, "random", seed=9)
    assert random.random() == a


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(num_blocks=0, total_steps=4), "num_blocks"),
        (dict(num_blocks=4, total_steps=0), "total_steps"),
        (dict(num_blocks=4, total_steps=4, schedule="back2front"), "schedule"),
        (dict(num_blocks=4, total_steps=4, policy="grouped2"), "policy"),
        (dict(num_blocks=4, total_steps=4, seed="1"), "seed"),
        (dict(num_blocks=4, total_steps=4, seed=1.5), "seed"),
        (dict(num_blocks=2.0, total_steps=4), "num_blocks"),
        (dict(num_blocks=True, total_steps=4), "num_blocks"),
    ],
)
def test_bad_arguments_name_argument_and_value(kwargs, needle):
    with pytest.raises(ValueError) as e:
        plan(**kwargs)
    msg = str(e.value)
    assert needle in msg
    bad = kwargs.get(needle)
    assert repr(bad) in msg or str(bad) in msg


def test_phases_merge_repeated_random_slots():
    steps = [1, 1, 1, 1, 2, 2, 1]
    ph = phases(steps)
    assert [(p.block, p.start, p.stop) for p in ph] == [(1, 0, 4), (2, 4, 6), (1, 6, 7)]


def test_cursor_walks_and_reports_boundaries():
    c = PhaseCursor(plan(3, 6))
    seen, boundaries = [], []
    while not c.done:
        seen.append(c.block)
        boundaries.append(c.advance())
    assert seen == [0, 0, 1, 1, 2, 2]
    assert boundaries == [False, True, False, True, False, False]
    with pytest.raises(RuntimeError, match="finished"):
        c.block  # noqa: B018 (the attribute access raises)


def test_cursor_resume_continues_same_sequence():
    steps = plan(5, 23, "random", "cyclic", seed=4)
    a = PhaseCursor(steps)
    for _ in range(9):
        a.advance()
    state = a.state_dict()
    b = PhaseCursor(plan(5, 23, "random", "cyclic", seed=4))
    b.load_state_dict(state)
    rest_a, rest_b = [], []
    while not a.done:
        rest_a.append(a.block)
        a.advance()
    while not b.done:
        rest_b.append(b.block)
        b.advance()
    assert rest_a == rest_b == steps[9:]


def test_cursor_refuses_other_plan():
    a = PhaseCursor(plan(5, 20, "random", seed=1))
    with pytest.raises(ValueError, match="does not match"):
        PhaseCursor(plan(5, 20, "random", seed=2)).load_state_dict(a.state_dict())
