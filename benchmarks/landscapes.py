"""Benchmark landscapes beside the built-in ``synthetic`` one, registered as evaluators so the
real engine runs them from a config: ``dtlz2``, the DTLZ2 problem (Deb, Thiele, Laumanns and
Zitzler, 2002) with five objectives, read off a recipe's position in the [0, 1]^n box.

Importing this module registers them. Their evaluations run in this process (the local pool
runs an evaluator without a process of its own in a thread), so nothing else needs to import it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from recipe_encoding import encode

from evo_compress.config import format_validation_error
from evo_compress.exceptions import ConfigError
from evo_compress.fitness import EVALUATORS, EvaluationContext, EvaluationResult, Evaluator
from evo_compress.fitness._base import Placement
from evo_compress.genomes import Recipe, SearchSpace
from evo_compress.objectives import OBJECTIVE_NAMES

_SPACE = "llm-compression"
_NOTE = "DTLZ2 benchmark landscape, not a measurement"
# Each objective is an increasing affine map of one DTLZ2 objective (accuracy decreasing, it
# is maximised), so the Pareto structure in minimisation space is exactly DTLZ2's: the front is
# the positive part of the sphere of radius 1 + g_min. Objective i reads f_{M-i}: the first
# position gene alone moves accuracy, the way compression strength does.
_OFFSET_SLOPE = {
    "accuracy": (0.80, -0.10),  # fraction
    "latency": (10.0, 10.0),  # ms / token
    "memory": (8000.0, 8000.0),  # MiB
    "energy": (100.0, 100.0),  # J / 1k tokens
    "co2": (0.02, 0.02),  # g / 1k tokens
}
# Always-active genes with many levels: compression strength first, then the serving knobs.
# The other eleven genes are the distance variables.
DEFAULT_POSITION_GENES = (
    "quant.method",
    "prune.method",
    "serve.max_num_seqs",
    "serve.gpu_memory_utilization",
)
# The constraints the quality benchmark puts on this landscape (engine `constraints` keys):
# accuracy at most 0.05 below the baseline recipe's and a latency cap of 20 ms. About 8% of
# uniformly drawn recipes meet both; they cut the front.
DTLZ2_CONSTRAINTS = {"max_accuracy_drop": 0.05, "max_latency_ms": 20.0}


class DTLZ2Settings(BaseModel):
    """``evaluator.settings`` of the ``dtlz2`` landscape."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    position_genes: tuple[str, ...] = Field(
        DEFAULT_POSITION_GENES,
        description="The M - 1 = 4 position variables, in order; every other gene is a "
        "distance variable",
    )

    @field_validator("position_genes")
    @classmethod
    def _four(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(value) != len(OBJECTIVE_NAMES) - 1 or len(set(value)) != len(value):
            raise ValueError(f"must name {len(OBJECTIVE_NAMES) - 1} different genes")
        return value


def dtlz2(x: Collection[float], n_position: int) -> list[float]:
    """DTLZ2 objectives (minimised) of ``x``: the first ``n_position`` entries place the point
    on the sphere, the rest set its radius 1 + g, g = sum (x_i - 0.5)^2."""
    xs = list(x)
    theta = [xi * math.pi / 2.0 for xi in xs[:n_position]]
    radius = 1.0 + sum((xi - 0.5) ** 2 for xi in xs[n_position:])
    f = []
    for m in range(n_position + 1):
        value = radius
        for t in theta[: n_position - m]:
            value *= math.cos(t)
        if m > 0:
            value *= math.sin(theta[n_position - m])
        f.append(value)
    return f


class DTLZ2Evaluator(Evaluator):
    """Deterministic: a recipe's objectives depend on its genes alone (inactive genes at their
    default), through ``recipe_encoding.encode``, the inverse of the box decoding pymoo uses."""

    name: ClassVar[str] = "dtlz2"

    def __init__(self, settings: Mapping[str, Any], context: EvaluationContext) -> None:
        super().__init__(settings, context)
        self._space = SearchSpace.builtin(_SPACE)
        try:
            self.config = DTLZ2Settings.model_validate(dict(settings))
        except ValidationError as exc:
            raise ConfigError(
                format_validation_error(exc, "dtlz2 evaluator", "evaluator.settings.")
            ) from None
        for name in self.config.position_genes:
            if name not in self._space.genes:
                raise ConfigError(
                    f"`evaluator.settings.position_genes`: no gene `{name}` in `{_SPACE}`"
                )
        names = list(self._space.genes)
        first = [names.index(n) for n in self.config.position_genes]
        self._order = first + [i for i in range(len(names)) if i not in first]

    def capabilities(self) -> Mapping[str, Collection[Any] | None]:
        return {name: None for name in self._space.genes}

    def objectives_of(self, recipe: Recipe) -> dict[str, float]:
        x = encode(recipe, self._space)
        f = dtlz2([x[i] for i in self._order], len(self.config.position_genes))
        return {
            name: float(offset + slope * f[len(f) - 1 - i])
            for i, (name, (offset, slope)) in enumerate(_OFFSET_SLOPE.items())
        }

    def _evaluate(self, recipe: Recipe, placement: Placement) -> EvaluationResult:
        metadata = {"evaluator": self.name, "synthetic": True, "note": _NOTE}
        return EvaluationResult.success(self.objectives_of(recipe), metadata)


def register() -> None:
    """Register the landscapes (again is a no-op: a test may import this module twice)."""
    if DTLZ2Evaluator.name not in EVALUATORS:
        EVALUATORS.register(DTLZ2Evaluator.name, DTLZ2Evaluator)


register()
