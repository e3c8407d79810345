"""The rows of a run store as typed records, and the checks that reject damaged ones.

Every JSON column read back is checked, by a pydantic ``TypeAdapter`` of what the row's
columns must hold, before the search or a report uses it: a damaged or hand-edited store
fails with one line naming the row and the field (``run store ...: checkpoint of generation
2 is damaged: `population` is empty``), not a traceback.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, get_args

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    with_config,
)
from pydantic_core import ErrorDetails, PydanticCustomError
from typing_extensions import NotRequired, TypedDict

from evo_compress.exceptions import RunStoreError
from evo_compress.fitness import EvaluationResult, Status
from evo_compress.numeric import as_float, is_number
from evo_compress.objectives import OBJECTIVE_NAMES


@dataclass(frozen=True)
class IndividualRow:
    """One individual, as stored.

    Attributes:
        id: Its id in the run.
        generation: Its generation (-1: the baseline reference).
        slot: Its place in the generation.
        hash: Its recipe's canonical hash.
        recipe: Its recipe, as the JSON mapping stored.
        parents: The ids of its parents (empty for the initial population).
        operators: The names of the operators that made it.
    """

    id: int
    generation: int
    slot: int
    hash: str
    recipe: dict[str, Any]
    parents: list[int]
    operators: list[str]


@dataclass(frozen=True)
class EvaluationRow:
    """One individual's evaluation, as stored.

    Attributes:
        individual_id: The individual evaluated.
        result: What the evaluation produced.
        source: Where it came from: ``"evaluated"``, ``"cache"`` or ``"run"``.
    """

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
    """What resuming after a completed generation needs, as plain JSON data.

    Attributes:
        generation: The generation completed.
        population: The surviving population: one mapping per member, with its ``id`` and
            ``cv`` (constraint violation) besides its rank and crowding.
        algorithm_state: The search algorithm's state (``n_iter``, ``rng``, ...).
        operator_state: The operators' state.
        stats: The generation's statistics.
    """

    generation: int
    population: list[dict[str, Any]]
    algorithm_state: dict[str, Any]
    operator_state: dict[str, Any]
    stats: dict[str, Any]


def damaged(run_dir: Path, what: str, detail: object) -> RunStoreError:
    """The one-line error for a damaged value: ``what`` names it, ``detail`` says why."""
    return RunStoreError(f"run store {run_dir}: {what} is damaged: {detail}")


def show(value: Any, width: int = 60) -> str:
    """``repr(value)``, cut to ``width`` characters for an error message."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


# ---------------------------------------------------------------------- what columns hold
# Strict: JSON's 1 is no "1", its true no 1. Mappings stored by the engine keep keys these
# types do not name (``extra="allow"``); the columns of one row are exactly those named.
_STORED = ConfigDict(strict=True, extra="allow")
_COLUMNS = ConfigDict(strict=True, extra="forbid")


def _as_a_whole(noun: str) -> WrapValidator:
    """Any fault inside the value reported as the value not being ``noun``: "a list of
    individual ids, got {'a': 1}" says more than where inside it the first fault is."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("kind", "must be {noun}", {"noun": noun}) from None

    return WrapValidator(check)


def _number(value: Any) -> Any:
    if not is_number(value, text=True):  # inf and nan are stored as text
        raise PydanticCustomError("number", "must be a number")
    return value


def _finite_number(value: Any) -> Any:
    if not is_number(value, text=True) or not math.isfinite(as_float(value)):
        raise PydanticCustomError("finite_number", "must be a finite number")
    return value


Ids = Annotated[list[StrictInt], _as_a_whole("a list of individual ids")]
Names = Annotated[list[StrictStr], _as_a_whole("a list of names")]
Number = Annotated[Any, AfterValidator(_number)]
FiniteNumber = Annotated[Any, AfterValidator(_finite_number)]

STATUSES: tuple[str, ...] = get_args(Status)


@with_config(_STORED)
class Objectives(TypedDict):
    """The five objectives of an evaluation, each a finite number."""

    accuracy: FiniteNumber
    latency: FiniteNumber
    memory: FiniteNumber
    energy: FiniteNumber
    co2: FiniteNumber


assert tuple(Objectives.__annotations__) == OBJECTIVE_NAMES, "the objectives changed"


@with_config(_STORED)
class PopulationEntry(TypedDict):
    """One member of a checkpoint's population (its rank, crowding, ... besides)."""

    id: StrictInt
    cv: Number  # constraint violation


@with_config(_STORED)
class AlgorithmState(TypedDict):
    """What resuming the search algorithm needs (its RNG, iteration, survival state)."""

    n_iter: StrictInt
    rng: dict[str, Any]
    archive: NotRequired[Ids]
    survival: NotRequired[dict[str, Any] | None]


@with_config(_COLUMNS)
class _IndividualColumns(TypedDict):
    recipe: dict[str, Any]
    parents: Ids
    operators: Names


@with_config(_COLUMNS)
class _EvaluationColumns(TypedDict):
    status: Status
    objectives: Objectives | None
    metadata: dict[str, Any]


def _ok_has_objectives(columns: _EvaluationColumns) -> _EvaluationColumns:
    if columns["status"] == "ok" and columns["objectives"] is None:
        raise PydanticCustomError(
            "objectives_missing", "`objectives` is missing from a successful evaluation"
        )
    return columns


@with_config(_COLUMNS)
class _ObjectivesColumn(TypedDict):
    objectives: Objectives


@with_config(_COLUMNS)
class _CheckpointColumns(TypedDict):
    population: Annotated[list[PopulationEntry], Field(min_length=1)]
    algorithm_state: AlgorithmState
    operator_state: dict[str, Any]
    stats: dict[str, Any]


@with_config(_COLUMNS)
class _CreditColumns(TypedDict):
    operators: Names


_INDIVIDUAL = TypeAdapter(_IndividualColumns)
_EVALUATION = TypeAdapter(Annotated[_EvaluationColumns, AfterValidator(_ok_has_objectives)])
_OBJECTIVES = TypeAdapter(_ObjectivesColumn)
_CHECKPOINT = TypeAdapter(_CheckpointColumns)
_CREDIT = TypeAdapter(_CreditColumns)


# ---------------------------------------------------------------------- reading rows
class _Damage(Exception):
    """What is wrong with one stored row, worded for the user."""


def _columns(
    adapter: TypeAdapter[Any], texts: dict[str, Any], plain: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The columns whose JSON ``texts`` are given, decoded, and the ``plain`` ones as they
    are, checked together by ``adapter``.

    The decoded values are returned, not pydantic's validated copies: those are rebuilt (keys
    in the types' order), and a resumed search must go on from exactly what was stored.
    """
    values = dict(plain or {})
    for name, text in texts.items():
        values[name] = _decode(name, text)
    try:
        adapter.validate_python(values)
    except ValidationError as exc:
        raise _Damage(_describe(exc.errors(include_url=False)[0])) from None
    return values


def _decode(name: str, text: Any) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        raise _Damage(f"`{name}` is not valid JSON") from None


# How pydantic's error types read after "`field.path` ".
_WORDS = {
    "dict_type": "must be a mapping",
    "list_type": "must be a list",
    "int_type": "must be an integer",
    "string_type": "must be a string",
}


def _describe(error: ErrorDetails) -> str:
    """One pydantic error as one clause naming the field: "`population[0]` lacks `id`"."""
    loc = error["loc"]
    if error["type"] == "missing":
        return f"`{_path(loc[:-1])}` lacks `{loc[-1]}`"
    if error["type"] == "too_short":
        return f"`{_path(loc)}` is empty"
    if not loc:  # a rule across columns names its fields itself
        return error["msg"]
    if error["type"] == "literal_error":
        words = f"must be {error.get('ctx', {}).get('expected', 'one of the known values')}"
    else:
        words = _WORDS.get(error["type"], error["msg"])
    return f"`{_path(loc)}` {words}, got {show(error['input'])}"


def _path(loc: tuple[int | str, ...]) -> str:
    """``("population", 0, "id")`` as ``population[0].id``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else part
    return text


def individual_row(run_dir: Path, row: tuple[Any, ...]) -> IndividualRow:
    """The individual in ``row`` (id, generation, slot, hash, recipe, parents, operators).

    Raises:
        RunStoreError: a JSON column is damaged, naming the individual and the field.
    """
    try:
        values = _columns(_INDIVIDUAL, {"recipe": row[4], "parents": row[5], "operators": row[6]})
    except _Damage as exc:
        raise damaged(run_dir, f"individual {row[0]}", exc) from None
    return IndividualRow(id=row[0], generation=row[1], slot=row[2], hash=row[3], **values)


def evaluation_row(run_dir: Path, row: tuple[Any, ...]) -> EvaluationRow:
    """The evaluation in ``row`` (individual_id, status, objectives, reason, source,
    duration_s, metadata); a null ``objectives`` (a failure) stays ``None``.

    Raises:
        RunStoreError: a column is damaged, naming the individual and the field.
    """
    texts = {"metadata": row[6]}
    plain = {"status": row[1]}
    if row[2] is None:
        plain["objectives"] = None
    else:
        texts["objectives"] = row[2]
    try:
        values = _columns(_EVALUATION, texts, plain)
    except _Damage as exc:
        raise damaged(run_dir, f"evaluation of individual {row[0]}", exc) from None
    result = EvaluationResult(
        status=values["status"],
        objectives=values["objectives"],
        reason=row[3],
        metadata=values["metadata"],
        duration_s=row[5],
    )
    return EvaluationRow(individual_id=row[0], result=result, source=row[4])


def checkpoint_row(run_dir: Path, row: tuple[Any, ...]) -> Checkpoint:
    """The checkpoint in ``row`` (generation, population, algorithm_state, operator_state,
    stats).

    Raises:
        RunStoreError: a JSON column is damaged, naming the generation and the field.
    """
    names = ("population", "algorithm_state", "operator_state", "stats")
    try:
        values = _columns(_CHECKPOINT, dict(zip(names, row[1:5], strict=True)))
    except _Damage as exc:
        raise damaged(run_dir, f"checkpoint of generation {row[0]}", exc) from None
    return Checkpoint(generation=row[0], **values)


def meta_value(run_dir: Path, key: str, text: Any) -> Any:
    """The value of meta ``key``, stored as the JSON ``text``."""
    try:
        return _decode("value", text)
    except _Damage as exc:
        raise damaged(run_dir, f"meta `{key}`", exc) from None


def stored_objectives(run_dir: Path, individual_id: int, text: Any) -> dict[str, float]:
    """The objectives of an evaluation, stored as the JSON ``text``."""
    try:
        objectives: dict[str, float] = _columns(_OBJECTIVES, {"objectives": text})["objectives"]
    except _Damage as exc:
        raise damaged(run_dir, f"evaluation of individual {individual_id}", exc) from None
    return objectives


def credit_operators(run_dir: Path, individual_id: int, text: Any) -> list[str]:
    """The operators of a credit row, stored as the JSON ``text``."""
    try:
        operators: list[str] = _columns(_CREDIT, {"operators": text})["operators"]
    except _Damage as exc:
        raise damaged(run_dir, f"credit of individual {individual_id}", exc) from None
    return operators
