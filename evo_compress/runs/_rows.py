"""The rows of a run store as typed records, and the checks that reject damaged ones.

Every JSON column read back is checked before the search or a report uses it, so that a
damaged or hand-edited store fails with one line naming the row and the field (``run store
...: checkpoint of generation 2 is damaged: `population` is empty``), not a traceback.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evo_compress.exceptions import RunStoreError
from evo_compress.fitness._base import EvaluationResult
from evo_compress.numeric import as_float, is_int, is_number
from evo_compress.objectives import OBJECTIVE_NAMES


@dataclass(frozen=True)
class IndividualRow:
    id: int
    generation: int
    slot: int
    hash: str
    recipe: dict[str, Any]
    parents: list[int]
    operators: list[str]


@dataclass(frozen=True)
class EvaluationRow:
    individual_id: int
    result: EvaluationResult
    source: str


@dataclass(frozen=True)
class LLMCallRow:
    """One request to an LLM provider, as recorded (``LLM_CALL_COLUMNS``)."""

    generation: int
    slot: int
    operator: str
    attempt: int
    role: str
    provider: str
    model: str
    prompt_hash: str
    prompt: str
    reply: str | None
    input_tokens: int
    output_tokens: int
    cost: float | None
    latency_s: float
    transport_attempts: int
    outcome: str
    error: str | None
    rationale: str | None
    confidence: float | None


@dataclass(frozen=True)
class Checkpoint:
    generation: int
    population: list[dict[str, Any]]
    algorithm_state: dict[str, Any]
    operator_state: dict[str, Any]
    stats: dict[str, Any]


class _Damage(Exception):
    """What is wrong with one stored value, worded for the user."""


def damaged(run_dir: Path, what: str, detail: object) -> RunStoreError:
    """The one-line error for a damaged value: ``what`` names it, ``detail`` says why."""
    return RunStoreError(f"run store {run_dir}: {what} is damaged: {detail}")


def show(value: Any, width: int = 60) -> str:
    """``repr(value)``, cut to ``width`` characters for an error message."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _loads(text: Any, field: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        raise _Damage(f"`{field}` is not valid JSON") from None


def _mapping(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Damage(f"`{field}` must be a mapping, got {show(value)}")
    return value


def _ids(value: Any, field: str) -> list[int]:
    if not isinstance(value, list) or not all(is_int(v) for v in value):
        raise _Damage(f"`{field}` must be a list of individual ids, got {show(value)}")
    return value


def _strings(value: Any, field: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Damage(f"`{field}` must be a list of names, got {show(value)}")
    return value


def individual_row(run_dir: Path, row: tuple[Any, ...]) -> IndividualRow:
    try:
        return IndividualRow(
            id=row[0],
            generation=row[1],
            slot=row[2],
            hash=row[3],
            recipe=_mapping(_loads(row[4], "recipe"), "recipe"),
            parents=_ids(_loads(row[5], "parents"), "parents"),
            operators=_strings(_loads(row[6], "operators"), "operators"),
        )
    except _Damage as exc:
        raise damaged(run_dir, f"individual {row[0]}", exc) from None


STATUSES = ("ok", "failed", "infeasible")


def _objectives(value: Any) -> dict[str, float]:
    objectives = _mapping(value, "objectives")
    for name in OBJECTIVE_NAMES:
        if name not in objectives:
            raise _Damage(f"`objectives` lacks `{name}`")
        number = objectives[name]
        if not is_number(number, text=True) or not math.isfinite(as_float(number)):
            raise _Damage(f"`objectives.{name}` must be a finite number, got {show(number)}")
    return objectives


def evaluation_row(run_dir: Path, row: tuple[Any, ...]) -> EvaluationRow:
    try:
        status = row[1]
        if status not in STATUSES:
            raise _Damage(f"`status` must be ok, failed or infeasible, got {show(status)}")
        objectives = None if row[2] is None else _objectives(_loads(row[2], "objectives"))
        if status == "ok" and objectives is None:
            raise _Damage("`objectives` is missing from a successful evaluation")
        result = EvaluationResult(
            status=status,
            objectives=objectives,
            reason=row[3],
            metadata=_mapping(_loads(row[6], "metadata"), "metadata"),
            duration_s=row[5],
        )
    except _Damage as exc:
        raise damaged(run_dir, f"evaluation of individual {row[0]}", exc) from None
    return EvaluationRow(individual_id=row[0], result=result, source=row[4])


def _population(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _Damage(f"`population` must be a list, got {show(value)}")
    if not value:
        raise _Damage("`population` is empty")
    for index, entry in enumerate(value):
        where = f"population[{index}]"
        _mapping(entry, where)
        for key, check, kind in (
            ("id", is_int, "an integer"),
            ("cv", lambda v: is_number(v, text=True), "a number"),
        ):
            if key not in entry:
                raise _Damage(f"`{where}` lacks `{key}`")
            if not check(entry[key]):
                raise _Damage(f"`{where}.{key}` must be {kind}, got {show(entry[key])}")
    return value


def _algorithm_state(value: Any) -> dict[str, Any]:
    state = _mapping(value, "algorithm_state")
    for key in ("n_iter", "rng"):
        if key not in state:
            raise _Damage(f"`algorithm_state` lacks `{key}`")
    if not is_int(state["n_iter"]):
        raise _Damage(f"`algorithm_state.n_iter` must be an integer, got {show(state['n_iter'])}")
    _mapping(state["rng"], "algorithm_state.rng")
    if "archive" in state:
        _ids(state["archive"], "algorithm_state.archive")
    if state.get("survival") is not None:
        _mapping(state["survival"], "algorithm_state.survival")
    return state


def checkpoint_row(run_dir: Path, row: tuple[Any, ...]) -> Checkpoint:
    try:
        return Checkpoint(
            generation=row[0],
            population=_population(_loads(row[1], "population")),
            algorithm_state=_algorithm_state(_loads(row[2], "algorithm_state")),
            operator_state=_mapping(_loads(row[3], "operator_state"), "operator_state"),
            stats=_mapping(_loads(row[4], "stats"), "stats"),
        )
    except _Damage as exc:
        raise damaged(run_dir, f"checkpoint of generation {row[0]}", exc) from None


def meta_value(run_dir: Path, key: str, text: Any) -> Any:
    """The value of meta ``key``, stored as the JSON ``text``."""
    try:
        return _loads(text, "value")
    except _Damage as exc:
        raise damaged(run_dir, f"meta `{key}`", exc) from None


def stored_objectives(run_dir: Path, individual_id: int, text: Any) -> dict[str, float]:
    """The objectives of an evaluation, stored as the JSON ``text``."""
    try:
        return _objectives(_loads(text, "objectives"))
    except _Damage as exc:
        raise damaged(run_dir, f"evaluation of individual {individual_id}", exc) from None


def credit_operators(run_dir: Path, individual_id: int, text: Any) -> list[str]:
    """The operators of a credit row, stored as the JSON ``text``."""
    try:
        return _strings(_loads(text, "operators"), "operators")
    except _Damage as exc:
        raise damaged(run_dir, f"credit of individual {individual_id}", exc) from None
