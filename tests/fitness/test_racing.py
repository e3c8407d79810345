"""The racing rule: when a quick measurement stops, and how two sets of items combine."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from evo_compress.fitness.racing import RaceMember, RaceRule, combine_means, stage_of
from evo_compress.objectives import to_minimization

QUICK = {"accuracy": 0.60, "latency": 5.0, "memory": 2.0, "energy": 30.0, "co2": 0.003}


def member(stderr: float = 0.0, **values: float) -> RaceMember:
    return RaceMember(tuple(to_minimization({**QUICK, **values})), stderr)


def test_a_quick_result_far_below_a_better_member_stops():
    rule = RaceRule(50, 2.0, (member(accuracy=0.95, latency=4.0),))
    assert rule.stop(QUICK, {"accuracy_stderr": 0.05, "accuracy_n": 50})


def test_within_noise_of_the_member_it_continues():
    # 0.60 + 2 * hypot(0.05, 0.03) = 0.717 > 0.70: the two accuracies are within noise.
    rule = RaceRule(50, 2.0, (member(0.03, accuracy=0.70, latency=4.0),))
    assert not rule.stop(QUICK, {"accuracy_stderr": 0.05, "accuracy_n": 50})
    assert RaceRule(50, 1.0, rule.front).stop(QUICK, {"accuracy_stderr": 0.05})


def test_better_in_another_objective_it_continues():
    rule = RaceRule(50, 2.0, (member(accuracy=0.95, latency=6.0),))
    assert not rule.stop(QUICK, {"accuracy_stderr": 0.05})


def test_no_front_never_stops():
    assert not RaceRule(50, 0.0).stop(QUICK, {"accuracy_stderr": 0.0})


def test_all_items_right_or_wrong_is_not_certainty():
    # 0/50 has a binomial stderr of 0; the Laplace-smoothed one keeps the bound at 0.039.
    rule = RaceRule(50, 2.0)
    bound = rule.optimistic(0.0, 0.0, 50)
    assert bound == pytest.approx(2.0 * math.sqrt((1 / 52) * (51 / 52) / 50))
    close = RaceRule(50, 2.0, (member(accuracy=0.03),))
    assert not close.stop({**QUICK, "accuracy": 0.0}, {"accuracy_stderr": 0.0, "accuracy_n": 50})


def test_the_rule_round_trips_as_plain_data():
    rule = RaceRule(40, 1.5, (member(0.02, accuracy=0.9), member(accuracy=0.8)))
    assert RaceRule.from_data(rule.to_data()) == rule


def test_stage_of_a_record_without_racing_is_full():
    assert stage_of({}) == "full"
    assert stage_of({"stage": "quick"}) == "quick"


def _mean_stderr(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))  # lm-eval's mean_stderr


@given(
    st.lists(st.integers(0, 1), min_size=2, max_size=60),
    st.lists(st.integers(0, 1), min_size=2, max_size=200),
)
def test_two_parts_combine_into_the_score_of_all_items(first, rest):
    a, b = np.array(first, float), np.array(rest, float)
    both = np.concatenate([a, b])
    mean, n, stderr = combine_means(
        [(a.mean(), len(a), _mean_stderr(a)), (b.mean(), len(b), _mean_stderr(b))]
    )
    assert n == len(both)
    assert mean == pytest.approx(both.mean(), abs=1e-12)
    assert stderr == pytest.approx(_mean_stderr(both), abs=1e-9)
