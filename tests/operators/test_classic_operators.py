"""Contract suite for every registered crossover and mutation, plus the classic operators' own
behaviour and the operator registries."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evo_compress.exceptions import OperatorError, RegistryError
from evo_compress.genomes import (
    BoolGene,
    ChoiceGene,
    FloatGene,
    IntGene,
    Recipe,
    SearchSpace,
)
from evo_compress.operators import (
    CROSSOVERS,
    MUTATIONS,
    Crossover,
    GeneMutation,
    Mutation,
    UniformCrossover,
    make_crossover,
    make_mutation,
)
from evo_compress.registry import Registry
from evo_compress.testing import SEED_MAX, rng, samples

SPACE = SearchSpace.builtin()
# The same genes without forbid rules: there repair never has to move a gene off a value that
# a parent had, so inheritance can be checked exactly.
FREE_SPACE = SearchSpace.from_data({k: v for k, v in SPACE.to_data().items() if k != "forbid"})
FORBID_GENES = {name for rule in SPACE.forbid for name in rule.when.genes()}

seeds = st.integers(min_value=0, max_value=SEED_MAX)


def is_canonical(space: SearchSpace, recipe: Recipe) -> bool:
    again = space.recipe(recipe.to_dict())
    return again == recipe and again.canonical_json() == recipe.canonical_json()


def snapshot(recipe: Recipe) -> tuple[str, str, dict[str, Any], dict[str, Any]]:
    return (
        recipe.hash,
        recipe.canonical_json(),
        copy.deepcopy(recipe.to_dict()),
        dict(recipe),
    )


def required_params(name: str) -> dict[str, Any]:
    """Params an operator cannot be built without. An LLM operator's plain ``do`` (outside a
    search, with no session) is its fallback's: the LLM path has its own tests."""
    if name == "llm":
        return {"provider": "openai-compatible", "base_url": "http://127.0.0.1:9/v1", "model": "m"}
    return {}


# Every registered operator runs the contract (plain parametrize, not a fixture, so that
# hypothesis can drive the same tests).
each_crossover = pytest.mark.parametrize("crossover_name", CROSSOVERS.names())
each_mutation = pytest.mark.parametrize("mutation_name", MUTATIONS.names())


def test_classic_operators_are_registered() -> None:
    assert "uniform" in CROSSOVERS
    assert "gene" in MUTATIONS
    assert isinstance(make_crossover("uniform", SPACE, {}), UniformCrossover)
    assert isinstance(make_mutation("gene", SPACE, {}), GeneMutation)


# ---------------------------------------------------------------------- crossover contract


@each_crossover
def test_crossover_factory_builds_a_crossover(crossover_name: str) -> None:
    op = make_crossover(crossover_name, SPACE, required_params(crossover_name))
    assert isinstance(op, Crossover)
    assert op.space is SPACE
    op.load_state_dict(op.state_dict())


@each_crossover
@given(seed_a=seeds, seed_b=seeds, seed=seeds)
def test_crossover_contract(crossover_name: str, seed_a: int, seed_b: int, seed: int) -> None:
    op = make_crossover(crossover_name, SPACE, required_params(crossover_name))
    parents = [SPACE.sample(rng(seed_a)), SPACE.sample(rng(seed_b))]
    before = [snapshot(p) for p in parents]
    child = op.do(parents, rng(seed))
    assert [snapshot(p) for p in parents] == before  # parents are never modified
    assert isinstance(child, Recipe)
    assert is_canonical(SPACE, child)
    assert SPACE.violated_rule(dict(child)) is None
    assert op.do(parents, rng(seed)) == child  # same seed, same child
    for name, value in child.items():
        inherited = [p[name] for p in parents if name in p]
        if name not in FORBID_GENES and SPACE.genes[name].active_if.genes().isdisjoint(
            FORBID_GENES
        ):
            # genes no forbid rule can disturb always come from a parent when one has them
            assert not inherited or value in inherited, name


@each_crossover
@given(seed_a=seeds, seed_b=seeds, seed=seeds)
def test_crossover_child_takes_each_gene_from_a_parent(
    crossover_name: str, seed_a: int, seed_b: int, seed: int
) -> None:
    op = make_crossover(crossover_name, FREE_SPACE, required_params(crossover_name))
    parents = [FREE_SPACE.sample(rng(seed_a)), FREE_SPACE.sample(rng(seed_b))]
    child = op.do(parents, rng(seed))
    assert is_canonical(FREE_SPACE, child)
    for name, value in child.items():
        inherited = [p[name] for p in parents if name in p]
        if inherited:
            assert value in inherited, (name, value, inherited)
        # else: switched on by the combination; is_canonical shows it is a valid value


@each_crossover
@given(seed_a=seeds, seed=seeds)
def test_crossover_of_a_recipe_with_itself_returns_it(
    crossover_name: str, seed_a: int, seed: int
) -> None:
    op = make_crossover(crossover_name, SPACE, required_params(crossover_name))
    parent = SPACE.sample(rng(seed_a))
    assert op.do([parent, parent], rng(seed)) == parent


@each_crossover
def test_crossover_checks_the_number_of_parents(crossover_name: str) -> None:
    op = make_crossover(crossover_name, SPACE, required_params(crossover_name))
    parent = SPACE.baseline()
    for count in (0, 1, op.n_parents + 1):
        with pytest.raises(OperatorError, match=crossover_name):
            op.do([parent] * count, rng())


@each_crossover
def test_crossover_mixes_both_parents(crossover_name: str) -> None:
    op = make_crossover(crossover_name, FREE_SPACE, required_params(crossover_name))
    a = FREE_SPACE.recipe({"quant.method": "awq", "kv.dtype": "fp8", "serve.max_num_seqs": 1})
    b = FREE_SPACE.recipe({"quant.method": "gptq", "kv.dtype": "auto", "serve.max_num_seqs": 256})
    generator = rng(5)
    children = {op.do([a, b], generator) for _ in range(100)}
    assert len(children) > 2  # more than just copies of the parents


@each_crossover
def test_crossover_with_a_mostly_pinned_space(crossover_name: str) -> None:
    pins = {n: g.default for n, g in SPACE.genes.items() if n != "serve.gpu_memory_utilization"}
    pinned = SPACE.with_overrides(pin=pins)
    op = make_crossover(crossover_name, pinned, required_params(crossover_name))
    parents = samples(pinned, 2, seed=1)
    child = op.do(parents, rng(2))
    assert is_canonical(pinned, child)
    assert child["serve.gpu_memory_utilization"] in {
        p["serve.gpu_memory_utilization"] for p in parents
    }


# ---------------------------------------------------------------------- mutation contract


@each_mutation
def test_mutation_factory_builds_a_mutation(mutation_name: str) -> None:
    op = make_mutation(mutation_name, SPACE, required_params(mutation_name))
    assert isinstance(op, Mutation)
    assert op.space is SPACE
    op.load_state_dict(op.state_dict())


@each_mutation
@given(seed_parent=seeds, seed=seeds)
def test_mutation_contract(mutation_name: str, seed_parent: int, seed: int) -> None:
    op = make_mutation(mutation_name, SPACE, required_params(mutation_name))
    parent = SPACE.sample(rng(seed_parent))
    before = snapshot(parent)
    child = op.do(parent, rng(seed))
    assert snapshot(parent) == before
    assert isinstance(child, Recipe)
    assert is_canonical(SPACE, child)
    assert SPACE.violated_rule(dict(child)) is None
    assert op.do(parent, rng(seed)) == child


@each_mutation
def test_mutation_almost_always_changes_the_recipe(mutation_name: str) -> None:
    op = make_mutation(mutation_name, SPACE, required_params(mutation_name))
    parents = samples(SPACE, 200, seed=21)
    generator = rng(22)
    changed = sum(op.do(parent, generator) != parent for parent in parents)
    assert changed >= 190


@each_mutation
def test_mutation_of_the_baseline_always_changes_it(mutation_name: str) -> None:
    op = make_mutation(mutation_name, SPACE, required_params(mutation_name))
    baseline = SPACE.baseline()
    generator = rng(3)
    children = [op.do(baseline, generator) for _ in range(200)]
    assert sum(c != baseline for c in children) >= 190
    assert len({c.hash for c in children}) > 20  # explores, does not repeat one move


@each_mutation
def test_mutation_with_all_genes_but_one_pinned(mutation_name: str) -> None:
    free = "serve.gpu_memory_utilization"
    pins = {n: g.default for n, g in SPACE.genes.items() if n != free}
    pinned = SPACE.with_overrides(pin=pins)
    op = make_mutation(mutation_name, pinned, required_params(mutation_name))
    generator = rng(4)
    parents = samples(pinned, 50, seed=5)
    children = [op.do(p, generator) for p in parents]
    for parent, child in zip(parents, children, strict=True):
        assert is_canonical(pinned, child)
        for name in pins:
            assert child.get(name) == parent.get(name)
    assert sum(c != p for p, c in zip(parents, children, strict=True)) >= 45
    assert len({c[free] for c in children}) > 3


@each_mutation
def test_mutation_with_everything_pinned_returns_a_valid_recipe(mutation_name: str) -> None:
    pinned = SPACE.with_overrides(pin={n: g.default for n, g in SPACE.genes.items()})
    op = make_mutation(mutation_name, pinned, required_params(mutation_name))
    child = op.do(pinned.baseline(), rng(0))
    assert is_canonical(pinned, child)
    assert child == pinned.baseline()  # nothing can vary


# ---------------------------------------------------------------------- classic specifics


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"swap_prob": 2}, "`swap_prob`"),
        ({"swap_prob": -0.1}, "`swap_prob`"),
        ({"swap_prob": float("nan")}, "`swap_prob`"),
        ({"swap_rate": 0.5}, "swap_rate"),
    ],
)
def test_bad_crossover_params_raise(params: dict[str, Any], fragment: str) -> None:
    with pytest.raises(OperatorError) as info:
        make_crossover("uniform", SPACE, params)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"gene_prob": 0}, "`gene_prob`"),
        ({"gene_prob": 1.5}, "`gene_prob`"),
        ({"gene_prob": float("nan")}, "`gene_prob`"),
        ({"step_scale": 0}, "`step_scale`"),
        ({"step_scale": -1.0}, "`step_scale`"),
        ({"rate": 0.1}, "rate"),
    ],
)
def test_bad_mutation_params_raise(params: dict[str, Any], fragment: str) -> None:
    with pytest.raises(OperatorError) as info:
        make_mutation("gene", SPACE, params)
    assert fragment in str(info.value)


def test_unknown_param_error_names_the_config_section() -> None:
    with pytest.raises(OperatorError, match=r"`search\.mutation\.params`"):
        make_mutation("gene", SPACE, {"rate": 0.1}, where="search.mutation")
    with pytest.raises(OperatorError, match=r"`crossover\.params`"):
        make_crossover("uniform", SPACE, {"nope": 1})


def test_infinite_step_scale_is_rejected() -> None:
    with pytest.raises(OperatorError, match="`step_scale`"):
        make_mutation("gene", SPACE, {"step_scale": float("inf")})


@pytest.mark.parametrize("swap_prob", [0.0, 1.0])
def test_uniform_crossover_extreme_swap_prob_copies_one_parent(swap_prob: float) -> None:
    op = make_crossover("uniform", FREE_SPACE, {"swap_prob": swap_prob})
    for seed in range(30):
        a, b = samples(FREE_SPACE, 2, seed=100 + seed)
        child = op.do([a, b], rng(seed))
        source = b if swap_prob == 1.0 else a
        for name, value in child.items():
            if name in source:
                assert value == source[name], name


def test_gene_mutation_with_gene_prob_one_changes_every_gene() -> None:
    op = make_mutation("gene", FREE_SPACE, {"gene_prob": 1.0})
    parent = FREE_SPACE.recipe(
        {"quant.method": "awq", "recovery.method": "distill", "kv.sliding_window": True}
    )
    for seed in range(20):
        child = op.do(parent, rng(seed))
        # the genes the mutation may switch off drop out; every other one must move
        for name in (
            "quant.method",
            "prune.method",
            "recovery.method",
            "kv.dtype",
            "kv.sliding_window",
            "serve.max_num_seqs",
            "serve.gpu_memory_utilization",
            "serve.attention_backend",
        ):
            assert child[name] != parent[name], (seed, name)


AT_BOUNDS = pytest.mark.parametrize(
    ("values", "gene"),
    [
        ({"recovery.method": "lora", "recovery.steps": 50}, "recovery.steps"),
        ({"recovery.method": "lora", "recovery.steps": 2000}, "recovery.steps"),
        ({"prune.method": "wanda", "prune.sparsity": 0.05}, "prune.sparsity"),
        ({"prune.method": "wanda", "prune.sparsity": 0.7}, "prune.sparsity"),
        ({"serve.gpu_memory_utilization": 0.95}, "serve.gpu_memory_utilization"),
        ({"serve.gpu_memory_utilization": 0.5}, "serve.gpu_memory_utilization"),
    ],
)


def _only_free(values: dict[str, Any], gene: str) -> SearchSpace:
    return SPACE.with_overrides(
        pin={n: values.get(n, g.default) for n, g in SPACE.genes.items() if n != gene}
    )


@AT_BOUNDS
def test_numeric_mutation_at_a_bound_moves_into_range(values: dict[str, Any], gene: str) -> None:
    space = _only_free(values, gene)
    parent = space.recipe(values)
    op = make_mutation("gene", space, {})
    generator = rng(9)
    moved = {op.do(parent, generator)[gene] for _ in range(100)}
    assert parent[gene] not in moved
    assert len(moved) > 1


@AT_BOUNDS
def test_numeric_mutation_with_a_large_step_scale_always_moves(
    values: dict[str, Any], gene: str
) -> None:
    space = _only_free(values, gene)
    parent = space.recipe(values)
    op = make_mutation("gene", space, {"step_scale": 1.0})
    generator = rng(9)
    assert all(op.do(parent, generator)[gene] != parent[gene] for _ in range(100))


def test_gene_mutation_moves_each_gene_type() -> None:
    op = make_mutation("gene", FREE_SPACE, {"gene_prob": 1.0, "step_scale": 0.1})
    parent = FREE_SPACE.recipe({"recovery.method": "distill", "kv.sliding_window": True})
    kinds: dict[type, set[Any]] = {
        ChoiceGene: set(),
        BoolGene: set(),
        IntGene: set(),
        FloatGene: set(),
    }
    generator = rng(12)
    for _ in range(40):
        child = op.do(parent, generator)
        for name, value in child.items():
            if name in parent and value != parent[name]:
                kinds[type(FREE_SPACE.genes[name])].add(name)
    assert all(kinds.values()), kinds


# ---------------------------------------------------------------------- registries


def test_registering_a_name_twice_raises() -> None:
    registry: Registry[object] = Registry("widget")
    registry.register("a", object)
    with pytest.raises(RegistryError, match="widget `a` is already registered"):
        registry.register("a", dict)
    assert registry.get("a") is object  # the first entry stays

    @registry.register("b")
    def factory() -> object:
        return object()

    with pytest.raises(RegistryError, match="`b`"):
        registry.register("b")(factory)
    assert registry.names() == ["a", "b"]
    assert list(registry) == ["a", "b"]
    assert "b" in registry


def test_builtin_operator_names_cannot_be_registered_again() -> None:
    with pytest.raises(RegistryError, match="`uniform`"):
        CROSSOVERS.register("uniform", UniformCrossover)
    with pytest.raises(RegistryError, match="`gene`"):
        MUTATIONS.register("gene", GeneMutation)
    assert CROSSOVERS.get("uniform") is UniformCrossover
    assert MUTATIONS.get("gene") is GeneMutation


def test_lazy_registry_entry_is_imported_on_first_get() -> None:
    registry: Registry[object] = Registry("thing")
    registry.register("ordered", "collections:OrderedDict")
    from collections import OrderedDict

    assert registry.get("ordered") is OrderedDict
    assert registry.get("ordered") is OrderedDict


@pytest.mark.parametrize(
    ("make", "name", "suggestion", "known"),
    [
        (make_crossover, "unifrom", "uniform", "uniform"),
        (make_mutation, "genes", "gene", "gene"),
    ],
)
def test_unknown_operator_suggests_the_closest(
    make: Any, name: str, suggestion: str, known: str
) -> None:
    with pytest.raises(RegistryError) as info:
        make(name, SPACE, {})
    message = str(info.value)
    assert f"`{name}`" in message
    assert f"did you mean `{suggestion}`" in message
    assert "known:" in message
    assert known in message.split("known:")[1]


def test_unknown_name_far_from_any_has_no_suggestion() -> None:
    with pytest.raises(RegistryError) as info:
        CROSSOVERS.get("zzzzzz")
    assert "did you mean" not in str(info.value)
    assert "uniform" in str(info.value)
