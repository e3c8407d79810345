"""Seed portfolios: the built-in ones are valid and distinct; user files load or fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from evo_compress.exceptions import RecipeError
from evo_compress.genomes import SearchSpace, builtin_portfolios, flatten, load_portfolio

SPACE = SearchSpace.builtin()
BUILTIN = ["baseline", "conservative", "aggressive"]


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_portfolio_loads_valid_distinct_recipes(name: str) -> None:
    recipes = load_portfolio(name, SPACE)
    raw = builtin_portfolios()[name]
    assert len(recipes) == len(raw)  # nothing was a duplicate that load_portfolio dropped
    assert len({r.hash for r in recipes}) == len(recipes)
    for recipe in recipes:
        assert SPACE.recipe(recipe.to_dict()) == recipe
        assert SPACE.violated_rule(dict(recipe)) is None


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_portfolio_entries_have_no_dead_values(name: str) -> None:
    # Every value written in the shipped portfolio must reach the recipe: a gene that its
    # other genes switch off would be dropped silently and mislead the reader.
    for entry, recipe in zip(builtin_portfolios()[name], load_portfolio(name, SPACE), strict=True):
        for gene, value in flatten(entry or {}).items():
            assert gene in recipe, (name, gene)
            assert recipe[gene] == value, (name, gene)


def test_baseline_portfolio_is_the_baseline() -> None:
    assert load_portfolio("baseline", SPACE) == [SPACE.baseline()]


def test_portfolios_compress() -> None:
    for name in ("conservative", "aggressive"):
        for recipe in load_portfolio(name, SPACE):
            assert recipe != SPACE.baseline()
            assert recipe["quant.method"] != "none" or recipe["prune.method"] != "none"


def test_builtin_portfolios_are_listed() -> None:
    assert set(BUILTIN) <= set(builtin_portfolios())


def test_recipes_file_as_a_list(tmp_path: Path) -> None:
    path = tmp_path / "seeds.yaml"
    path.write_text(
        "- {quant: {method: awq}}\n"
        "- quant.method: nf4\n"
        "  recovery: {method: qlora, lora_rank: 8}\n"
        "- {prune: {method: wanda, pattern: '2:4'}}\n"
        "-\n"
    )
    recipes = load_portfolio(str(path), SPACE)
    assert recipes == [
        SPACE.recipe({"quant.method": "awq", "quant.group_size": 128}),
        SPACE.recipe({"quant.method": "nf4", "recovery.method": "qlora", "recovery.lora_rank": 8}),
        SPACE.recipe({"prune.method": "wanda", "prune.pattern": "2:4"}),
        SPACE.baseline(),  # an empty entry is the baseline
    ]


def test_recipes_file_as_a_mapping(tmp_path: Path) -> None:
    recipes = [SPACE.recipe({"quant": {"method": m}}) for m in ("fp8", "gptq", "rtn")]
    path = tmp_path / "seeds.yml"
    path.write_text(yaml.safe_dump({"recipes": [r.to_dict() for r in recipes]}))
    assert load_portfolio(str(path), SPACE) == recipes


def test_recipes_file_drops_duplicates_first_wins(tmp_path: Path) -> None:
    path = tmp_path / "dups.yaml"
    path.write_text(
        yaml.safe_dump(
            [
                {"quant": {"method": "nf4"}},
                {},
                {"quant": {"method": "nf4", "group_size": 128}},
                {"quant.method": "none", "prune": {"method": "none", "sparsity": 0.3}},
                {"quant": {"method": "nf4", "group_size": 64}},
            ]
        )
    )
    loaded = load_portfolio(str(path), SPACE)
    assert [r.get("quant.group_size") for r in loaded] == [128, None, 64]
    assert loaded[1] == SPACE.baseline()


@pytest.mark.parametrize(
    ("text", "index", "fragment"),
    [
        ("- {}\n- {quant: {method: int4}}\n", 1, "`quant.method`"),
        ("- {quant: {metod: nf4}}\n", 0, "did you mean `quant.method`"),
        ("recipes:\n  - {}\n  - {}\n  - {recovery: {method: qlora}}\n", 2, "forbidden"),
        ("- {prune: {method: wanda, pattern: 2:4}}\n", 0, "quotes"),
        ("- {}\n- [quant.method, nf4]\n", 1, "mapping"),
    ],
)
def test_bad_entry_names_the_file_and_index(
    tmp_path: Path, text: str, index: int, fragment: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_portfolio(str(path), SPACE)
    message = str(info.value)
    assert str(path) in message
    assert f"recipe {index}" in message
    assert fragment in message


@pytest.mark.parametrize("text", ["", "[]\n", "recipes: []\n", "{a: 1}\n", "just text\n"])
def test_file_without_recipes_is_rejected(tmp_path: Path, text: str) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_portfolio(str(path), SPACE)
    assert str(path) in str(info.value)
    assert "non-empty list" in str(info.value)


def test_invalid_yaml_file_is_a_recipe_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("- {quant: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_portfolio(str(path), SPACE)


@pytest.mark.parametrize(
    ("ref", "suggestion"), [("agressive", "aggressive"), ("conservativ", "conservative")]
)
def test_unknown_portfolio_suggests_the_closest(ref: str, suggestion: str) -> None:
    with pytest.raises(RecipeError) as info:
        load_portfolio(ref, SPACE)
    message = str(info.value)
    assert f"did you mean `{suggestion}`" in message
    for name in BUILTIN:
        assert name in message


def test_missing_file_has_no_bogus_suggestion(tmp_path: Path) -> None:
    ref = str(tmp_path / "nowhere" / "seeds.yaml")
    with pytest.raises(RecipeError) as info:
        load_portfolio(ref, SPACE)
    assert "did you mean" not in str(info.value)
    assert ref in str(info.value)


def test_portfolio_is_validated_against_the_given_space() -> None:
    narrow = SPACE.with_overrides(genes={"quant.method": {"choices": ["none", "awq", "gptq"]}})
    with pytest.raises(RecipeError) as info:
        load_portfolio("conservative", narrow)
    assert "portfolio `conservative`, recipe 0" in str(info.value)
    assert "`quant.method`" in str(info.value)
