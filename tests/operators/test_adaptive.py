"""Adaptive operator selection: fixed weights, probability matching, checkpoints, bad args."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from evo_compress.exceptions import OperatorError
from evo_compress.operators import AdaptiveSelector
from evo_compress.testing import rng

LABELS = ["gene", "expert", "llm"]
WEIGHTS = [2.0, 1.0, 1.0]


def test_fixed_keeps_the_weights_and_draws_like_rng_choice() -> None:
    selector = AdaptiveSelector(LABELS, WEIGHTS)
    w = np.array(WEIGHTS) / sum(WEIGHTS)
    np.testing.assert_array_equal(selector.probabilities(), w)
    ours, theirs = rng(7), rng(7)
    for _ in range(200):
        assert selector.pick(ours) == int(theirs.choice(3, p=w))
        selector.credit(0, 5.0)
    selector.update()  # credit changes nothing for fixed
    np.testing.assert_array_equal(selector.probabilities(), w)
    assert ours.random() == theirs.random()  # the streams stayed in step


def test_a_single_operator_consumes_no_randomness() -> None:
    for method in ("fixed", "probability-matching"):
        selector = AdaptiveSelector(["gene"], [3.0], method)  # type: ignore[arg-type]
        np.testing.assert_array_equal(selector.probabilities(), [1.0])
        generator = rng(3)
        assert all(selector.pick(generator) == 0 for _ in range(10))
        assert generator.random() == rng(3).random()


def test_probability_matching_starts_near_the_weights() -> None:
    selector = AdaptiveSelector(LABELS, WEIGHTS, "probability-matching", min_prob=0.05)
    p = selector.probabilities()
    # p_min + (1 - K p_min) * w / sum(w)
    np.testing.assert_allclose(p, 0.05 + 0.85 * np.array([0.5, 0.25, 0.25]))
    assert p[0] > p[1] == p[2]


def test_credit_moves_probability_to_the_operator_that_earns_it() -> None:
    selector = AdaptiveSelector(
        LABELS, [1.0, 1.0, 1.0], "probability-matching", min_prob=0.05, learning_rate=0.3
    )
    history = [selector.probabilities()]
    for _ in range(40):
        selector.credit(1, 1.0)
        selector.credit(1, 0.5)
        selector.credit(0, 0.0)
        selector.credit(2, 0.0)
        selector.update()
        history.append(selector.probabilities())
    p = np.array(history)
    assert (np.diff(p[:, 1]) > 0).all()  # the earner gains every generation
    assert (np.diff(p[:, 0]) < 0).all()  # the others sink ...
    assert (p[:, [0, 2]] >= 0.05).all()  # ... but never below min_prob
    np.testing.assert_allclose(p[-1], [0.05, 0.9, 0.05], atol=1e-3)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)


def test_update_uses_the_mean_reward_and_leaves_unused_operators() -> None:
    selector = AdaptiveSelector(
        ["a", "b", "c"], [1.0, 1.0, 2.0], "probability-matching", learning_rate=0.5
    )
    selector.credit(0, 1.0)
    selector.credit(0, 3.0)  # mean 2.0
    selector.credit(1, 0.0)
    selector.update()
    np.testing.assert_allclose(selector.quality, [0.5 * 0.25 + 0.5 * 2.0, 0.125, 0.5])
    selector.update()  # nobody used: nothing moves
    np.testing.assert_allclose(selector.quality, [1.125, 0.125, 0.5])


def test_all_quality_lost_falls_back_to_uniform() -> None:
    selector = AdaptiveSelector(["a", "b"], [1.0, 1.0], "probability-matching", learning_rate=1.0)
    selector.credit(0, 0.0)
    selector.credit(1, 0.0)
    selector.update()
    np.testing.assert_array_equal(selector.quality, [0.0, 0.0])
    np.testing.assert_allclose(selector.probabilities(), [0.5, 0.5])


@given(
    k=st.integers(min_value=1, max_value=6),
    min_frac=st.floats(min_value=0.0, max_value=1.0),
    lr=st.floats(min_value=0.01, max_value=1.0),
    rewards=st.lists(
        st.tuples(st.integers(min_value=0, max_value=5), st.floats(min_value=0, max_value=1e6)),
        max_size=40,
    ),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_probabilities_are_a_distribution_above_min_prob(
    k: int, min_frac: float, lr: float, rewards: list[tuple[int, float]], seed: int
) -> None:
    min_prob = min_frac / k
    selector = AdaptiveSelector(
        [f"op{i}" for i in range(k)],
        [1.0 + i for i in range(k)],
        "probability-matching",
        min_prob=min_prob,
        learning_rate=lr,
    )
    generator = rng(seed)
    for index, (op, reward) in enumerate(rewards):
        selector.credit(op % k, reward)
        if index % 5 == 4:
            selector.update()
        p = selector.probabilities()
        assert p.shape == (k,)
        assert abs(p.sum() - 1.0) < 1e-9
        assert (p >= min_prob - 1e-12).all()
        assert 0 <= selector.pick(generator) < k


def test_state_dict_round_trips_through_json_and_reproduces_the_picks() -> None:
    selector = AdaptiveSelector(LABELS, WEIGHTS, "probability-matching")
    for generation in range(5):
        for i in range(3):
            selector.credit(i, float((generation + i) % 3))
        selector.update()
    selector.credit(2, 4.0)  # mid-generation credit is kept too
    state = json.loads(json.dumps(selector.state_dict()))
    restored = AdaptiveSelector(LABELS, WEIGHTS, "probability-matching")
    restored.load_state_dict(state)
    assert restored.state_dict() == selector.state_dict()
    for s in (selector, restored):
        s.credit(0, 1.0)
        s.update()
    a, b = rng(9), rng(9)
    assert [selector.pick(a) for _ in range(100)] == [restored.pick(b) for _ in range(100)]


def test_loading_state_for_other_operators_raises() -> None:
    state = AdaptiveSelector(LABELS, WEIGHTS).state_dict()
    other = AdaptiveSelector(["gene", "llm", "expert"], WEIGHTS)
    with pytest.raises(OperatorError, match=r"\['gene', 'expert', 'llm'\].*\['gene', 'llm'"):
        other.load_state_dict(state)
    broken = {**state, "q": [1.0]}
    with pytest.raises(OperatorError, match="3 values"):
        AdaptiveSelector(LABELS, WEIGHTS).load_state_dict(broken)
    with pytest.raises(OperatorError, match="malformed"):
        AdaptiveSelector(LABELS, WEIGHTS).load_state_dict({"labels": LABELS})


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"labels": [], "weights": []}, "`labels`"),
        ({"labels": ["a", "a"], "weights": [1, 1]}, "`labels`"),
        ({"labels": ["a", "b"], "weights": [1]}, "`weights`"),
        ({"labels": ["a", "b"], "weights": [1, 0]}, "`weights[1]`"),
        ({"labels": ["a", "b"], "weights": [1, -2]}, "`weights[1]`"),
        ({"labels": ["a", "b"], "weights": [float("nan"), 1]}, "`weights[0]`"),
        ({"labels": ["a", "b"], "weights": [1, 1], "method": "ucb"}, "`method`"),
        ({"labels": ["a", "b"], "weights": [1, 1], "min_prob": 0.6}, "`min_prob`"),
        ({"labels": ["a", "b"], "weights": [1, 1], "min_prob": -0.1}, "`min_prob`"),
        ({"labels": ["a", "b"], "weights": [1, 1], "learning_rate": 0}, "`learning_rate`"),
        ({"labels": ["a", "b"], "weights": [1, 1], "learning_rate": 1.5}, "`learning_rate`"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(OperatorError) as info:
        AdaptiveSelector(**kwargs)
    assert fragment in str(info.value)


def test_bad_credit_raises() -> None:
    selector = AdaptiveSelector(LABELS, WEIGHTS, "probability-matching")
    with pytest.raises(OperatorError, match="index"):
        selector.credit(3, 1.0)
    with pytest.raises(OperatorError, match="`llm`"):
        selector.credit(2, -1.0)
    with pytest.raises(OperatorError, match="`gene`"):
        selector.credit(0, float("inf"))
