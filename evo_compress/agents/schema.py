"""JSON schemas of what the LLM agents must reply, built from the search space.

The recipe is nested by gene group (``{"quant": {"method": "awq", ...}}``), every gene is
listed and nullable (null: inactive or left to its default), no other field is allowed: the
shape the providers' strict structured-output modes accept.
"""

from __future__ import annotations

from typing import Any

from evo_compress.genomes import BoolGene, ChoiceGene, FloatGene, Gene, IntGene, SearchSpace
from evo_compress.methods import METHODS


def gene_schema(gene: Gene) -> dict[str, Any]:
    """One gene's JSON schema, null allowed."""
    if isinstance(gene, ChoiceGene):
        kinds = sorted({_json_type(c) for c in gene.choices})
        return {
            "type": [*kinds, "null"],
            "enum": [*gene.choices, None],
            "description": _with_methods(gene.doc, gene.choices),
        }
    if isinstance(gene, BoolGene):
        return {"type": ["boolean", "null"], "description": gene.doc}
    if isinstance(gene, (IntGene, FloatGene)):
        return {
            "type": ["integer" if isinstance(gene, IntGene) else "number", "null"],
            "minimum": gene.low,
            "maximum": gene.high,
            "description": f"{gene.doc} Multiple of {gene.step} from {gene.low}.".strip(),
        }
    raise TypeError(f"no JSON schema for gene type {type(gene).__name__}")


def recipe_schema(space: SearchSpace) -> dict[str, Any]:
    """A recipe of ``space`` as a nested object of nullable genes."""
    root: dict[str, Any] = _object()
    for name, gene in space.genes.items():
        node = root
        *groups, leaf = name.split(".")
        for group in groups:
            if group not in node["properties"]:
                node["properties"][group] = _object()
                node["required"].append(group)
            node = node["properties"][group]
        node["properties"][leaf] = gene_schema(gene)
        node["required"].append(leaf)
    return root


def proposal_schema(space: SearchSpace) -> dict[str, Any]:
    """One child: the recipe, why, and how sure the model is."""
    schema = _object()
    schema["properties"] = {
        "recipe": recipe_schema(space),
        "rationale": {
            "type": "string",
            "description": "Why this child should improve on its parents, in at most 3 sentences",
        },
        "confidence": {
            "type": "number",
            "minimum": 0,
            "maximum": 1,
            "description": "How likely the child is to enter the Pareto front, 0 to 1",
        },
    }
    schema["required"] = ["recipe", "rationale", "confidence"]
    return schema


def candidates_schema(space: SearchSpace) -> dict[str, Any]:
    """Several children of the same parents, each as ``proposal_schema``: the surrogate
    chooses which of them are evaluated."""
    schema = _object()
    schema["properties"] = {
        "candidates": {"type": "array", "items": proposal_schema(space)},
    }
    schema["required"] = ["candidates"]
    return schema


def seeds_schema(space: SearchSpace) -> dict[str, Any]:
    """A portfolio of first-generation recipes."""
    schema = _object()
    schema["properties"] = {
        "recipes": {"type": "array", "items": recipe_schema(space)},
        "rationale": {"type": "string", "description": "How the portfolio covers the trade-offs"},
    }
    schema["required"] = ["recipes", "rationale"]
    return schema


def _with_methods(doc: str, choices: tuple[Any, ...]) -> str:
    """A gene whose values are all registered compression methods (``quant.method``) also
    gets each method's one-line description from the registry, new methods included."""
    methods = [METHODS.find(c) for c in choices]
    if not choices or any(m is None for m in methods):
        return doc
    lines = "; ".join(f"{m.name}: {m.description.rstrip('.')}" for m in methods if m is not None)
    return f"{doc} Methods: {lines}.".strip()


def _object() -> dict[str, Any]:
    return {"type": "object", "properties": {}, "required": [], "additionalProperties": False}


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string"
