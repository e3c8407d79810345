"""The toy plugin passes evo-compress's contract suites, as every plugin's tests would run
them (``pytest contract_check.py`` with the plugin installed)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from evo_compress.fitness import EVALUATORS, EvaluationContext, Evaluator
from evo_compress.genomes import SearchSpace
from evo_compress.objectives import OBJECTIVE_NAMES
from evo_compress.operators import MUTATIONS
from evo_compress.operators._base import Operator
from evo_compress.testing.contracts import EvaluatorContract, OperatorContract


class TestToyEvaluator(EvaluatorContract):
    @pytest.fixture(scope="class")
    @classmethod
    def evaluator(cls) -> Evaluator:
        # Found through the registry: the installed entry point, not an import of ours.
        return EVALUATORS.get("toy")({}, EvaluationContext())

    @pytest.fixture(scope="class")
    @classmethod
    def deterministic_objectives(cls) -> tuple[str, ...]:
        return tuple(OBJECTIVE_NAMES)


class TestFlipMutation(OperatorContract):
    @pytest.fixture
    def make_operator(self) -> Callable[[SearchSpace], Operator]:
        return lambda space: MUTATIONS.get("toy-flip")(space)
