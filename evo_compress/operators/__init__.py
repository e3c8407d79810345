"""Variation operators: classic typed crossover and mutation, the rule-based expert mutation,
the LLM operators (``llm.py``, imported when the registry names them) and adaptive operator
selection."""

from evo_compress.operators._base import (
    CROSSOVERS,
    MUTATIONS,
    Crossover,
    Measured,
    Mutation,
    Operator,
    Pending,
    Proposal,
    VariationContext,
    make_crossover,
    make_mutation,
)
from evo_compress.operators.adaptive import AdaptiveSelector
from evo_compress.operators.classic import GeneMutation, UniformCrossover
from evo_compress.operators.expert import ExpertMutation

__all__ = [
    "CROSSOVERS",
    "MUTATIONS",
    "AdaptiveSelector",
    "Crossover",
    "ExpertMutation",
    "GeneMutation",
    "Measured",
    "Mutation",
    "Operator",
    "Pending",
    "Proposal",
    "UniformCrossover",
    "VariationContext",
    "make_crossover",
    "make_mutation",
]
