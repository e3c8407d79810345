"""The accuracy's noise: the binomial standard error, reading it from a record, and whether two
recipes' accuracies are within noise of each other (what racing will use)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evo_compress.fitness import EvaluationContext, make_evaluator
from evo_compress.fitness.noise import (
    AccuracyEstimate,
    accuracy_stderr,
    binomial_stderr,
    pairs_within_noise,
    within_noise,
)
from evo_compress.genomes import SearchSpace


def test_the_binomial_stderr_of_250_items_is_about_one_and_a_half_points():
    # The figure issue 13 quotes: 250 test items at ~93% accuracy.
    assert binomial_stderr(0.936, 250) == pytest.approx(0.0155, abs=5e-4)
    # The sample stderr of 0/1 scores, as lm-eval's `mean_stderr` computes it.
    scores = [1.0] * 9 + [0.0] * 3
    mean = sum(scores) / len(scores)
    sample_sd = math.sqrt(sum((x - mean) ** 2 for x in scores) / (len(scores) - 1))
    assert binomial_stderr(mean, len(scores)) == pytest.approx(sample_sd / math.sqrt(12))
    assert binomial_stderr(1.0, 40) == 0.0
    assert binomial_stderr(0.5, 1) is None and binomial_stderr(1.5, 10) is None


def test_lm_evals_own_stderr_is_kept_and_the_binomial_fills_in_when_it_gives_none():
    assert accuracy_stderr(0.9, 100, 0.031) == (0.031, "lm-eval")
    value, source = accuracy_stderr(0.9, 100, None)
    assert value == pytest.approx(math.sqrt(0.09 / 99)) and source and "binomial" in source
    assert accuracy_stderr(0.9, 100, math.nan)[1] != "lm-eval"
    assert accuracy_stderr(1.0, 1, None) == (None, None)


def test_an_estimate_reads_the_documented_metadata_keys_and_ignores_junk():
    objectives = {"accuracy": 0.9}
    read = AccuracyEstimate.of(objectives, {"accuracy_stderr": 0.02, "accuracy_n": 250})
    assert read == AccuracyEstimate(0.9, 0.02, 250)
    assert read.text() == "0.900 ± 0.020"
    assert AccuracyEstimate.of(objectives, {}).text() == "0.900"
    for junk in ({"accuracy_stderr": None}, {"accuracy_stderr": True}, {"accuracy_stderr": -1}):
        assert AccuracyEstimate.of(objectives, junk).stderr is None
    for junk_n in ("250", 0, 2.5, float("inf")):
        assert AccuracyEstimate.of(objectives, {"accuracy_n": junk_n}).n is None


def test_within_noise_compares_the_gap_with_z_combined_stderrs():
    a = AccuracyEstimate(0.90, 0.015, 250)
    b = AccuracyEstimate(0.93, 0.015, 250)  # 3 points apart, combined stderr ~2.1 points
    assert within_noise(a, b) and within_noise(b, a)
    assert not within_noise(a, b, z=1.0)
    assert not within_noise(a, AccuracyEstimate(0.96, 0.015, 250))
    # Unknown noise never counts as close: the search goes on acting on the difference.
    assert not within_noise(a, AccuracyEstimate(0.90))
    with pytest.raises(ValueError, match="`z`"):
        within_noise(a, b, z=-1)


unit = st.floats(0.0, 1.0, allow_nan=False)
stderr = st.floats(0.0, 0.2, allow_nan=False)


@given(unit, stderr, unit, stderr, st.floats(0.0, 5.0), st.floats(0.0, 5.0))
def test_within_noise_is_symmetric_and_grows_with_z(va, sa, vb, sb, z1, z2):
    a, b = AccuracyEstimate(va, sa), AccuracyEstimate(vb, sb)
    assert within_noise(a, b, z1) == within_noise(b, a, z1)
    low, high = sorted((z1, z2))
    assert not within_noise(a, b, low) or within_noise(a, b, high)


def test_pairs_within_noise_lists_each_close_pair_once():
    estimates = [
        (1, AccuracyEstimate(0.90, 0.01)),
        (2, AccuracyEstimate(0.91, 0.01)),
        (3, AccuracyEstimate(0.70, 0.01)),
        (4, AccuracyEstimate(0.905)),
    ]
    assert pairs_within_noise(estimates) == [(1, 2)]


def test_the_synthetic_evaluator_reports_its_noise_setting_as_the_stderr():
    space = SearchSpace.builtin()
    recipe = space.recipe({"quant": {"method": "awq"}})
    for noise in (0.003, 0.02, 0.0):
        result = make_evaluator("synthetic", {"noise": noise}, EvaluationContext()).evaluate(
            recipe, space
        )
        assert result.ok and result.objectives is not None
        estimate = AccuracyEstimate.of(result.objectives, result.metadata)
        # No test items behind a synthetic accuracy: a stderr but no item count.
        assert estimate.stderr == noise and estimate.n is None
