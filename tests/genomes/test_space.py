"""Search spaces: definition errors, built-ins, overrides, sampling and repair."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from evo_compress.exceptions import RecipeError, SearchSpaceError
from evo_compress.genomes import (
    BoolGene,
    ChoiceGene,
    FloatGene,
    IntGene,
    Recipe,
    SearchSpace,
    builtin_space_names,
    flatten,
    nest,
)
from evo_compress.testing import SEED_MAX, rng, samples

SPACE = SearchSpace.builtin()

seeds = st.integers(min_value=0, max_value=SEED_MAX)


def is_canonical(space: SearchSpace, recipe: Recipe) -> bool:
    again = space.recipe(recipe.to_dict())
    return again == recipe and again.canonical_json() == recipe.canonical_json()


# ---------------------------------------------------------------------- definition errors

MINIMAL: dict[str, Any] = {
    "name": "tiny",
    "genes": {
        "a.mode": {"type": "choice", "choices": ["off", "on"], "default": "off"},
        "a.level": {
            "type": "int",
            "low": 1,
            "high": 9,
            "step": 2,
            "active_if": {"a.mode": ["on"]},
        },
        "b.ratio": {"type": "float", "low": 0.1, "high": 0.9, "step": 0.1, "default": 0.5},
        "b.flag": {"type": "bool"},
    },
    "forbid": [{"when": {"a.mode": ["on"], "b.flag": [True]}, "reason": "flag needs mode off"}],
}


def with_change(path: list[str], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(MINIMAL)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


def space_error(data: Any) -> str:
    with pytest.raises(SearchSpaceError) as info:
        SearchSpace.from_data(data)
    return str(info.value)


def test_minimal_space_is_valid() -> None:
    space = SearchSpace.from_data(MINIMAL)
    assert space.name == "tiny"
    assert list(space.baseline()) == ["a.mode", "b.flag", "b.ratio"]
    assert isinstance(space.genes["a.level"], IntGene)
    assert isinstance(space.genes["b.ratio"], FloatGene)
    assert isinstance(space.genes["b.flag"], BoolGene)
    assert space.genes["a.level"].default == 1  # low when not given
    assert space.genes["b.flag"].default is False


@pytest.mark.parametrize(
    ("path", "value", "fragments"),
    [
        (
            ["genes", "a.level", "active_if"],
            {"a.mood": ["on"]},
            ["`genes.a.level.active_if`", "`a.mood`"],
        ),
        (
            ["forbid"],
            [{"when": {"b.flg": [True]}, "reason": "x"}],
            ["`forbid[0].when`", "`b.flg`"],
        ),
        (["genes", "a.mode", "choices"], ["off", "on", "off"], ["a.mode.choices", "duplicates"]),
        (["genes", "a.mode", "choices"], [], ["a.mode.choices", "empty"]),
        (["genes", "a.mode", "choices"], "off,on", ["`genes.a.mode.choices`", "list"]),
        (["genes", "a.level", "low"], 11, ["a.level", "low 11", "high 9"]),
        (["genes", "b.ratio", "high"], 0.05, ["b.ratio", "low 0.1", "high 0.05"]),
        (["genes", "b.ratio", "step"], 0, ["b.ratio.step", "> 0"]),
        (["genes", "b.ratio", "step"], -0.1, ["b.ratio.step", "> 0"]),
        (["genes", "b.ratio", "low"], "low", ["`genes.b.ratio.low`", "number", "'low'"]),
        (["genes", "b.ratio", "type"], "floaat", ["`genes.b.ratio.type`", "'floaat'", "float"]),
        (["genes", "b.ratio", "type"], None, ["`genes.b.ratio.type`", "None"]),
        (["genes", "b.ratio", "lo"], 0.2, ["`genes.b.ratio`", "unknown keys", "'lo'"]),
        (["genes", "b.flag", "choices"], [True], ["`genes.b.flag`", "unknown keys", "choices"]),
        (["genes", "b.ratio"], [0.1, 0.9], ["`genes.b.ratio`", "mapping"]),
        (["gens"], {}, ["unknown keys", "'gens'"]),
        (["genes"], {}, ["`genes`", "non-empty"]),
        (["genes", "a.mode", "default"], "maybe", ["`genes.a.mode.default`", "'maybe'"]),
        (["genes", "b.ratio", "default"], 2.0, ["`genes.b.ratio.default`", "2.0"]),
        (["genes", "b.flag", "default"], "no", ["`genes.b.flag.default`", "'no'"]),
        (["genes", "a.level", "active_if"], "a.mode", ["`genes.a.level.active_if`", "mapping"]),
        (["genes", "a.level", "active_if"], {}, ["`genes.a.level.active_if[0]`", "non-empty"]),
        (
            ["genes", "a.level", "active_if"],
            {"a.mode": {"any_of": ["on"]}},
            ["`genes.a.level.active_if[0].a.mode`", "not_in"],
        ),
        (["forbid"], [{"reason": "missing when"}], ["`forbid[0]`", "when"]),
        (["forbid"], [{"when": {"a.mode": ["on"]}, "why": "x"}], ["`forbid[0]`"]),
    ],
)
def test_definition_errors_name_the_field(
    path: list[str], value: Any, fragments: list[str]
) -> None:
    message = space_error(with_change(path, value))
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_missing_bounds_name_the_field() -> None:
    data = copy.deepcopy(MINIMAL)
    del data["genes"]["b.ratio"]["high"]
    assert "`genes.b.ratio.high`" in space_error(data)


def test_condition_cycle_is_rejected() -> None:
    data = {
        "genes": {
            "x": {"type": "bool", "active_if": {"y": [True]}},
            "y": {"type": "bool", "active_if": {"x": [True]}},
            "z": {"type": "bool"},
        }
    }
    message = space_error(data)
    assert "cycle" in message
    assert "x" in message
    assert "y" in message
    assert "z" not in message.split("among:")[1]


def test_self_condition_is_a_cycle() -> None:
    message = space_error({"genes": {"x": {"type": "bool", "active_if": {"x": [True]}}}})
    assert "cycle" in message


def test_gene_declared_before_its_condition_is_ordered_after_it() -> None:
    data = {
        "genes": {
            "late": {"type": "bool", "active_if": {"early": ["on"]}},
            "early": {"type": "choice", "choices": ["off", "on"]},
        }
    }
    space = SearchSpace.from_data(data)
    assert list(space.genes) == ["early", "late"]
    assert "late" in space.recipe({"early": "on"})
    assert "late" not in space.recipe({"early": "off"})


def test_gene_declared_twice_is_rejected() -> None:
    gene = ChoiceGene(name="a", default="x", choices=("x", "y"))
    with pytest.raises(SearchSpaceError, match=r"`a`.*twice"):
        SearchSpace("dup", [gene, gene])


def test_non_mapping_space_is_rejected() -> None:
    assert "mapping" in space_error(["genes"])


def test_unhashable_choices_give_a_space_error() -> None:
    message = space_error(with_change(["genes", "a.mode", "choices"], [[1, 2], [3]]))
    assert "a.mode.choices" in message


def test_int_gene_with_fractional_bound_is_rejected() -> None:
    message = space_error(with_change(["genes", "a.level", "low"], 1.5))
    assert "a.level.low" in message


def test_gene_name_that_is_a_group_of_another_is_rejected() -> None:
    data = {"genes": {"a": {"type": "choice", "choices": ["x"]}, "a.b": {"type": "bool"}}}
    try:
        space = SearchSpace.from_data(data)
    except SearchSpaceError:
        return
    space.baseline().to_dict()
    raise AssertionError("nested form of `a` and `a.b` is ambiguous but was accepted")


# ---------------------------------------------------------------------- built-ins and files


def test_builtin_space_is_listed_and_loads() -> None:
    assert "llm-compression" in builtin_space_names()
    assert "portfolios" not in builtin_space_names()
    assert SearchSpace.load("llm-compression").fingerprint == SPACE.fingerprint
    assert SPACE.name == "llm-compression"


def test_unknown_builtin_space_suggests_the_closest() -> None:
    with pytest.raises(SearchSpaceError) as info:
        SearchSpace.builtin("llm-compresion")
    message = str(info.value)
    assert "`llm-compresion`" in message
    assert "did you mean `llm-compression`" in message


def test_builtin_defaults_are_the_uncompressed_baseline() -> None:
    baseline = SPACE.baseline()
    assert baseline["quant.method"] == "none"
    assert baseline["prune.method"] == "none"
    assert baseline["recovery.method"] == "none"
    assert SPACE.violated_rule(dict(baseline)) is None


def test_space_round_trips_through_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "my-space.yaml"
    path.write_text(yaml.safe_dump(SPACE.to_data()))
    loaded = SearchSpace.load(str(path))
    assert loaded.fingerprint == SPACE.fingerprint
    assert loaded.genes["prune.pattern"].choices == ("unstructured", "2:4", "4:8")  # type: ignore[attr-defined]
    for recipe in samples(SPACE, 50):
        assert loaded.recipe(recipe.to_dict()).hash == recipe.hash


def test_space_file_name_is_the_default_name(tmp_path: Path) -> None:
    data = {k: v for k, v in MINIMAL.items() if k != "name"}
    path = tmp_path / "pocket.yaml"
    path.write_text(yaml.safe_dump(data))
    assert SearchSpace.from_yaml(path).name == "pocket"


def test_bad_space_files_raise_space_errors(tmp_path: Path) -> None:
    with pytest.raises(SearchSpaceError, match="does not exist"):
        SearchSpace.load(str(tmp_path / "missing.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("genes: {a: [unclosed")
    with pytest.raises(SearchSpaceError, match="not valid YAML"):
        SearchSpace.from_yaml(broken)


# ---------------------------------------------------------------------- overrides


def test_pin_fixes_the_gene_in_every_sample() -> None:
    pinned = SPACE.with_overrides(pin={"quant.method": "awq", "serve.max_num_seqs": 8})
    for recipe in samples(pinned, 200):
        assert recipe["quant.method"] == "awq"
        assert recipe["serve.max_num_seqs"] == 8
        assert recipe["recovery.method"] != "qlora"  # forbidden with awq, never sampled
    assert pinned.baseline()["quant.method"] == "awq"
    with pytest.raises(RecipeError, match=r"`quant\.method`"):
        pinned.recipe({"quant": {"method": "nf4"}})


def test_pin_keeps_a_conditional_gene_conditional() -> None:
    pinned = SPACE.with_overrides(pin={"quant.group_size": 64})
    seen_without = False
    for recipe in samples(pinned, 200):
        if "quant.group_size" in recipe:
            assert recipe["quant.group_size"] == 64
        else:
            seen_without = True
            assert recipe["quant.method"] not in ("nf4", "awq", "gptq", "rtn")
    assert seen_without


@pytest.mark.parametrize(
    ("pin", "gene"),
    [
        ({"quant.method": "int4"}, "quant.method"),
        ({"prune.sparsity": 0.9}, "prune.sparsity"),
        ({"kv.sliding_window": 1}, "kv.sliding_window"),
        ({"recovery.steps": "100"}, "recovery.steps"),
    ],
)
def test_pinning_an_invalid_value_raises(pin: dict[str, Any], gene: str) -> None:
    with pytest.raises(SearchSpaceError) as info:
        SPACE.with_overrides(pin=pin)
    assert f"`{gene}`" in str(info.value)
    assert "pin" in str(info.value)


def test_pinning_an_unknown_gene_suggests_the_closest() -> None:
    with pytest.raises(SearchSpaceError) as info:
        SPACE.with_overrides(pin={"quant.metod": "nf4"})
    assert "did you mean `quant.method`" in str(info.value)


def test_narrowed_float_range_keeps_samples_inside() -> None:
    narrow = SPACE.with_overrides(genes={"prune.sparsity": {"low": 0.2, "high": 0.4}})
    values = {r["prune.sparsity"] for r in samples(narrow, 300) if "prune.sparsity" in r}
    assert values == {0.2, 0.25, 0.3, 0.35, 0.4}
    assert narrow.genes["prune.sparsity"].default == 0.2  # old default 0.5 no longer fits
    with pytest.raises(RecipeError, match=r"`prune\.sparsity`"):
        narrow.recipe({"prune": {"method": "wanda", "sparsity": 0.5}})


def test_narrowing_keeps_a_default_that_still_fits() -> None:
    narrow = SPACE.with_overrides(genes={"kv.window": {"low": 1024, "high": 6144}})
    assert narrow.genes["kv.window"].default == SPACE.genes["kv.window"].default
    for recipe in samples(narrow, 200):
        if "kv.window" in recipe:
            assert 1024 <= recipe["kv.window"] <= 6144


def test_added_choice_becomes_reachable() -> None:
    old = list(SPACE.genes["serve.attention_backend"].choices)  # type: ignore[attr-defined]
    wider = SPACE.with_overrides(
        genes={"serve.attention_backend": {"choices": [*old, "xformers"]}}
    )
    seen = {r["serve.attention_backend"] for r in samples(wider, 300)}
    assert seen == {*old, "xformers"}
    assert wider.recipe({"serve": {"attention_backend": "xformers"}})
    with pytest.raises(RecipeError):
        SPACE.recipe({"serve": {"attention_backend": "xformers"}})


def test_new_gene_via_overrides() -> None:
    extended = SPACE.with_overrides(
        genes={
            "serve.chunked_prefill": {"type": "bool", "default": True},
            "serve.prefill_chunk": {
                "type": "int",
                "low": 256,
                "high": 2048,
                "step": 256,
                "active_if": {"serve.chunked_prefill": [True]},
            },
        }
    )
    assert extended.baseline()["serve.chunked_prefill"] is True
    assert extended.baseline()["serve.prefill_chunk"] == 256
    seen = {r.get("serve.prefill_chunk") for r in samples(extended, 300)}
    assert None in seen  # inactive when the flag is off
    assert len(seen - {None}) > 3
    assert "serve.chunked_prefill" not in SPACE.genes  # the original is untouched


def test_overrides_add_forbid_rules() -> None:
    stricter = SPACE.with_overrides(
        forbid=[
            {
                "when": {"kv.dtype": ["fp8"], "quant.method": ["none"]},
                "reason": "fp8 KV cache wants a quantized model",
            }
        ]
    )
    assert len(stricter.forbid) == len(SPACE.forbid) + 1
    with pytest.raises(RecipeError, match="fp8 KV cache wants a quantized model"):
        stricter.recipe({"kv": {"dtype": "fp8"}})
    for recipe in samples(stricter, 200):
        assert not (recipe["kv.dtype"] == "fp8" and recipe["quant.method"] == "none")


def test_bad_gene_override_raises() -> None:
    with pytest.raises(SearchSpaceError, match=r"`genes\.quant\.method`"):
        SPACE.with_overrides(genes={"quant.method": ["nf4"]})  # type: ignore[dict-item]
    with pytest.raises(SearchSpaceError, match="low"):
        SPACE.with_overrides(genes={"prune.sparsity": {"low": 0.6, "high": 0.2}})


def test_overrides_round_trip_through_data() -> None:
    changed = SPACE.with_overrides(
        pin={"kv.dtype": "fp8", "prune.sparsity": 0.3},
        genes={
            "recovery.steps": {"high": 1000},
            "quant.method": {"choices": ["none", "awq", "nf4"]},
            "extra.flag": {"type": "bool"},
        },
        forbid=[{"when": {"extra.flag": [True], "quant.method": ["none"]}, "reason": "r"}],
    )
    again = SearchSpace.from_data(changed.to_data())
    assert again.fingerprint == changed.fingerprint
    assert again.to_data() == changed.to_data()
    via_yaml = SearchSpace.from_data(yaml.safe_load(yaml.safe_dump(changed.to_data())))
    assert via_yaml.fingerprint == changed.fingerprint
    for recipe in samples(changed, 100):
        assert again.recipe(recipe.to_dict()) == recipe
    assert changed.fingerprint != SPACE.fingerprint


def test_pinned_float_gene_still_snaps_noise() -> None:
    pinned = SPACE.with_overrides(pin={"prune.sparsity": 0.3})
    noisy = pinned.recipe({"prune": {"method": "wanda", "sparsity": 0.1 + 0.2}})
    assert noisy == pinned.recipe({"prune": {"method": "wanda"}})


# ---------------------------------------------------------------------- sampling


@given(seed=seeds)
def test_sample_is_deterministic_and_valid(seed: int) -> None:
    first = SPACE.sample(rng(seed))
    assert SPACE.sample(rng(seed)) == first
    assert is_canonical(SPACE, first)
    assert SPACE.violated_rule(dict(first)) is None
    assert set(first) == set(SPACE.active_genes(dict(first)))


def test_sample_sequence_is_deterministic() -> None:
    assert [r.hash for r in samples(SPACE, 30, seed=7)] == [
        r.hash for r in samples(SPACE, 30, seed=7)
    ]
    assert samples(SPACE, 30, seed=7) != samples(SPACE, 30, seed=8)


def test_samples_cover_every_choice_and_range_end() -> None:
    drawn = samples(SPACE, 1500, seed=3)
    for name, gene in SPACE.genes.items():
        values = {r[name] for r in drawn if name in r}
        if isinstance(gene, ChoiceGene):
            assert values == set(gene.choices), name
        elif isinstance(gene, BoolGene):
            assert values == {False, True}, name
        else:
            assert isinstance(gene, (IntGene, FloatGene))
            assert min(values) == gene.low, name
            assert abs(max(values) - gene.high) < 1e-9, name
    assert len({r.hash for r in drawn}) > 1400  # the space is large: few repeats


def test_every_quant_method_appears() -> None:
    seen = {r["quant.method"] for r in samples(SPACE, 300, seed=11)}
    assert seen == set(SPACE.genes["quant.method"].choices)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------- repair

GENE_NAMES = list(SPACE.genes)
ALL_CHOICES = sorted(
    {c for g in SPACE.genes.values() if isinstance(g, ChoiceGene) for c in g.choices}, key=repr
)
junk_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(ALL_CHOICES),
    st.lists(st.integers(), max_size=2),
)
junk_keys = st.sampled_from([*GENE_NAMES, "foo", "quant.bits", "x.y.z", "serve.port"])
junk_dicts = st.dictionaries(junk_keys, junk_values, max_size=14)


@given(data=junk_dicts, seed=seeds, nested=st.booleans())
def test_repair_of_junk_gives_a_canonical_valid_recipe(
    data: dict[str, Any], seed: int, nested: bool
) -> None:
    source = nest(data) if nested else data
    before = copy.deepcopy(source)
    repaired = SPACE.repair(source, rng(seed))
    assert source == before  # the input is not modified
    assert is_canonical(SPACE, repaired)
    assert SPACE.recipe(repaired).hash == repaired.hash
    assert SPACE.repair(repaired.to_dict(), rng(seed + 1)) == repaired
    assert SPACE.repair(data, rng(seed)) == repaired  # deterministic for a seed


@given(
    data=junk_dicts,
    seed=seeds,
    recovery=st.sampled_from(["none", "lora", "distill"]),
)
def test_repair_keeps_every_valid_active_value(
    data: dict[str, Any], seed: int, recovery: str
) -> None:
    # Both built-in forbid rules need qlora; without it no rule fires, so nothing valid may
    # be changed (with a rule firing, a gene it switches on is sampled afresh, by design).
    data = {**data, "recovery.method": recovery}
    repaired = SPACE.repair(data, rng(seed))
    for name, value in repaired.items():
        if name in data:
            try:
                valid = SPACE.genes[name].check(data[name])
            except RecipeError:
                continue
            assert value == valid, name


@given(seed=seeds, junk_seed=seeds, junk=st.lists(junk_values, min_size=1, max_size=8))
def test_repair_of_a_valid_recipe_with_junk_on_the_side_returns_it(
    seed: int, junk_seed: int, junk: list[Any]
) -> None:
    recipe = SPACE.sample(rng(seed))
    data: dict[str, Any] = recipe.to_dict(nested=False)
    inactive = [n for n in GENE_NAMES if n not in recipe]
    for i, value in enumerate(junk):
        if inactive:
            data[inactive[i % len(inactive)]] = value
    data["foo"] = junk[0]
    data["quant.bits"] = junk[-1]
    assert SPACE.repair(data, rng(junk_seed)) == recipe
    assert SPACE.repair(recipe, rng(junk_seed)) == recipe


@pytest.mark.parametrize(
    ("gene", "value", "expected"),
    [
        ("serve.max_num_seqs", 30, 32),
        ("serve.max_num_seqs", 200, 256),
        ("serve.max_num_seqs", 0, 1),
        ("serve.max_num_seqs", 1e9, 256),
        ("serve.max_num_seqs", 48, 32),  # tie: the smaller choice
        ("serve.gpu_memory_utilization", 0.1, 0.5),
        ("serve.gpu_memory_utilization", 0.99, 0.95),
        ("serve.gpu_memory_utilization", 0.77, 0.75),
        ("kv.sliding_window", 1, True),
        ("kv.sliding_window", 0, False),
    ],
)
def test_repair_moves_numbers_to_the_nearest_valid_value(
    gene: str, value: Any, expected: Any
) -> None:
    repaired = SPACE.repair({gene: value}, rng(0))
    assert repaired[gene] == expected
    assert type(repaired[gene]) is type(expected)


def test_repair_clips_conditional_numbers() -> None:
    repaired = SPACE.repair(
        {
            "recovery.method": "lora",
            "recovery.steps": 99999,
            "kv.sliding_window": True,
            "kv.window": -5,
        },
        rng(0),
    )
    assert repaired["recovery.steps"] == 2000
    assert repaired["kv.window"] == 256


def test_repair_samples_genes_that_become_active() -> None:
    group_sizes = {
        SPACE.repair({"quant.method": "gptq"}, rng(seed))["quant.group_size"] for seed in range(60)
    }
    assert group_sizes == {32, 64, 128}


@pytest.mark.parametrize(
    "data",
    [
        # prune.method is fixed so that breaking one rule cannot run into the other one
        {"recovery.method": "qlora", "quant.method": "awq", "prune.method": "none"},
        {"recovery.method": "qlora", "quant.method": "none", "prune.method": "wanda"},
        {"recovery.method": "qlora", "quant.method": "nf4", "prune.method": "structured_heads"},
    ],
)
def test_repair_breaks_forbidden_combinations_by_changing_one_gene(data: dict[str, str]) -> None:
    outcomes = set()
    for seed in range(40):
        repaired = SPACE.repair(data, rng(seed))
        assert SPACE.violated_rule(dict(repaired)) is None
        assert is_canonical(SPACE, repaired)
        changed = {name for name, value in data.items() if repaired[name] != value}
        assert len(changed) == 1, (data, dict(repaired))
        outcomes.add(frozenset(changed))
    assert len(outcomes) > 1  # either gene of the rule may give way


def test_repair_rejects_non_mappings() -> None:
    with pytest.raises(RecipeError, match="mapping"):
        SPACE.repair(["quant.method"], rng(0))  # type: ignore[arg-type]


def test_unsatisfiable_space_raises_on_sample() -> None:
    stuck = SearchSpace.from_data(
        {
            "genes": {"x": {"type": "bool"}},
            "forbid": [{"when": {"x": [True]}}, {"when": {"x": [False]}}],
        }
    )
    with pytest.raises(SearchSpaceError, match="forbid"):
        stuck.sample(rng(0))


@pytest.mark.parametrize(("gene", "expected"), [("serve.max_num_seqs", 256), ("kv.window", 8192)])
def test_repair_of_huge_integers_clips_to_the_top(gene: str, expected: int) -> None:
    repaired = SPACE.repair({"kv.sliding_window": True, gene: 10**400}, rng(0))
    assert repaired[gene] == expected


def test_active_genes_follow_conditions() -> None:
    values = flatten(
        {"quant": {"method": "int8_w8a8"}, "prune": {"method": "wanda", "pattern": "2:4"}}
    )
    active = SPACE.active_genes(values)
    assert "quant.group_size" not in active
    assert "prune.pattern" in active
    assert "prune.sparsity" not in active
    assert "recovery.steps" not in active
