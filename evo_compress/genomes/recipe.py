"""An immutable compression recipe: the canonical assignment of a search space's active genes.

Recipes are made by ``SearchSpace.recipe`` (strict) or ``SearchSpace.repair`` (lenient), which
drop inactive genes, snap numbers to their step and fill missing genes, so two recipes that
mean the same thing have the same canonical JSON and the same content hash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

from evo_compress.exceptions import RecipeError
from evo_compress.genomes.genes import Value

_SCALARS = frozenset({str, int, float, bool})
# What json.dumps(values, sort_keys=True, separators=(",", ":")) builds on every call: every
# child of every generation is a new recipe.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{quant: {method: nf4}}`` and ``{"quant.method": nf4}`` both become the flat form."""
    if not isinstance(data, Mapping):
        raise RecipeError(f"a recipe must be a mapping of genes, got {type(data).__name__}")
    if not prefix and all(type(k) is str and type(v) in _SCALARS for k, v in data.items()):
        return dict(data)  # flat already (a recipe, an operator's proposal)
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        items = flatten(value, prefix=f"{name}.") if isinstance(value, Mapping) else {name: value}
        for item_name, item_value in items.items():
            if item_name in flat:
                raise RecipeError(f"`{item_name}` is given twice")
            flat[item_name] = item_value
    return flat


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of ``flatten`` for dotted names: ``quant.method`` -> ``{quant: {method}}``."""
    nested: dict[str, Any] = {}
    for name, value in flat.items():
        node = nested
        *groups, leaf = name.split(".")
        for group in groups:
            node = node.setdefault(group, {})
        node[leaf] = value
    return nested


class Recipe(Mapping[str, Value]):
    """A read-only mapping ``gene name -> canonical value`` with a stable content hash."""

    __slots__ = ("_hash", "_json", "_values")

    def __init__(self, values: Mapping[str, Value]) -> None:
        # Callers pass canonical values (SearchSpace guarantees it); we only fix the key order.
        self._values: dict[str, Value] = {k: values[k] for k in sorted(values)}
        self._json = _CANONICAL.encode(self._values)
        self._hash = hashlib.sha256(self._json.encode()).hexdigest()

    @property
    def hash(self) -> str:
        """SHA-256 of the canonical JSON: equal recipes hash equal, across processes."""
        return self._hash

    @property
    def short_hash(self) -> str:
        return self._hash[:12]

    def canonical_json(self) -> str:
        return self._json

    def to_dict(self, nested: bool = True) -> dict[str, Any]:
        return nest(self._values) if nested else dict(self._values)

    def __getitem__(self, name: str) -> Value:
        return self._values[name]

    def get(self, name: str, default: Any = None) -> Any:
        # Mapping's own get goes through __getitem__ and an exception for a missing gene.
        return self._values.get(name, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Recipe):
            return self._hash == other._hash
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._hash)

    def __repr__(self) -> str:
        return f"Recipe({self._json})"

    def summary(self) -> str:
        """Every gene, grouped: ``quant(group_size=64,method=awq) ...``. This is the form LLM
        re-asks quote (``agents/reply.py``), so it stays as it is; people are shown
        ``genomes.render_recipe``."""
        groups: dict[str, list[str]] = {}
        for name, value in self._values.items():
            group, _, leaf = name.partition(".")
            groups.setdefault(group, []).append(f"{leaf}={value}")
        return " ".join(f"{group}({','.join(parts)})" for group, parts in groups.items())
