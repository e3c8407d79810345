"""Variation operators: classic typed crossover and mutation (LLM operators plug in here too)."""

from evo_compress.operators._base import (
    CROSSOVERS,
    MUTATIONS,
    Child,
    Crossover,
    Mutation,
    make_crossover,
    make_mutation,
)
from evo_compress.operators.classic import GeneMutation, UniformCrossover

__all__ = [
    "CROSSOVERS",
    "MUTATIONS",
    "Child",
    "Crossover",
    "GeneMutation",
    "Mutation",
    "UniformCrossover",
    "make_crossover",
    "make_mutation",
]
