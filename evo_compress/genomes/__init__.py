"""Typed recipe genomes: gene types, search spaces, canonical recipes and seed portfolios."""

from evo_compress.genomes.genes import (
    BoolGene,
    ChoiceGene,
    Condition,
    FloatGene,
    Gene,
    IntGene,
    RangeGene,
    Value,
    gene_from_data,
)
from evo_compress.genomes.portfolios import builtin_portfolios, load_portfolio
from evo_compress.genomes.recipe import Recipe, flatten, nest
from evo_compress.genomes.render import render_recipe, render_recipe_yaml
from evo_compress.genomes.space import ForbidRule, SearchSpace, builtin_space_names

__all__ = [
    "BoolGene",
    "ChoiceGene",
    "Condition",
    "FloatGene",
    "ForbidRule",
    "Gene",
    "IntGene",
    "RangeGene",
    "Recipe",
    "SearchSpace",
    "Value",
    "builtin_portfolios",
    "builtin_space_names",
    "flatten",
    "gene_from_data",
    "load_portfolio",
    "nest",
    "render_recipe",
    "render_recipe_yaml",
]
