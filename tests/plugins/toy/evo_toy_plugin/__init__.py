"""A third-party evo-compress plugin, as a user would write one: an evaluator, a mutation and
an LLM provider declared as entry points in ``pyproject.toml``, with no edit to evo-compress."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import numpy as np

from evo_compress.agents import LLMClient, ProviderError, ProviderSettings, Usage, settings_error
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


_PARENT = re.compile(r"## Parents?\n(?:### Parent 1\n)?```\n(.*?)\n```", re.DOTALL)


def _choice_genes(schema: Mapping[str, Any], path: tuple[str, ...] = ()) -> Iterator[Any]:
    """(path, non-null choices) of every enum gene of a nested recipe schema."""
    for key, sub in sorted(schema.get("properties", {}).items()):
        if "properties" in sub:
            yield from _choice_genes(sub, (*path, key))
        elif "enum" in sub:
            yield (*path, key), [c for c in sub["enum"] if c is not None]


class ToyLLMClient(LLMClient):
    """An offline LLM provider from a plugin: echoes the first parent with one choice changed.

    Deterministic: the prompt's hash picks the gene and its new value, so a replayed prompt
    gets the same reply and a re-ask (a longer prompt) another one. Its key is read from
    ``EVO_TOY_LLM_KEY``; it takes no ``base_url``."""

    provider = "toy-llm"
    default_key_env = "EVO_TOY_LLM_KEY"

    @classmethod
    def check_settings(cls, settings: ProviderSettings) -> None:
        super().check_settings(settings)
        if settings.base_url is not None:
            raise settings_error(
                "base_url", "is not used by provider `toy-llm` (it answers offline)", None
            )

    def _classify(self, exc: Exception) -> ProviderError | None:
        return None  # no SDK: whatever goes wrong is a bug, not a transient failure

    def _make_sdk_client(self) -> Any:
        return None

    def _request(
        self, system: str, user: str, schema: dict[str, Any], schema_name: str
    ) -> tuple[str, Usage, str]:
        digest = int.from_bytes(hashlib.sha256(user.encode()).digest()[:8], "little")
        if "recipes" in schema.get("properties", {}):  # a seeding request
            recipe = self._recipe(schema["properties"]["recipes"]["items"], None, digest)
            reply: dict[str, Any] = {"recipes": [recipe], "rationale": "toy"}
        else:
            found = _PARENT.search(user)
            parent = json.loads(found.group(1))["recipe"] if found else None
            recipe = self._recipe(schema["properties"]["recipe"], parent, digest)
            reply = {"recipe": recipe, "rationale": "one gene changed", "confidence": 0.5}
        return json.dumps(reply), Usage(len(user) // 4, 40), "toy-llm-1"

    @staticmethod
    def _recipe(schema: Mapping[str, Any], parent: Any, digest: int) -> dict[str, Any]:
        genes = [(path, choices) for path, choices in _choice_genes(schema) if choices]
        recipe: dict[str, Any] = json.loads(json.dumps(parent)) if parent else {}
        for path, choices in genes:  # a missing gene: its first choice
            node = recipe
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node.setdefault(path[-1], choices[0])
        path, choices = genes[digest % len(genes)]
        node = recipe
        for key in path[:-1]:
            node = node[key]
        others = [c for c in choices if c != node[path[-1]]] or choices
        node[path[-1]] = others[(digest >> 16) % len(others)]
        return recipe
