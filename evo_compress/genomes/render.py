"""How a recipe is shown to a person: one line for tables, messages and plots, and the full
YAML block. Every human-facing view (CLI, report, export, lineage) uses these two.

What an LLM is shown is the prompts' business (``agents/prompts.py``, ``Recipe.summary``) and
is kept apart on purpose: changing it changes the replies a recorded run replays.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import yaml

from evo_compress.genomes.recipe import flatten, nest

# Gene groups in the order a recipe is applied; other groups follow, by name.
GROUP_ORDER = ("quant", "prune", "recovery", "kv", "serve")


def render_recipe(
    recipe: Mapping[str, Any],
    omit: Collection[str] = (),
    baseline: Mapping[str, Any] | None = None,
) -> str:
    """``quant=awq(group_size=128) prune=wanda(sparsity=0.5) kv(dtype=fp8)``: one line, gene
    groups in the order they are applied, a group whose method is ``none`` left out, and the
    groups in ``omit`` (e.g. ``serve``) too. With a ``baseline`` recipe only the genes that
    differ from it are shown (what the recipe changes). ``uncompressed`` when nothing is left.

    ``recipe`` and ``baseline`` are ``Recipe``s or their flat or nested dict forms."""
    base = flatten(baseline) if baseline is not None else {}
    groups: dict[str, dict[str, Any]] = {}
    for name, value in flatten(recipe).items():
        group, _, leaf = name.partition(".")
        if group in omit or (name in base and base[name] == value):
            continue
        groups.setdefault(group, {})[leaf or group] = value
    parts = []
    for group, leaves in sorted(groups.items(), key=lambda item: _group_rank(item[0])):
        method = leaves.pop("method", None)
        if method == "none" and not leaves:
            continue
        head = group if method is None else f"{group}={method}"
        rest = ", ".join(f"{k}={_plain(v)}" for k, v in leaves.items())
        parts.append(f"{head}({rest})" if rest else head)
    return " ".join(parts) or "uncompressed"


def render_recipe_yaml(recipe: Mapping[str, Any]) -> str:
    """Every gene, nested by group, keys sorted: the block a person copies into a file."""
    return yaml.safe_dump(nest(flatten(recipe)), sort_keys=True, allow_unicode=True)


def _group_rank(group: str) -> tuple[int, str]:
    return (GROUP_ORDER.index(group) if group in GROUP_ORDER else len(GROUP_ORDER), group)


def _plain(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
