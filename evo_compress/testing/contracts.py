"""Contract suites every evaluator and operator passes (Optuna's ``testing/pytest_samplers.py``).

A test module subclasses a suite and provides its fixtures; pytest collects the inherited
tests. A plugin runs the same suites as the built-ins::

    from evo_compress.testing.contracts import EvaluatorContract

    class TestMyEvaluator(EvaluatorContract):
        @pytest.fixture(scope="class")
        @classmethod
        def evaluator(cls):
            return MyEvaluator({}, EvaluationContext())

``EvaluatorContract`` needs a class-scoped ``evaluator`` fixture (evaluations are shared by
the suite's tests); it may override ``space`` (default: the built-in space),
``deterministic_objectives`` (the objectives the back end promises to repeat exactly for the
same recipe; default none) and ``sample_count`` (recipes evaluated besides the baseline).
``OperatorContract`` needs ``make_operator``: a function from a search space to a fresh
operator on it; it may override ``space``. Needs pytest.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from evo_compress.fitness import EvaluationResult, Evaluator
from evo_compress.genomes import Recipe, SearchSpace
from evo_compress.objectives import OBJECTIVE_NAMES
from evo_compress.operators import Measured, Operator, Proposal, VariationContext
from evo_compress.testing._helpers import rng, samples

__all__ = ["EvaluatorContract", "OperatorContract"]

Evaluated = list[tuple[Recipe, str, EvaluationResult]]


def _content_hash(recipe: Recipe) -> str:
    """The hash of what ``recipe`` holds now (its stored hash was taken when it was built)."""
    text = json.dumps(dict(recipe), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _check_result(result: EvaluationResult, recipe: Recipe) -> None:
    where = f"recipe {recipe.short_hash} ({recipe.summary()})"
    if result.ok:
        objectives = result.objectives or {}
        assert set(objectives) == set(OBJECTIVE_NAMES), f"{where}: objectives {objectives}"
        assert all(math.isfinite(v) for v in objectives.values()), f"{where}: {objectives}"
    else:
        assert result.status in ("failed", "infeasible"), f"{where}: status {result.status}"
        assert result.objectives is None, f"{where}: a failure with objectives"
        assert isinstance(result.reason, str) and result.reason.strip(), f"{where}: no reason"
    json.dumps(result.metadata)  # stored as plain JSON in the run store


class EvaluatorContract:
    """Five finite objectives or a recorded failure with a reason; the recipe never modified;
    capabilities honoured; the promised objectives deterministic.

    Subclass it in a test module and give it a class-scoped ``evaluator`` fixture (a fresh
    ``Evaluator``); override the other fixtures where the defaults do not fit. Each test
    fails with ``AssertionError`` naming the recipe and what broke.
    """

    @pytest.fixture(scope="class")
    @classmethod
    def space(cls) -> SearchSpace:
        """Fixture: the search space the recipes are drawn from.

        Returns:
            The built-in search space.
        """
        return SearchSpace.builtin()

    @pytest.fixture(scope="class")
    @classmethod
    def deterministic_objectives(cls) -> tuple[str, ...]:
        """Fixture: the objectives the back end promises to repeat exactly for a recipe.

        Returns:
            Their names; none by default (``test_promised_objectives_repeat_exactly`` is
            then skipped).
        """
        return ()

    @pytest.fixture(scope="class")
    @classmethod
    def sample_count(cls) -> int:
        """Fixture: how many recipes are evaluated besides the baseline.

        Returns:
            2 by default.
        """
        return 2

    @pytest.fixture(scope="class")
    @classmethod
    def recipes(cls, evaluator: Evaluator, space: SearchSpace, sample_count: int) -> list[Recipe]:
        """Fixture: the recipes evaluated.

        Args:
            evaluator: The evaluator under test.
            space: The search space.
            sample_count: How many draws besides the baseline.

        Returns:
            The baseline and ``sample_count`` draws (seeded) of the part of ``space`` the
            back end can apply, as recipes of ``space``.
        """
        restricted = evaluator.restrict_space(space)
        drawn = [restricted.baseline(), *samples(restricted, sample_count, seed=0)]
        return [space.recipe(dict(recipe)) for recipe in drawn]

    @pytest.fixture(scope="class")
    @classmethod
    def evaluated(
        cls, evaluator: Evaluator, space: SearchSpace, recipes: list[Recipe]
    ) -> Evaluated:
        """Fixture: every recipe evaluated once, after ``evaluator.prepare()``.

        Args:
            evaluator: The evaluator under test.
            space: The search space.
            recipes: The recipes to evaluate.

        Returns:
            ``(recipe, its canonical JSON before evaluating, result)`` per recipe, the
            baseline first.
        """
        evaluator.prepare()
        out = []
        for recipe in recipes:
            before = recipe.canonical_json()
            out.append((recipe, before, evaluator.evaluate(recipe, space)))
        return out

    def test_results_are_five_finite_objectives_or_a_failure_with_a_reason(
        self, evaluated: Evaluated
    ) -> None:
        """Each result is ok with the five objectives, finite, or a failure with a reason;
        its metadata is plain JSON."""
        for recipe, _, result in evaluated:
            _check_result(result, recipe)

    def test_the_baseline_is_measured(self, evaluated: Evaluated) -> None:
        """The baseline (every gene at its default) evaluates ok."""
        recipe, _, result = evaluated[0]
        assert result.ok, f"the baseline {recipe.summary()} failed: {result.reason}"

    def test_the_recipe_is_never_modified(self, evaluated: Evaluated) -> None:
        """Evaluating leaves the recipe, and its hash, as they were."""
        for recipe, before, _ in evaluated:
            assert recipe.canonical_json() == before
            assert _content_hash(recipe) == recipe.hash

    def test_only_recipes_it_names_a_reason_for_are_infeasible(
        self, evaluator: Evaluator, space: SearchSpace, evaluated: Evaluated
    ) -> None:
        """An infeasible result carries the reason ``infeasible_reason`` gives."""
        for recipe, _, result in evaluated:
            if result.status == "infeasible":
                assert result.reason == evaluator.infeasible_reason(recipe, space)

    def test_capabilities_are_honoured(self, evaluator: Evaluator, space: SearchSpace) -> None:
        """The restricted space holds only what ``capabilities`` says the back end applies,
        and a recipe outside it is infeasible with a reason before anything runs."""
        caps = evaluator.capabilities()

        def applies(recipe: Recipe) -> bool:
            for gene, value in recipe.items():
                if gene in caps:
                    if caps[gene] is not None and value not in caps[gene]:  # type: ignore[operator]
                        return False
                elif gene in space.genes and value != space.genes[gene].default:
                    return False
            return True

        # The restricted space holds only what the back end can apply, gene by gene.
        restricted = evaluator.restrict_space(space)
        assert all(applies(space.recipe(dict(r))) for r in samples(restricted, 32, seed=2))
        outside = [r for r in samples(space, 64, seed=1) if not applies(r)]
        if not outside:  # the back end applies every recipe of the space
            assert restricted is space
        for recipe in outside[:4]:
            # Infeasible with a reason, before anything runs, and the recipe untouched.
            reason = evaluator.infeasible_reason(recipe, space)
            assert reason, recipe.summary()
            before = recipe.canonical_json()
            result = evaluator.evaluate(recipe, space)
            assert result.status == "infeasible" and result.reason == reason
            assert recipe.canonical_json() == before

    def test_promised_objectives_repeat_exactly(
        self,
        evaluator: Evaluator,
        space: SearchSpace,
        evaluated: Evaluated,
        deterministic_objectives: tuple[str, ...],
    ) -> None:
        """Evaluating the baseline again gives the same ``deterministic_objectives``."""
        if not deterministic_objectives:
            pytest.skip("the back end promises no objective to repeat exactly")
        recipe, _, first = evaluated[0]
        again = evaluator.evaluate(recipe, space)
        assert first.ok and again.ok, again.reason
        for name in deterministic_objectives:
            assert (first.objectives or {})[name] == (again.objectives or {})[name], name


def _parents(space: SearchSpace, count: int, seed: int) -> list[Measured]:
    """Measured-looking parents (informed operators read their objectives)."""
    return [
        Measured(
            id=i + 1,
            recipe=recipe,
            status="ok",
            objectives={
                "accuracy": 0.8 - 0.05 * i,
                "latency": 10.0 + i,
                "memory": 4000.0 - 300.0 * i,
                "energy": 50.0 - i,
                "co2": 5.0 - 0.1 * i,
            },
            violations={"max_accuracy_drop": -0.02 + 0.01 * i},
        )
        for i, recipe in enumerate(samples(space, count, seed))
    ]


def _context(space: SearchSpace, parents: Sequence[Measured]) -> VariationContext:
    return VariationContext(
        space=space,
        generation=1,
        constraints={"max_accuracy_drop": 0.05},
        reference={"accuracy": 0.85, "latency": 12.0, "memory": 9000.0, "energy": 60, "co2": 6},
        front=tuple(parents),
        model="contract-model",
        hardware={"device": "cpu"},
    )


def _vary(operator: Operator, space: SearchSpace, seed: int) -> tuple[list[Measured], Recipe]:
    parents = _parents(space, int(getattr(operator, "n_parents", 1)), seed)
    proposal = operator.make_child(parents, rng(seed), _context(space, parents), defer=False)
    assert isinstance(proposal, Proposal), f"{operator.label}: defer=False must finish the child"
    return parents, proposal.recipe


class OperatorContract:
    """Parents never modified; children valid canonical recipes of the space; the same seeds
    give the same children; pinned genes stay pinned.

    Subclass it in a test module and give it a ``make_operator`` fixture: a function from a
    search space to a fresh operator on it; override ``space`` where the default does not
    fit. Each test fails with ``AssertionError``.

    Attributes:
        seeds: The seeds each test varies with.
    """

    seeds = range(6)

    @pytest.fixture
    def space(self) -> SearchSpace:
        """Fixture: the search space the parents are drawn from.

        Returns:
            The built-in search space.
        """
        return SearchSpace.builtin()

    def test_parents_are_never_modified(
        self, make_operator: Callable[[SearchSpace], Operator], space: SearchSpace
    ) -> None:
        """``vary`` leaves the parents, and their hashes, as they were."""
        operator = make_operator(space)
        for seed in self.seeds:
            parents = _parents(space, int(getattr(operator, "n_parents", 1)), seed)
            kept = copy.deepcopy(parents)
            operator.vary(parents, rng(seed), _context(space, parents))
            assert parents == kept
            assert all(_content_hash(p.recipe) == p.recipe.hash for p in parents)

    def test_children_are_valid_canonical_recipes_of_the_space(
        self, make_operator: Callable[[SearchSpace], Operator], space: SearchSpace
    ) -> None:
        """Each child is a valid recipe of the space, already canonical, its hash that of
        its content."""
        operator = make_operator(space)
        for seed in self.seeds:
            _, child = _vary(operator, space, seed)
            assert isinstance(child, Recipe)
            assert space.recipe(child.to_dict()) == child  # valid, and already canonical
            assert space.recipe(child.to_dict()).hash == child.hash
            assert _content_hash(child) == child.hash

    def test_the_same_seeds_give_the_same_children(
        self, make_operator: Callable[[SearchSpace], Operator], space: SearchSpace
    ) -> None:
        """Two fresh operators given the same seeds and parents make the same children."""
        first, second = make_operator(space), make_operator(space)
        children = [
            [_vary(op, space, seed)[1].hash for seed in self.seeds] for op in (first, second)
        ]
        assert children[0] == children[1]

    def test_pinned_genes_stay_pinned(
        self, make_operator: Callable[[SearchSpace], Operator], space: SearchSpace
    ) -> None:
        """On a space with genes pinned, every child keeps the pinned values."""
        drawn = space.sample(np.random.default_rng(3))
        free = [n for n, g in space.genes.items() if not g.active_if.clauses and n in drawn]
        pins: dict[str, Any] = {name: drawn[name] for name in free[::2]}
        pinned = space.with_overrides(pin=pins)
        operator = make_operator(pinned)
        for seed in self.seeds:
            _, child = _vary(operator, pinned, seed)
            assert {name: child.get(name) for name in pins} == pins
