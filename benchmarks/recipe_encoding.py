"""One real in [0, 1] per gene of a search space, for methods that search a box (pymoo, the
DTLZ2 landscape): ``decode`` turns a point into a raw assignment for ``space.repair``,
``encode`` puts a recipe's genes (inactive ones at their default) back in the box."""

from __future__ import annotations

from typing import Any

import numpy as np

from evo_compress.genomes import Recipe, SearchSpace
from evo_compress.genomes.genes import BoolGene, ChoiceGene, FloatGene, Gene, IntGene


def decode(x: np.ndarray, space: SearchSpace) -> dict[str, Any]:
    """One real in [0, 1] per gene (space.genes order) -> a raw assignment for ``repair``."""
    values: dict[str, Any] = {}
    for xi, (name, gene) in zip(x, space.genes.items(), strict=True):
        u = float(xi)
        if isinstance(gene, ChoiceGene):
            k = len(gene.choices)
            values[name] = gene.choices[min(int(u * k), k - 1)]
        elif isinstance(gene, (IntGene, FloatGene)):
            value = gene.low + round(u * gene.n_steps) * gene.step
            values[name] = int(value) if isinstance(gene, IntGene) else float(value)
        elif isinstance(gene, BoolGene):
            values[name] = u >= 0.5
        else:
            raise TypeError(f"gene `{name}` has an unsupported type {type(gene).__name__}")
    return values


def position(gene: Gene, value: Any) -> float:
    """Where ``decode`` reads ``value`` back: the middle of a choice's cell, a range's grid
    point, 0.25 / 0.75 for false / true."""
    if isinstance(gene, ChoiceGene):
        return (gene.choices.index(gene.check(value)) + 0.5) / len(gene.choices)
    if isinstance(gene, (IntGene, FloatGene)):
        if gene.n_steps == 0:
            return 0.5
        return round((float(gene.check(value)) - gene.low) / gene.step) / gene.n_steps
    if isinstance(gene, BoolGene):
        return 0.75 if gene.check(value) else 0.25
    raise TypeError(f"gene `{gene.name}` has an unsupported type {type(gene).__name__}")


def encode(recipe: Recipe, space: SearchSpace) -> np.ndarray:
    """The point of ``recipe`` in [0, 1]^n (space.genes order); an inactive gene sits at its
    default, the value the back ends read for it."""
    return np.array(
        [position(gene, recipe.get(name, gene.default)) for name, gene in space.genes.items()]
    )
