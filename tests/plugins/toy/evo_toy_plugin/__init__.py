"""A third-party evo-compress plugin, as a user would write one: an evaluator and a mutation
declared as entry points in ``pyproject.toml``, with no edit to evo-compress."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from evo_compress.fitness import EvaluationResult, Evaluator, Placement
from evo_compress.genomes import Recipe
from evo_compress.operators import Mutation

BITS = {"none": 16, "int8_weight_only": 8, "rtn": 4}
METHODS = tuple(BITS)


class ToyEvaluator(Evaluator):
    """A closed-form toy back end from a plugin: 16-, 8- and 4-bit weights, nothing else.

    Settings: ``params_b`` (model size in billions, default 1.0)."""

    name = "toy"

    def __init__(self, settings: Mapping[str, Any], context: Any) -> None:
        super().__init__(settings, context)
        self.params_b = float(self.settings.get("params_b", 1.0))

    def capabilities(self) -> Mapping[str, Collection[Any] | None]:
        return {"quant.method": METHODS, "quant.group_size": None, "serve.max_num_seqs": None}

    def _evaluate(self, recipe: Recipe, placement: Placement) -> EvaluationResult:
        bits = BITS[str(recipe["quant.method"])]
        group = int(recipe.get("quant.group_size") or 128)  # type: ignore[call-overload]
        seqs = int(recipe["serve.max_num_seqs"])  # type: ignore[call-overload]
        memory = self.params_b * 1e9 * bits / 8 / 2**20 * (1 + 4 / group)
        objectives = {
            "accuracy": 0.8 - (16 - bits) * 0.004 - (4 / group if bits == 4 else 0.0),
            "latency": 5.0 + bits / 2 + 8.0 / seqs,
            "memory": memory + 64.0 * seqs,
            "energy": 20.0 + bits,
            "co2": (20.0 + bits) * 0.4,
        }
        return EvaluationResult.success(objectives, {"evaluator": self.name, "toy": True})


class FlipMutation(Mutation):
    """Sets one choice gene of the recipe to another of its choices (a plugin mutation)."""

    name = "toy-flip"

    def _do(self, values: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        names = [n for n in sorted(values) if hasattr(self.space.genes[n], "choices")]
        gene = self.space.genes[names[int(rng.integers(len(names)))]]
        others = [c for c in gene.choices if c != values[gene.name]]  # type: ignore[attr-defined]
        if others:
            values[gene.name] = others[int(rng.integers(len(others)))]
        return values
