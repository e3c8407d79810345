"""The one human-facing rendering of a recipe (front table, report, export, CLI messages)."""

from __future__ import annotations

import numpy as np
import yaml

from evo_compress.genomes import SearchSpace, render_recipe, render_recipe_yaml

SPACE = SearchSpace.builtin()


def test_one_line_in_application_order_without_unused_groups() -> None:
    recipe = SPACE.recipe(
        {
            "kv": {"dtype": "fp8"},
            "prune": {"method": "wanda", "sparsity": 0.5},
            "quant": {"method": "awq", "group_size": 128},
        }
    )
    line = render_recipe(recipe)
    assert line.index("quant=awq(group_size=128)") < line.index("prune=wanda(")
    assert line.index("prune=wanda(") < line.index("kv(")
    assert "sparsity=0.5" in line and "dtype=fp8" in line
    assert "recovery" not in line  # method none, nothing else set: left out
    assert "serve(" in line and "serve(" not in render_recipe(recipe, omit=("serve",))


def test_flat_nested_and_recipe_forms_render_the_same() -> None:
    recipe = SPACE.sample(np.random.default_rng(3))
    assert render_recipe(recipe) == render_recipe(recipe.to_dict(nested=True))
    assert render_recipe(recipe) == render_recipe(recipe.to_dict(nested=False))


def test_nothing_left_is_uncompressed() -> None:
    assert render_recipe({"quant": {"method": "none"}}) == "uncompressed"
    assert render_recipe(SPACE.baseline(), omit=("kv", "serve")) == "uncompressed"


def test_the_yaml_block_reads_back_as_the_same_recipe() -> None:
    for seed in range(5):
        recipe = SPACE.sample(np.random.default_rng(seed))
        assert SPACE.recipe(yaml.safe_load(render_recipe_yaml(recipe))) == recipe


def test_with_a_baseline_only_the_changes_are_shown() -> None:
    baseline = SPACE.baseline()
    recipe = SPACE.recipe({"quant": {"method": "awq", "group_size": 64}, "kv": {"dtype": "fp8"}})
    assert render_recipe(recipe, baseline=baseline) == "quant=awq(group_size=64) kv(dtype=fp8)"
    assert render_recipe(baseline, baseline=baseline) == "uncompressed"
    assert "sliding_window" in render_recipe(recipe)  # without one, every gene
