"""evo-compress: evolutionary search for Pareto-optimal LLM compression recipes."""

from evo_compress.exceptions import (
    ConfigError,
    EvaluationError,
    EvoCompressError,
    OperatorError,
    RecipeError,
    RunStoreError,
    SearchSpaceError,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "EvaluationError",
    "EvoCompressError",
    "OperatorError",
    "RecipeError",
    "RunStoreError",
    "SearchSpaceError",
    "__version__",
]
