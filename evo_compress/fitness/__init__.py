"""Fitness: apply a recipe, serve it, measure five objectives, and cache the results."""

from evo_compress.fitness._base import (
    EVALUATORS,
    EvaluationContext,
    EvaluationResult,
    Evaluator,
    Placement,
    Status,
    make_evaluator,
)
from evo_compress.fitness.cache import FitnessCache

__all__ = [
    "EVALUATORS",
    "EvaluationContext",
    "EvaluationResult",
    "Evaluator",
    "FitnessCache",
    "Placement",
    "Status",
    "make_evaluator",
]
