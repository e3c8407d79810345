"""The five objectives every evaluation returns, with units and directions, and the
constraints (``constraints.max_*`` in a config) that bound them.

pymoo minimises, so ``to_minimization`` flips maximised objectives; everything the user sees
(store, tables, JSON) keeps the natural sign.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from evo_compress.numeric import finite_float


@dataclass(frozen=True)
class Objective:
    name: str
    unit: str
    direction: Literal["max", "min"]
    doc: str

    @property
    def sign(self) -> float:
        return -1.0 if self.direction == "max" else 1.0


OBJECTIVES: tuple[Objective, ...] = (
    Objective("accuracy", "fraction", "max", "task metric of the compressed model (0..1)"),
    Objective("latency", "ms/token", "min", "median time per output token while serving"),
    Objective("memory", "MiB", "min", "peak device memory while serving"),
    Objective("energy", "J/1k tokens", "min", "energy per 1,000 generated tokens"),
    Objective(
        "co2",
        "g CO2e/1k tokens",
        "min",
        "emissions per 1,000 generated tokens, one-time compression CO2 amortised in",
    ),
)
OBJECTIVE_NAMES: tuple[str, ...] = tuple(o.name for o in OBJECTIVES)
OBJECTIVES_BY_NAME: dict[str, Objective] = {o.name: o for o in OBJECTIVES}


def check_objectives(values: Mapping[str, float]) -> dict[str, float]:
    """Five named finite floats, in canonical order; raises ValueError otherwise."""
    missing = [n for n in OBJECTIVE_NAMES if n not in values]
    extra = [n for n in values if n not in OBJECTIVE_NAMES]
    if missing or extra:
        raise ValueError(
            f"objectives must be exactly {list(OBJECTIVE_NAMES)}; "
            f"missing {missing}, unexpected {extra}"
        )
    out = {}
    for name in OBJECTIVE_NAMES:
        value = float(values[name])
        if not math.isfinite(value):
            raise ValueError(f"objective `{name}` is not finite: {value}")
        out[name] = value
    return out


def to_minimization(values: Mapping[str, float]) -> np.ndarray:
    return np.array([o.sign * float(values[o.name]) for o in OBJECTIVES], dtype=float)


def from_minimization(row: np.ndarray) -> dict[str, float]:
    return {o.name: float(o.sign * v) for o, v in zip(OBJECTIVES, row, strict=True)}


@dataclass(frozen=True)
class Constraint:
    """A config limit (``constraints.<key>``) on one objective.

    ``max_accuracy_drop`` bounds the accuracy lost against the baseline reference (absolute);
    every other limit is an upper bound on its objective, and its violation is relative
    (divided by the limit) so that no unit dominates the others.
    """

    key: str
    objective: str
    doc: str
    phrase: str  # how a prompt states the limit, ``{v}`` being the limit
    is_drop: bool = False  # bounds the drop from the baseline reference, not the value

    @property
    def unit(self) -> str:
        """The limit's unit: its objective's (a fraction for the accuracy and task drops)."""
        objective = OBJECTIVES_BY_NAME.get(self.objective)
        return objective.unit if objective is not None else "fraction"

    @property
    def task(self) -> str | None:
        """The task whose score ``max_task_drop.<task>`` bounds; None for the others."""
        return self.objective.removeprefix(TASK_VALUE_PREFIX) if self.is_task else None

    @property
    def is_task(self) -> bool:
        return self.objective.startswith(TASK_VALUE_PREFIX)

    def value(
        self, objectives: Mapping[str, float], reference: Mapping[str, float] | None = None
    ) -> float | None:
        """The quantity the limit bounds (the drop from ``reference`` for the accuracy drop);
        None when it cannot be known (no reference, the objective missing). A task drop reads
        ``task:<name>`` in both mappings (``constrained_values``)."""
        if self.objective not in objectives:
            return None
        if self.is_drop:
            if reference is None or self.objective not in reference:
                return None
            return reference[self.objective] - objectives[self.objective]
        return objectives[self.objective]

    def violation(
        self,
        objectives: Mapping[str, float],
        limit: float,
        reference: Mapping[str, float] | None = None,
    ) -> float | None:
        """<= 0 is satisfied: ``drop - limit`` for the accuracy drop, ``(value - limit) /
        limit`` for the others; None when the value cannot be known."""
        value = self.value(objectives, reference)
        if value is None:
            return None
        return value - limit if self.is_drop else (value - limit) / limit


CONSTRAINTS: tuple[Constraint, ...] = (
    Constraint(
        "max_accuracy_drop",
        "accuracy",
        "Largest accuracy drop allowed vs the baseline recipe",
        "accuracy may drop at most {v} below the baseline's",
        is_drop=True,
    ),
    Constraint(
        "max_latency_ms",
        "latency",
        "ms per output token",
        "latency at most {v} ms per output token",
    ),
    Constraint(
        "max_memory_mib", "memory", "MiB peak device memory", "peak memory at most {v} MiB"
    ),
    Constraint(
        "max_energy_j", "energy", "J per 1,000 tokens", "energy at most {v} J per 1,000 tokens"
    ),
    Constraint(
        "max_co2_g", "co2", "g CO2e per 1,000 tokens", "CO2 at most {v} g per 1,000 tokens"
    ),
)
CONSTRAINTS_BY_KEY: dict[str, Constraint] = {c.key: c for c in CONSTRAINTS}


# `constraints.max_task_drop: {task: limit}`: one drop constraint per task, keyed
# ``max_task_drop.<task>`` wherever limits are flat (the engine's columns, operator contexts,
# exports), reading the task's score in ``metadata["tasks"][task]["score"]`` of each record.
TASK_DROP_KEY = "max_task_drop"
TASKS_KEY = "tasks"  # metadata["tasks"][name] = {score, stderr, n, metric, weight}
TASK_VALUE_PREFIX = "task:"  # a task's score among ``constrained_values``


def task_drop(task: str) -> Constraint:
    """The constraint ``max_task_drop.<task>``: the task's score, absolute drop vs the
    baseline's score of that task."""
    shown = task.replace("{", "{{").replace("}", "}}")  # the phrase is a format string
    return Constraint(
        f"{TASK_DROP_KEY}.{task}",
        TASK_VALUE_PREFIX + task,
        f"Largest drop of task `{task}`'s score allowed vs the baseline recipe",
        f"task `{shown}` score may drop at most {{v}} below the baseline's",
        is_drop=True,
    )


def constraint_of(key: str) -> Constraint | None:
    """The constraint of a flat limit key (``max_memory_mib``, ``max_task_drop.<task>``);
    None for a key no version of the schema knows (a stored config is read leniently)."""
    known = CONSTRAINTS_BY_KEY.get(key)
    if known is not None:
        return known
    task = key.removeprefix(TASK_DROP_KEY + ".")
    return task_drop(task) if task != key and task else None


def flat_limits(constraints: Mapping[str, Any]) -> dict[str, float]:
    """A `constraints` section (a config's, or a stored one as plain data) as one limit per
    key, unset ones left out: ``max_task_drop``'s map gives one ``max_task_drop.<task>`` key
    per task, in its order."""
    out: dict[str, float] = {}
    for key, value in constraints.items():
        if value is None:
            continue
        if key == TASK_DROP_KEY and isinstance(value, Mapping):
            for task, limit in value.items():
                out[f"{TASK_DROP_KEY}.{task}"] = limit
        else:
            out[key] = value
    return out


def task_entries(metadata: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each task of a record's ``metadata["tasks"]`` that has a finite score, as plain data
    read leniently: ``score``, ``stderr``, ``n``, ``metric``, ``weight`` (None where the
    record holds no valid value)."""
    tasks = metadata.get(TASKS_KEY)
    if not isinstance(tasks, Mapping):
        return {}
    out: dict[str, dict[str, Any]] = {}
    for name, entry in tasks.items():
        if not isinstance(entry, Mapping) or finite_float(entry.get("score")) is None:
            continue
        stderr, n = finite_float(entry.get("stderr")), finite_float(entry.get("n"))
        metric = entry.get("metric")
        out[str(name)] = {
            "score": float(entry["score"]),
            "stderr": stderr if stderr is not None and stderr >= 0 else None,
            "n": int(n) if n is not None and n.is_integer() and n >= 0 else None,
            "metric": metric if isinstance(metric, str) else None,
            "weight": finite_float(entry.get("weight")),
        }
    return out


def task_scores(metadata: Mapping[str, Any]) -> dict[str, float]:
    """Each task's score in a record's ``metadata["tasks"]`` (finite numbers only)."""
    return {name: entry["score"] for name, entry in task_entries(metadata).items()}


def constrained_values(
    objectives: Mapping[str, float], metadata: Mapping[str, Any]
) -> dict[str, float]:
    """What constraints read of a result: its objectives and ``task:<name>`` per task score."""
    scores = {TASK_VALUE_PREFIX + name: score for name, score in task_scores(metadata).items()}
    return {**objectives, **scores}
