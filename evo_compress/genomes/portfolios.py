"""Seed portfolios for the first generation: named built-ins or a user's YAML file of recipes."""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from evo_compress.exceptions import RecipeError
from evo_compress.genomes.recipe import Recipe
from evo_compress.genomes.space import SearchSpace
from evo_compress.yamlio import is_file, read_yaml


def builtin_portfolios() -> dict[str, list[dict[str, Any]]]:
    text = (resources.files("evo_compress.genomes") / "builtin" / "portfolios.yaml").read_text()
    data: dict[str, list[dict[str, Any]]] = yaml.safe_load(text)
    return data


def load_portfolio(ref: str, space: SearchSpace) -> list[Recipe]:
    """Recipes of the named portfolio (``baseline``, ``conservative``, ``aggressive``) or of a
    YAML file holding a list of recipes (or ``{recipes: [...]}``), validated against ``space``.

    Duplicates are dropped (first one wins), so a portfolio never evaluates a recipe twice.
    """
    portfolios = builtin_portfolios()
    if ref in portfolios:
        entries: Any = portfolios[ref]
        origin = f"portfolio `{ref}`"
    else:
        path = Path(ref)
        if not is_file(path):
            close = difflib.get_close_matches(ref, list(portfolios), n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise RecipeError(
                f"`{ref}` is neither a built-in portfolio{hint} "
                f"({', '.join(portfolios)}) nor a recipes file"
            )
        entries = read_yaml(path, "recipes file", RecipeError)
        if isinstance(entries, dict) and set(entries) == {"recipes"}:
            entries = entries["recipes"]
        origin = str(path)
    if not isinstance(entries, list) or not entries:
        raise RecipeError(f"{origin} must be a non-empty list of recipes")
    recipes: list[Recipe] = []
    for i, entry in enumerate(entries):
        try:
            recipe = space.recipe(entry or {})
        except RecipeError as exc:
            raise RecipeError(f"{origin}, recipe {i}: {exc}") from None
        if recipe not in recipes:
            recipes.append(recipe)
    return recipes
