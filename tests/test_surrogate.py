"""Surrogate pre-screening: the model, the choice it makes, and how the engine uses it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from evo_compress.app import build_space, start_search
from evo_compress.genomes import Recipe
from evo_compress.surrogate import (
    GaussianProcess,
    History,
    RecipeEncoder,
    Screening,
    _rank_and_crowding,
)
from evo_compress.testing import final_state, resume_search, search_front
from tests.conftest import make_config


def test_the_model_predicts_a_smooth_function_it_has_not_seen() -> None:
    rng = np.random.default_rng(0)
    X = rng.random((60, 3))
    truth = lambda A: np.sin(3 * A[:, 0]) + A[:, 1] ** 2 - A[:, 2]  # noqa: E731
    Y = np.column_stack([truth(X), 10 * truth(X) + 5])  # two outputs, different scales
    Xt = rng.random((40, 3))
    mean, _ = GaussianProcess().fit(X, Y).predict(Xt)
    error = np.abs(mean[:, 0] - truth(Xt))
    assert error.mean() < 0.05 * truth(Xt).std() * 3
    assert np.allclose(mean[:, 1], 10 * mean[:, 0] + 5, atol=0.05)
    # Far from the data the model is unsure; at a training point it is not.
    _, far = GaussianProcess().fit(X, Y).predict(np.full((1, 3), 5.0))
    _, near = GaussianProcess().fit(X, Y).predict(X[:1])
    assert far[0, 0] > 10 * near[0, 0]


def test_recipes_are_encoded_one_hot_by_position_and_at_defaults(tmp_path: Path) -> None:
    space = build_space(make_config(tmp_path))
    encode = RecipeEncoder(space)
    baseline = space.baseline()
    rng = np.random.default_rng(1)
    recipes = [baseline, *(space.sample(rng) for _ in range(20))]
    X = encode(recipes)
    assert X.shape == (21, encode.width)
    assert X.min() >= 0 and X.max() <= 1
    assert len({tuple(row) for row in X}) == len({r.hash for r in recipes})
    assert np.array_equal(encode([baseline])[0], X[0])  # the cache returns the same row


def _history(space, recipes, score) -> History:  # type: ignore[no-untyped-def]
    F = np.array([[score(r), 1.0, 1.0, 1.0, 1.0] for r in recipes])
    return History(recipes, F, np.zeros((len(recipes), 0)), np.zeros(len(recipes), bool))


def test_screening_keeps_the_candidates_the_history_says_are_best(tmp_path: Path) -> None:
    """Objective 0 (minimised) is the pruning sparsity: the choice must favour low sparsity."""
    space = build_space(make_config(tmp_path))
    rng = np.random.default_rng(2)
    pruned = [space.sample(rng) for _ in range(300)]
    pruned = [r for r in pruned if "prune.sparsity" in r]

    def score(recipe: Recipe) -> float:
        return float(recipe["prune.sparsity"])

    history = _history(space, pruned[:60], score)
    candidates = pruned[60:]
    chosen = Screening(space, exploration=0.0).choose(candidates, history, 10)
    assert chosen == sorted(chosen) and len(set(chosen)) == 10
    picked = np.array([score(candidates[i]) for i in chosen])
    everyone = np.array([score(r) for r in candidates])
    assert picked.mean() < np.quantile(everyone, 0.25)


def test_screening_avoids_recipes_like_those_that_failed(tmp_path: Path) -> None:
    space = build_space(make_config(tmp_path))
    rng = np.random.default_rng(3)
    recipes = list({r.hash: r for r in (space.sample(rng) for _ in range(200))}.values())

    def fails(recipe: Recipe) -> bool:
        return recipe["quant.method"] == "none"

    history = History(
        recipes[:80],
        np.ones((80, 5)),
        np.zeros((80, 0)),
        np.array([fails(r) for r in recipes[:80]]),
    )
    candidates = recipes[80:]
    assert any(fails(r) for r in candidates)
    chosen = Screening(space).choose(candidates, history, 10)
    assert not any(fails(candidates[i]) for i in chosen)


@pytest.mark.parametrize("algorithm", ["nsga2", "nsga3"])
def test_a_screened_search_is_deterministic_and_resumes_to_the_same_front(
    tmp_path: Path, algorithm: str
) -> None:
    def config(generations: int):  # type: ignore[no-untyped-def]
        return make_config(
            tmp_path,
            search={
                "algorithm": algorithm,
                "population_size": 8,
                "generations": generations,
                "seed": 5,
                "recipes": "conservative",
                "surrogate": {"min_evaluations": 8},
            },
        )

    whole = search_front(config(5), tmp_path / "whole")
    assert search_front(config(5), tmp_path / "again") == whole
    part = start_search(config(3), run_dir=tmp_path / "part")
    part.run()
    part.close()
    resume_search(tmp_path / "part", generations=5)
    assert final_state(tmp_path / "part", evaluations=True) == final_state(
        tmp_path / "whole", evaluations=True
    )


def test_screening_changes_what_is_evaluated(tmp_path: Path) -> None:
    """The pre-screen is not a no-op: with it off, the same seed evaluates other recipes."""

    def evaluated(enabled: bool, name: str) -> set[str]:
        cfg = make_config(
            tmp_path,
            search={
                "population_size": 8,
                "generations": 4,
                "seed": 5,
                "recipes": "conservative",
                "surrogate": {"enabled": enabled, "min_evaluations": 8},
            },
        )
        search = start_search(cfg, run_dir=tmp_path / name)
        search.run()
        hashes = {row.hash for row in search.store.individuals()}
        search.close()
        return hashes

    assert evaluated(True, "on") != evaluated(False, "off")


def test_the_order_within_a_front_is_not_pymoo_s() -> None:
    # Where pymoo's calc_crowding_distance orders differently (so it does not replace ours):
    # an exact tie stays a tie, in row order (pymoo: rows 2, 1) ...
    tie = np.array([[0.6, 1.9], [0.7, 1.4], [1.0, 0.7], [1.1, 0.2]])
    assert _rank_and_crowding(tie, np.zeros(4)) == [0, 3, 1, 2]
    # ... and an objective equal across the front gives its first and last row an infinite
    # distance (pymoo: none, so rows 1, 2, 0, 3).
    flat = np.array([[0.2, 0.8, 5.0], [0.0, 1.0, 5.0], [1.0, 0.0, 5.0], [0.8, 0.2, 5.0]])
    assert _rank_and_crowding(flat, np.zeros(4)) == [0, 1, 2, 3]
