"""Canonical recipes: equal meanings give equal canonical JSON and hashes; errors name the gene."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from evo_compress.exceptions import EvoCompressError, RecipeError
from evo_compress.genomes import FloatGene, IntGene, Recipe, SearchSpace, flatten, nest
from evo_compress.testing import SEED_MAX

SPACE = SearchSpace.builtin()
ROOT = Path(__file__).resolve().parents[2]

seeds = st.integers(min_value=0, max_value=SEED_MAX)

# Regression check on the canonical JSON format (key order, separators, number formatting)
# and on the built-in space's defaults. Computed once with the code as written. The run
# store and the evaluation cache key records by this hash, so it may only change together
# with a store schema bump (and a migration of stored hashes), never silently.
BASELINE_HASH = "9b17cd659903257d437df6a9b4f97905947a76a946623c87db4061de8bda1e5a"


def sample(seed: int) -> Recipe:
    return SPACE.sample(np.random.default_rng(seed))


def inactive_genes(recipe: Recipe) -> list[str]:
    return [name for name in SPACE.genes if name not in recipe]


# ---------------------------------------------------------------------- canonical forms


@given(seed=seeds)
def test_recipe_round_trips_through_its_nested_dict(seed: int) -> None:
    recipe = sample(seed)
    again = SPACE.recipe(recipe.to_dict())
    assert again == recipe
    assert again.hash == recipe.hash
    assert again.canonical_json() == recipe.canonical_json()


@given(seed=seeds)
def test_nested_and_dotted_forms_hash_the_same(seed: int) -> None:
    recipe = sample(seed)
    dotted = recipe.to_dict(nested=False)
    assert all("." in key for key in dotted)
    assert SPACE.recipe(dotted).hash == SPACE.recipe(recipe.to_dict(nested=True)).hash
    assert SPACE.recipe(recipe).hash == recipe.hash


@given(seed=seeds, data=st.data())
def test_mixed_nested_and_dotted_keys_hash_the_same(seed: int, data: st.DataObject) -> None:
    recipe = sample(seed)
    mixed: dict[str, Any] = {}
    for name, value in recipe.items():
        if data.draw(st.booleans()):
            mixed[name] = value
        else:
            group, leaf = name.split(".", 1)
            mixed.setdefault(group, {})[leaf] = value
    assert SPACE.recipe(mixed).hash == recipe.hash


@given(seed=seeds, extra_seed=seeds)
def test_values_of_inactive_genes_do_not_change_the_hash(seed: int, extra_seed: int) -> None:
    recipe = sample(seed)
    rng = np.random.default_rng(extra_seed)
    padded = recipe.to_dict(nested=False)
    for name in inactive_genes(recipe):
        padded[name] = SPACE.genes[name].sample(rng)
    assert SPACE.recipe(padded).hash == recipe.hash
    assert SPACE.recipe(nest(padded)).hash == recipe.hash


@pytest.mark.parametrize(
    "extra",
    [
        {"prune": {"sparsity": 0.3}},  # prune.method defaults to none
        {"prune": {"method": "none", "sparsity": 0.3, "pattern": "2:4"}},
        {"quant": {"method": "int8_weight_only", "group_size": 64}},
        {"recovery": {"method": "lora", "temperature": 3.0}},
        {"kv": {"sliding_window": False, "window": 1024}},
    ],
)
def test_named_inactive_genes_are_dropped(extra: dict[str, Any]) -> None:
    recipe = SPACE.recipe(extra)
    without = {
        group: {k: v for k, v in genes.items() if f"{group}.{k}" in recipe}
        for group, genes in extra.items()
    }
    assert SPACE.recipe(without).hash == recipe.hash
    assert set(flatten(extra)) - set(recipe)  # something really was dropped


def _perturb(gene: FloatGene | IntGene, value: float, fraction: float) -> float:
    moved = value + fraction * gene.step
    return min(max(moved, gene.low), gene.high)


@given(seed=seeds, fraction=st.floats(min_value=-0.4, max_value=0.4))
def test_numbers_off_their_step_snap_to_the_same_hash(seed: int, fraction: float) -> None:
    recipe = sample(seed)
    noisy = recipe.to_dict(nested=False)
    for name, value in recipe.items():
        gene = SPACE.genes[name]
        if isinstance(gene, FloatGene):
            noisy[name] = _perturb(gene, float(value), fraction)
        elif isinstance(gene, IntGene):
            noisy[name] = float(value)  # 200.0 means 200
    snapped = SPACE.recipe(noisy)
    assert snapped.hash == recipe.hash
    for name, value in snapped.items():
        assert type(value) is type(recipe[name])


@pytest.mark.parametrize(
    ("given_value", "clean"),
    [
        (0.35000001, 0.35),
        (0.05 * 6 + 0.05, 0.35),  # 0.35000000000000003
        (0.1 + 0.2, 0.3),  # 0.30000000000000004
        (0.7 - 1e-12, 0.7),
        (np.float64(0.45), 0.45),
    ],
)
def test_float_noise_hashes_like_the_clean_value(given_value: float, clean: float) -> None:
    def make(sparsity: float) -> Recipe:
        return SPACE.recipe({"prune": {"method": "wanda", "sparsity": sparsity}})

    noisy = make(given_value)
    assert noisy.hash == make(clean).hash
    assert noisy["prune.sparsity"] == clean
    assert f'"prune.sparsity":{clean!r}' in noisy.canonical_json()


def test_numeric_types_are_normalised() -> None:
    as_ints = SPACE.recipe(
        {"recovery": {"method": "distill", "steps": 500, "temperature": 3}, "serve": {}}
    )
    as_floats = SPACE.recipe(
        {
            "recovery": {"method": "distill", "steps": 500.0, "temperature": 3.0},
            "serve": {"max_num_seqs": 32.0},
        }
    )
    assert as_ints.hash == as_floats.hash
    assert type(as_floats["recovery.steps"]) is int
    assert type(as_ints["recovery.temperature"]) is float
    assert type(as_floats["serve.max_num_seqs"]) is int
    numpy_typed = SPACE.recipe(
        {
            "recovery": {"method": "distill", "steps": np.int64(500), "temperature": 3},
            "kv": {"sliding_window": np.bool_(False)},
        }
    )
    assert numpy_typed.hash == as_ints.hash
    assert type(numpy_typed["kv.sliding_window"]) is bool


@pytest.mark.parametrize(
    ("partial", "full"),
    [
        ({}, None),
        ({"quant": {}}, None),
        ({"quant": {"method": "nf4"}}, {"quant": {"method": "nf4", "group_size": 128}}),
        ({"prune": {"method": "wanda"}}, {"prune.method": "wanda", "prune.sparsity": 0.5}),
        (
            {"recovery": {"method": "distill"}},
            {"recovery": {"method": "distill", "steps": 200, "temperature": 2.0}},
        ),
        ({"kv": {"sliding_window": True}}, {"kv.sliding_window": True, "kv.window": 4096}),
    ],
)
def test_missing_genes_take_defaults(partial: dict[str, Any], full: dict[str, Any] | None) -> None:
    expected = SPACE.baseline() if full is None else SPACE.recipe(full)
    assert SPACE.recipe(partial) == expected
    assert SPACE.recipe(partial).hash == expected.hash


def test_none_recipe_is_the_baseline() -> None:
    assert SPACE.recipe(None) == SPACE.recipe({}) == SPACE.baseline()
    baseline = SPACE.baseline()
    assert set(baseline) == {n for n, g in SPACE.genes.items() if not g.active_if.clauses}
    for name, value in baseline.items():
        assert value == SPACE.genes[name].default


@given(seed=seeds)
def test_dropping_genes_at_their_default_keeps_the_hash(seed: int) -> None:
    recipe = sample(seed)
    minimal = {k: v for k, v in recipe.items() if v != SPACE.genes[k].default}
    assert SPACE.recipe(minimal).hash == recipe.hash


@given(seed=seeds, data=st.data())
def test_key_order_does_not_matter(seed: int, data: st.DataObject) -> None:
    recipe = sample(seed)
    flat = recipe.to_dict(nested=False)
    order = data.draw(st.permutations(list(flat)))
    shuffled = {key: flat[key] for key in order}
    assert SPACE.recipe(shuffled).hash == recipe.hash
    nested = recipe.to_dict()
    groups = data.draw(st.permutations(list(nested)))
    reordered = {g: dict(reversed(list(nested[g].items()))) for g in groups}
    assert SPACE.recipe(reordered).hash == recipe.hash
    assert SPACE.recipe(shuffled).canonical_json() == recipe.canonical_json()


def test_baseline_hash_is_pinned() -> None:
    baseline = SPACE.baseline()
    assert baseline.hash == BASELINE_HASH
    assert baseline.short_hash == BASELINE_HASH[:12]
    assert hashlib.sha256(baseline.canonical_json().encode()).hexdigest() == baseline.hash
    assert list(json.loads(baseline.canonical_json())) == sorted(baseline)
    assert " " not in baseline.canonical_json()


def test_hash_is_stable_across_processes() -> None:
    seeds_ = [0, 1, 2, 3, 42, 1234, 99999]
    script = (
        "import json, numpy as np\n"
        "from evo_compress.genomes import SearchSpace\n"
        "s = SearchSpace.builtin()\n"
        f"print(json.dumps([s.sample(np.random.default_rng(i)).hash for i in {seeds_!r}]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    )
    assert json.loads(out.stdout) == [sample(i).hash for i in seeds_]


def test_equal_recipes_are_equal_python_objects() -> None:
    a = SPACE.recipe({"quant": {"method": "awq"}})
    b = SPACE.recipe({"quant.group_size": 128, "quant.method": "awq"})
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b, SPACE.baseline()}) == 2
    assert a != SPACE.baseline()
    assert (a == dict(a)) is False  # a Recipe only equals a Recipe


# ---------------------------------------------------------------------- JSON / YAML


@given(seed=seeds)
def test_json_round_trip(seed: int) -> None:
    recipe = sample(seed)
    for nested in (True, False):
        loaded = json.loads(json.dumps(recipe.to_dict(nested=nested)))
        assert SPACE.recipe(loaded) == recipe
    assert SPACE.recipe(json.loads(recipe.canonical_json())) == recipe


@given(seed=seeds)
def test_yaml_round_trip(seed: int) -> None:
    recipe = sample(seed)
    for nested in (True, False):
        loaded = yaml.safe_load(yaml.safe_dump(recipe.to_dict(nested=nested)))
        assert SPACE.recipe(loaded) == recipe


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_pattern_string_survives_yaml(pattern: str) -> None:
    recipe = SPACE.recipe({"prune": {"method": "wanda", "pattern": pattern}})
    assert "prune.sparsity" not in recipe  # N:M fixes the sparsity
    text = yaml.safe_dump(recipe.to_dict())
    loaded = yaml.safe_load(text)
    assert loaded["prune"]["pattern"] == pattern
    assert SPACE.recipe(loaded) == recipe


def test_recipe_is_read_only_and_to_dict_is_a_copy() -> None:
    recipe = SPACE.recipe({"quant": {"method": "nf4"}})
    before = recipe.hash
    exported = recipe.to_dict()
    exported["quant"]["method"] = "awq"
    flat = recipe.to_dict(nested=False)
    flat["quant.method"] = "awq"
    assert recipe["quant.method"] == "nf4"
    assert recipe.hash == before
    with pytest.raises(TypeError):
        recipe["quant.method"] = "awq"  # type: ignore[index]


@given(seed=seeds)
def test_flatten_and_nest_are_inverse(seed: int) -> None:
    flat = sample(seed).to_dict(nested=False)
    assert flatten(nest(flat)) == flat


# ---------------------------------------------------------------------- validation errors


def _error(data: Any) -> str:
    with pytest.raises(RecipeError) as info:
        SPACE.recipe(data)
    assert isinstance(info.value, EvoCompressError)
    return str(info.value)


def test_unknown_gene_suggests_the_closest_name() -> None:
    message = _error({"quant": {"metod": "nf4"}})
    assert "`quant.metod`" in message
    assert "did you mean `quant.method`" in message
    assert "llm-compression" in message


def test_unknown_dotted_gene_suggests_the_closest_name() -> None:
    message = _error({"prune.sparsty": 0.5, "prune.method": "wanda"})
    assert "`prune.sparsty`" in message
    assert "did you mean `prune.sparsity`" in message


def test_unknown_gene_far_from_any_name_has_no_suggestion() -> None:
    message = _error({"zzz": 1})
    assert "`zzz`" in message
    assert "did you mean" not in message


def test_unknown_gene_is_rejected_even_next_to_valid_genes() -> None:
    message = _error({"quant": {"method": "nf4", "bits": 4}})
    assert "`quant.bits`" in message


@pytest.mark.parametrize(
    ("data", "gene", "value"),
    [
        ({"prune": {"method": "wanda", "sparsity": 0.9}}, "prune.sparsity", "0.9"),
        ({"prune": {"method": "wanda", "sparsity": 0.0}}, "prune.sparsity", "0.0"),
        ({"serve": {"gpu_memory_utilization": 1.2}}, "serve.gpu_memory_utilization", "1.2"),
        ({"recovery": {"method": "lora", "steps": 5000}}, "recovery.steps", "5000"),
        ({"recovery": {"method": "lora", "steps": 0}}, "recovery.steps", "0"),
        ({"kv": {"sliding_window": True, "window": 100}}, "kv.window", "100"),
        (
            {"serve": {"gpu_memory_utilization": float("nan")}},
            "serve.gpu_memory_utilization",
            "nan",
        ),
        (
            {"serve": {"gpu_memory_utilization": float("inf")}},
            "serve.gpu_memory_utilization",
            "inf",
        ),
    ],
)
def test_out_of_range_numbers_name_the_gene_and_value(data: Any, gene: str, value: str) -> None:
    message = _error(data)
    assert f"`{gene}`" in message
    assert value in message
    low, high = SPACE.genes[gene].low, SPACE.genes[gene].high  # type: ignore[attr-defined]
    assert f"[{low}, {high}]" in message


@pytest.mark.parametrize(
    ("data", "gene", "value"),
    [
        ({"recovery": {"method": "lora", "steps": "200"}}, "recovery.steps", "'200'"),
        ({"recovery": {"method": "lora", "steps": 200.5}}, "recovery.steps", "200.5"),
        ({"recovery": {"method": "lora", "steps": True}}, "recovery.steps", "True"),
        ({"prune": {"method": "wanda", "sparsity": "0.5"}}, "prune.sparsity", "'0.5'"),
        ({"prune": {"method": "wanda", "sparsity": True}}, "prune.sparsity", "True"),
        ({"serve": {"max_num_seqs": True}}, "serve.max_num_seqs", "True"),
        ({"serve": {"max_num_seqs": "32"}}, "serve.max_num_seqs", "'32'"),
        ({"quant": {"method": "nf4", "group_size": False}}, "quant.group_size", "False"),
        ({"kv": {"sliding_window": 1}}, "kv.sliding_window", "1"),
        ({"kv": {"sliding_window": 0.0}}, "kv.sliding_window", "0.0"),
        ({"kv": {"sliding_window": "yes"}}, "kv.sliding_window", "'yes'"),
        ({"quant": {"method": None}}, "quant.method", "None"),
        ({"quant": {"method": ["nf4"]}}, "quant.method", "['nf4']"),
    ],
)
def test_wrong_types_name_the_gene_and_value(data: Any, gene: str, value: str) -> None:
    message = _error(data)
    assert f"`{gene}`" in message
    assert f"got {value}" in message


@pytest.mark.parametrize(
    ("data", "gene", "value"),
    [
        ({"quant": {"method": "int4"}}, "quant.method", "'int4'"),
        ({"quant": {"method": "NF4"}}, "quant.method", "'NF4'"),
        ({"quant": {"method": "nf4", "group_size": 256}}, "quant.group_size", "256"),
        ({"serve": {"max_num_seqs": 3}}, "serve.max_num_seqs", "3"),
        ({"prune": {"method": "wanda", "pattern": "1:4"}}, "prune.pattern", "'1:4'"),
    ],
)
def test_invalid_choices_name_the_gene_value_and_choices(data: Any, gene: str, value: str) -> None:
    message = _error(data)
    assert f"`{gene}`" in message
    assert f"got {value}" in message
    assert str(list(SPACE.genes[gene].choices)) in message  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "data",
    [
        {"recovery": {"method": "qlora"}},
        {"recovery": {"method": "qlora"}, "quant": {"method": "awq"}},
        {"recovery.method": "qlora", "quant.method": "int8_w8a8"},
    ],
)
def test_qlora_without_nf4_is_forbidden_with_the_reason(data: dict[str, Any]) -> None:
    message = _error(data)
    assert "forbidden" in message
    assert "recovery.method" in message
    assert "quant.method" in message
    assert "nf4" in message
    assert "QLoRA" in message  # the rule's reason is shown


def test_head_pruning_with_qlora_is_forbidden_with_the_reason() -> None:
    message = _error(
        {
            "quant": {"method": "nf4"},
            "prune": {"method": "structured_heads"},
            "recovery": {"method": "qlora"},
        }
    )
    assert "prune.method" in message
    assert "structured_heads" in message
    assert "attention shapes" in message


def test_allowed_neighbours_of_forbidden_combinations_pass() -> None:
    assert SPACE.recipe({"recovery": {"method": "qlora"}, "quant": {"method": "nf4"}})
    assert SPACE.recipe({"recovery": {"method": "lora"}, "quant": {"method": "awq"}})
    assert SPACE.recipe({"prune": {"method": "structured_heads"}, "recovery": {"method": "lora"}})


@pytest.mark.parametrize(("text", "quoted"), [("2:4", "2:4"), ("4:8", "4:8")])
def test_unquoted_yaml_nm_pattern_gets_the_quoting_hint(text: str, quoted: str) -> None:
    data = yaml.safe_load(f"prune: {{method: wanda, pattern: {text}}}")
    assert not isinstance(data["prune"]["pattern"], str)  # YAML 1.1 base-60 integer
    message = _error(data)
    assert "`prune.pattern`" in message
    assert f"got {data['prune']['pattern']}" in message
    assert f"'{quoted}'" in message
    assert "quotes" in message


@pytest.mark.parametrize("data", ["quant.method=nf4", ["quant.method"], [1, 2], 5, 3.5, True])
def test_non_mapping_recipe_raises(data: Any) -> None:
    message = _error(data)
    assert "mapping" in message


@pytest.mark.parametrize("data", [[], "", 0])
def test_empty_non_mapping_recipe_raises(data: Any) -> None:
    _error(data)


def test_gene_given_twice_raises() -> None:
    message = _error({"quant": {"method": "nf4"}, "quant.method": "awq"})
    assert "`quant.method`" in message
    assert "twice" in message


def test_gene_given_twice_raises_in_either_key_order() -> None:
    message = _error({"quant.method": "awq", "quant": {"method": "nf4"}})
    assert "twice" in message


def test_huge_integer_gives_a_recipe_error() -> None:
    message = _error({"recovery": {"method": "lora", "steps": 10**400}})
    assert "`recovery.steps`" in message


def test_strict_recipe_does_not_check_inactive_genes() -> None:
    # Inactive genes are dropped before validation: junk there is not an error.
    recipe = SPACE.recipe({"prune": {"method": "none", "sparsity": "junk"}})
    assert recipe == SPACE.baseline()


def test_summary_lists_every_gene_grouped() -> None:
    recipe = SPACE.recipe({"quant": {"method": "awq", "group_size": 64}})
    text = recipe.summary()
    assert "quant(group_size=64,method=awq)" in text
    for name in recipe:
        assert name.split(".", 1)[1] in text
