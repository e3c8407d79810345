"""The reply schemas built from the search space: the method genes carry the registry's
descriptions, so the agents learn of a newly registered method without a prompt edit."""

from __future__ import annotations

from dataclasses import replace

import pytest

from evo_compress.agents.schema import candidates_schema, proposal_schema, recipe_schema
from evo_compress.genomes import SearchSpace
from evo_compress.methods import METHODS, MethodRegistry, get_method


def test_quant_method_lists_each_registered_method_with_its_description() -> None:
    schema = recipe_schema(SearchSpace.builtin())
    method = schema["properties"]["quant"]["properties"]["method"]
    assert method["enum"] == [*METHODS.names("quantization"), None]
    text = method["description"]
    assert text.startswith(SearchSpace.builtin().genes["quant.method"].doc)
    for name in METHODS.names("quantization"):
        assert f"{name}: {get_method(name).description.rstrip('.')}" in text
    # A gene whose values are not all registered methods keeps its own doc only.
    prune = schema["properties"]["prune"]["properties"]["method"]
    assert prune["description"] == SearchSpace.builtin().genes["prune.method"].doc


def test_a_newly_registered_method_reaches_the_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = MethodRegistry()
    for method in METHODS:
        registry.register(method)
    registry.register(replace(get_method("rtn"), name="int3", description="3-bit RTN."))
    monkeypatch.setattr("evo_compress.genomes.space.METHODS", registry)
    monkeypatch.setattr("evo_compress.agents.schema.METHODS", registry)
    method = recipe_schema(SearchSpace.builtin())["properties"]["quant"]["properties"]["method"]
    assert "int3" in method["enum"]
    assert method["description"].endswith("int3: 3-bit RTN.")


def test_the_candidates_schema_is_a_list_of_single_child_replies() -> None:
    space = SearchSpace.builtin()
    schema = candidates_schema(space)
    # a strict object: only `candidates`, each item exactly what a one-child reply is
    assert schema["required"] == ["candidates"] and schema["additionalProperties"] is False
    assert schema["properties"]["candidates"] == {
        "type": "array",
        "items": proposal_schema(space),
    }
