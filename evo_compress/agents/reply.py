"""Parse and validate what an LLM agent replied. Replies are data: only schema-checked gene
values are used, through the genome's own strict validation; nothing in a reply is executed,
imported or used as a path, and any field the schema does not name makes the reply invalid.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from evo_compress.exceptions import EvoCompressError
from evo_compress.genomes import Recipe, SearchSpace, flatten

MAX_RATIONALE_CHARS = 1000
# The schemas nest 4 levels at most ({"recipes": [{"quant": {"method": ...}}]}); deeper
# replies are refused before anything recurses through them.
MAX_NESTING = 8
_SURROGATE = re.compile("[\ud800-\udfff]")


class ReplyError(EvoCompressError):
    """The reply does not describe a valid, new recipe; the message is fed back to the model."""


@dataclass(frozen=True)
class ProposalReply:
    recipe: Recipe
    rationale: str
    confidence: float | None


@dataclass(frozen=True)
class CandidatesReply:
    proposals: tuple[ProposalReply, ...]
    rejected: tuple[str, ...]  # why each dropped candidate was invalid

    @property
    def recipes(self) -> tuple[Recipe, ...]:
        return tuple(p.recipe for p in self.proposals)

    # What a call's record keeps of the reply: the first candidate's words.
    @property
    def rationale(self) -> str:
        return self.proposals[0].rationale

    @property
    def confidence(self) -> float | None:
        return self.proposals[0].confidence


@dataclass(frozen=True)
class SeedsReply:
    recipes: tuple[Recipe, ...]
    rationale: str
    rejected: tuple[str, ...]  # why each dropped recipe was invalid


def parse_proposal(text: str, space: SearchSpace, seen: Collection[str] = ()) -> ProposalReply:
    """One child recipe; ``seen`` holds the hashes of recipes already evaluated."""
    data = _json_object(text)
    _only_fields(data, {"recipe", "rationale", "confidence"}, "the reply")
    if "recipe" not in data:
        raise ReplyError("the reply has no `recipe` field")
    recipe = _recipe(data["recipe"], space, "`recipe`")
    if recipe.hash in seen:
        raise ReplyError(
            f"`recipe` {recipe.summary()} has been evaluated in this run already; "
            "propose a recipe that differs from every earlier one"
        )
    return ProposalReply(recipe, _rationale(data), _confidence(data))


def parse_candidates(
    text: str, space: SearchSpace, wanted: int, seen: Collection[str] = ()
) -> CandidatesReply:
    """Up to ``wanted`` distinct valid child recipes that ``seen`` (hashes of recipes already
    evaluated) does not hold; an invalid, repeated or already evaluated candidate is dropped
    with its reason. A reply without a single usable candidate is invalid as a whole."""
    data = _json_object(text)
    _only_fields(data, {"candidates"}, "the reply")
    items = data.get("candidates")
    if not isinstance(items, list) or not items:
        raise ReplyError(
            "`candidates` must be a non-empty list of objects with `recipe`, `rationale` "
            f"and `confidence`, got {_kind(items)}"
        )
    proposals: list[ProposalReply] = []
    hashes: set[str] = set()
    rejected: list[str] = []
    for i, item in enumerate(items):
        where = f"`candidates[{i}]`"
        try:
            if not isinstance(item, dict):
                raise ReplyError(f"{where} must be an object, got {_kind(item)}")
            _only_fields(item, {"recipe", "rationale", "confidence"}, where)
            if "recipe" not in item:
                raise ReplyError(f"{where} has no `recipe` field")
            recipe = _recipe(item["recipe"], space, f"{where}.recipe")
            proposal = ProposalReply(recipe, _rationale(item), _confidence(item))
        except ReplyError as exc:
            rejected.append(str(exc))
            continue
        if recipe.hash in seen:
            rejected.append(f"{where} has been evaluated in this run already")
        elif recipe.hash in hashes:
            rejected.append(f"{where} repeats an earlier candidate")
        elif len(proposals) < wanted:
            proposals.append(proposal)
            hashes.add(recipe.hash)
    if not proposals:
        raise ReplyError(
            "no usable recipe in `candidates` (each must be valid and differ from every "
            "recipe evaluated earlier): " + "; ".join(rejected[:5])
        )
    return CandidatesReply(tuple(proposals), tuple(rejected))


def parse_seeds(text: str, space: SearchSpace, wanted: int) -> SeedsReply:
    """Up to ``wanted`` distinct valid recipes; invalid ones are dropped with their reasons.
    A reply without a single valid recipe is invalid as a whole."""
    data = _json_object(text)
    _only_fields(data, {"recipes", "rationale"}, "the reply")
    items = data.get("recipes")
    if not isinstance(items, list) or not items:
        raise ReplyError("`recipes` must be a non-empty list of recipes")
    recipes: list[Recipe] = []
    hashes: set[str] = set()
    rejected: list[str] = []
    for i, item in enumerate(items):
        try:
            recipe = _recipe(item, space, f"`recipes[{i}]`")
        except ReplyError as exc:
            rejected.append(str(exc))
            continue
        if recipe.hash in hashes:
            rejected.append(f"`recipes[{i}]` repeats an earlier recipe")
            continue
        if len(recipes) < wanted:
            recipes.append(recipe)
            hashes.add(recipe.hash)
    if not recipes:
        raise ReplyError("no valid recipe in `recipes`: " + "; ".join(rejected[:5]))
    return SeedsReply(tuple(recipes), _rationale(data), tuple(rejected))


def _json_object(text: str) -> dict[str, Any]:
    body = text.strip()
    if body.startswith("```"):  # a fenced block despite the instructions
        body = body.split("\n", 1)[1] if "\n" in body else ""
        body = body.rsplit("```", 1)[0]
    _no_surrogate(body, "the reply")
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except (json.JSONDecodeError, ValueError) as exc:
        raise ReplyError(f"the reply is not valid JSON ({exc})") from None
    except RecursionError:
        raise ReplyError(f"the reply is nested deeper than {MAX_NESTING} levels") from None
    if not isinstance(data, dict):
        raise ReplyError(f"the reply must be a JSON object, got {type(data).__name__}")
    _check_values(data)
    return data


def _check_values(data: dict[str, Any]) -> None:
    """Refuse nesting deeper than ``MAX_NESTING`` and strings (keys too) with a lone surrogate
    (from a JSON escape such as "\\ud800"), walking iteratively: nothing here recurses."""
    stack: list[tuple[Any, str, int]] = [(data, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            _no_surrogate(value, f"`{path}`")
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_NESTING:
            raise ReplyError(f"the reply is nested deeper than {MAX_NESTING} levels")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str):
                _no_surrogate(key, "a field name")
            where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}".lstrip(".")
            stack.append((item, where, depth + 1))


def _no_surrogate(text: str, where: str) -> None:
    found = _SURROGATE.search(text)
    if found is not None:
        raise ReplyError(
            f"{where} contains a lone surrogate (U+{ord(found.group()):04X}), which is not "
            "valid Unicode"
        )


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _only_fields(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(data) - allowed)
    if extra:
        raise ReplyError(
            f"{where} has fields the schema does not allow: {', '.join(map(repr, extra))}"
        )


def _recipe(value: Any, space: SearchSpace, where: str) -> Recipe:
    if not isinstance(value, dict):
        raise ReplyError(f"{where} must be an object of genes, got {type(value).__name__}")
    try:
        flat = flatten(value)
    except (TypeError, ValueError, EvoCompressError) as exc:
        raise ReplyError(f"{where}: {exc}") from None
    # null: the gene is inactive or left at its default.
    values = {name: v for name, v in flat.items() if v is not None}
    for name, v in values.items():
        if isinstance(v, (dict, list)):
            raise ReplyError(f"{where}: gene `{name}` must be a plain value, got {v!r}")
    try:
        return space.recipe(values)
    except EvoCompressError as exc:
        raise ReplyError(f"{where}: {exc}") from None


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    return type(value).__name__


def _rationale(data: Mapping[str, Any]) -> str:
    value = data.get("rationale", "")
    if not isinstance(value, str):
        raise ReplyError(f"`rationale` must be a string, got {type(value).__name__}")
    return value.strip()[:MAX_RATIONALE_CHARS]


def _confidence(data: Mapping[str, Any]) -> float | None:
    value = data.get("confidence")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ReplyError(f"`confidence` must be a number from 0 to 1, got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ReplyError(f"`confidence` must be from 0 to 1, got {value!r}")
    return float(value)
