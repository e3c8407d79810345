"""Every built-in evaluator and operator passes the contract suites of
``evo_compress.testing.contracts``. The registries are iterated: a name registered without a
setup here fails. Plugins run the same suites in their own tests (tests/test_plugins.py)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from evo_compress_doubles.providers import FakeProviderServer, model_like, operator_params

from evo_compress.agents.session import AgentSession
from evo_compress.config import CarbonConfig, HardwareConfig, LLMConfig, ModelConfig
from evo_compress.fitness import EVALUATORS, EvaluationContext, Evaluator
from evo_compress.genomes import SearchSpace
from evo_compress.objectives import OBJECTIVE_NAMES
from evo_compress.operators import CROSSOVERS, MUTATIONS
from evo_compress.operators._base import Operator
from evo_compress.registry import BUILTIN, Registry
from evo_compress.testing.contracts import EvaluatorContract, OperatorContract

REFERENCE_CPU = EvaluationContext(
    ModelConfig(id="reference"), HardwareConfig(device="cpu"), CarbonConfig()
)
TRANSFORMERS = {
    "threads": 1,
    "limit": 12,
    "latency_prompts": 2,
    "max_new_tokens": 4,
    "latency_repeats": 1,
    "calibration_samples": 8,
    "timeout_s": 240,
}
VLLM = {
    "command": [sys.executable, "-m", "evo_compress_doubles.vllm_server"],
    "vllm_version": "0.33.0",
    "latency_requests": 2,
    "max_new_tokens": 4,
    "warmup_requests": 1,
    "limit": 12,
    "startup_timeout_s": 120,
    "threads": 1,
}


# What each built-in evaluator needs: (settings, context), the objectives it promises to
# repeat exactly for one recipe, how many drawn recipes it evaluates besides the baseline.
EVALUATOR_SETUPS: dict[str, tuple[dict[str, Any], EvaluationContext, tuple[str, ...], int]] = {
    "synthetic": ({}, EvaluationContext(), tuple(OBJECTIVE_NAMES), 6),
    "auto": ({}, EvaluationContext(), tuple(OBJECTIVE_NAMES), 2),  # a synthetic model
    "transformers": (TRANSFORMERS, REFERENCE_CPU, ("accuracy",), 1),
    "vllm": (VLLM, REFERENCE_CPU, ("accuracy",), 0),
}
SLOW_EVALUATORS = {"transformers", "vllm"}  # real models, a server per evaluation


def builtin(registry: Registry[Any]) -> list[str]:
    return [name for name in registry.names() if registry.origin(name) == BUILTIN]


def _setup(name: str) -> tuple[dict[str, Any], EvaluationContext, tuple[str, ...], int]:
    if name not in EVALUATOR_SETUPS:
        pytest.fail(f"evaluator `{name}` is registered but has no contract setup here")
    return EVALUATOR_SETUPS[name]


@pytest.fixture(
    scope="class",
    params=[
        pytest.param(n, marks=[pytest.mark.slow] if n in SLOW_EVALUATORS else [])
        for n in builtin(EVALUATORS)
    ],
)
def evaluator_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class TestEvaluatorContract(EvaluatorContract):
    @pytest.fixture(scope="class")
    @classmethod
    def evaluator(
        cls, evaluator_name: str, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[Evaluator]:
        settings, context, _, _ = _setup(evaluator_name)
        if evaluator_name == "vllm":
            settings = settings | {"checkpoint_dir": str(tmp_path_factory.mktemp("ckpt"))}
        evaluator = EVALUATORS.get(evaluator_name)(settings, context)
        evaluator.set_run_dir(tmp_path_factory.mktemp("run"))
        yield evaluator
        evaluator.close()

    @pytest.fixture(scope="class")
    @classmethod
    def deterministic_objectives(cls, evaluator_name: str) -> tuple[str, ...]:
        return _setup(evaluator_name)[2]

    @pytest.fixture(scope="class")
    @classmethod
    def sample_count(cls, evaluator_name: str) -> int:
        return _setup(evaluator_name)[3]


# ---------------------------------------------------------------------- operators
@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeProviderServer]:
    with FakeProviderServer(default=model_like()) as server:
        yield server


def _llm(kind: type[Operator], server: FakeProviderServer, space: SearchSpace) -> Operator:
    session = AgentSession(LLMConfig(), None, lambda _: None, env={})
    params = operator_params(server, "openai-compatible")
    return kind(space, session=session, **params)  # type: ignore[call-arg]


def _classic(registry: Registry[Any], name: str) -> Callable[[SearchSpace], Operator]:
    return lambda space: registry.get(name)(space)


OPERATOR_SETUPS: dict[str, Callable[[FakeProviderServer, SearchSpace], Operator]] = {
    "crossover:uniform": lambda _, space: _classic(CROSSOVERS, "uniform")(space),
    "crossover:llm": lambda server, space: _llm(CROSSOVERS.get("llm"), server, space),
    "mutation:gene": lambda _, space: _classic(MUTATIONS, "gene")(space),
    "mutation:expert": lambda _, space: _classic(MUTATIONS, "expert")(space),
    "mutation:llm": lambda server, space: _llm(MUTATIONS.get("llm"), server, space),
}


@pytest.fixture(
    params=[f"crossover:{n}" for n in builtin(CROSSOVERS)]
    + [f"mutation:{n}" for n in builtin(MUTATIONS)]
)
def operator_key(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class TestOperatorContract(OperatorContract):
    @pytest.fixture
    def make_operator(
        self, operator_key: str, request: pytest.FixtureRequest
    ) -> Callable[[SearchSpace], Operator]:
        if operator_key not in OPERATOR_SETUPS:
            pytest.fail(f"operator `{operator_key}` is registered but has no contract setup here")
        setup = OPERATOR_SETUPS[operator_key]
        if operator_key.endswith(":llm"):
            server = request.getfixturevalue("fake_llm")
            return lambda space: setup(server, space)
        return lambda space: setup(None, space)  # type: ignore[arg-type]


def test_the_suites_fail_what_breaks_the_contract() -> None:
    """The suites can fail: four objectives, a failure without a reason, a changed recipe and
    a mutation that rewrites its parent's measurements are all caught."""
    from evo_compress.fitness import EvaluationResult
    from evo_compress.operators import Mutation
    from evo_compress.testing import samples

    space = SearchSpace.builtin()
    [recipe] = samples(space, 1)
    four = dict.fromkeys(OBJECTIVE_NAMES[:4], 1.0)
    suite = EvaluatorContract()
    for bad in (EvaluationResult("ok", four), EvaluationResult("failed", None, "")):
        with pytest.raises(AssertionError):
            suite.test_results_are_five_finite_objectives_or_a_failure_with_a_reason(
                [(recipe, recipe.canonical_json(), bad)]
            )
    with pytest.raises(AssertionError):
        suite.test_the_recipe_is_never_modified([(recipe, "{}", EvaluationResult("ok", four))])

    class Rewrites(Mutation):
        name = "rewrites"

        def vary(self, parents, rng, context):  # type: ignore[no-untyped-def]
            parents[0].objectives["accuracy"] = 0.0
            return super().vary(parents, rng, context)

        def _do(self, values, rng):  # type: ignore[no-untyped-def]
            return values

    with pytest.raises(AssertionError):
        OperatorContract().test_parents_are_never_modified(Rewrites, space)
