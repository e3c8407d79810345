"""The toy plugin passes evo-compress's contract suites (its evaluator, its mutation and its
compression method on each back end it claims), as every plugin's tests would run
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
from evo_compress.testing.methods import check_method, method_cases


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


@pytest.mark.parametrize(("method", "backend"), method_cases(["toy_int4"]))
def test_toy_int4_passes_the_method_contract(method: str, backend: str, tmp_path) -> None:
    skipped = check_method(method, backend, tmp_path)
    if skipped is not None:
        pytest.skip(skipped)
