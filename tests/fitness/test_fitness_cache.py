"""The persistent fitness cache: keyed by recipe hash and fingerprint, failures kept."""

from __future__ import annotations

import pytest

from evo_compress.exceptions import RunStoreError
from evo_compress.fitness import EvaluationContext, FitnessCache, make_evaluator
from evo_compress.genomes import SearchSpace


def test_round_trip_and_fingerprint_separation(tmp_path):
    space = SearchSpace.builtin()
    recipe = space.recipe({"quant": {"method": "awq"}})
    evaluator = make_evaluator("synthetic", {}, EvaluationContext())
    result = evaluator.evaluate(recipe, space)
    cache = FitnessCache(tmp_path / "c.sqlite")
    fingerprint = evaluator.fingerprint()
    assert cache.get(recipe, fingerprint) is None
    cache.put(recipe, fingerprint, result)
    cache.close()

    reopened = FitnessCache(tmp_path / "c.sqlite")
    hit = reopened.get(recipe, fingerprint)
    assert hit == result
    other = make_evaluator("synthetic", {"seed": 1}, EvaluationContext()).fingerprint()
    assert other != fingerprint and reopened.get(recipe, other) is None


def test_failures_are_cached_and_can_be_forgotten(tmp_path):
    space = SearchSpace.builtin()
    recipe = space.recipe({"quant": {"method": "rtn"}})
    evaluator = make_evaluator(
        "synthetic", {"fail_if": {"quant.method": ["rtn"]}}, EvaluationContext()
    )
    result = evaluator.evaluate(recipe, space)
    assert result.status == "failed"
    cache = FitnessCache(tmp_path / "c.sqlite")
    cache.put(recipe, evaluator.fingerprint(), result)
    cached = cache.get(recipe, evaluator.fingerprint())
    assert cached is not None and cached.status == "failed" and cached.reason == result.reason
    assert cache.forget_failures(evaluator.fingerprint()) == 1
    assert cache.get(recipe, evaluator.fingerprint()) is None


def test_an_unusable_cache_file_gives_a_clear_error(tmp_path):
    bad = tmp_path / "c.sqlite"
    bad.write_bytes(b"garbage" * 1000)
    with pytest.raises(RunStoreError, match="--no-cache"):
        FitnessCache(bad)


def test_the_cache_key_ignores_spelling_and_the_simulated_pause():
    context = EvaluationContext()
    plain = make_evaluator("synthetic", {}, context).fingerprint()
    assert make_evaluator("synthetic", {"n_params_b": 7}, context).fingerprint() == plain
    assert make_evaluator("synthetic", {"n_params_b": 7.0}, context).fingerprint() == plain
    assert make_evaluator("synthetic", {"cost_s": 0.5}, context).fingerprint() == plain
    assert make_evaluator("synthetic", {"n_params_b": 8}, context).fingerprint() != plain
