"""The objectives and the one constraint -> objective map that config, export, the expert
operator and the prompts read."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from evo_compress.config import ConstraintsConfig
from evo_compress.objectives import (
    CONSTRAINTS,
    CONSTRAINTS_BY_KEY,
    OBJECTIVE_NAMES,
    TASK_DROP_KEY,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_every_config_limit_has_one_entry_in_the_map() -> None:
    # ... and `max_task_drop`, one limit per task (objectives.task_drop), after them.
    assert list(ConstraintsConfig.model_fields) == [c.key for c in CONSTRAINTS] + [TASK_DROP_KEY]
    for c in CONSTRAINTS:
        assert c.objective in OBJECTIVE_NAMES
        assert ConstraintsConfig.model_fields[c.key].description == c.doc
    # One limit per objective, and only accuracy is bounded against the baseline.
    assert sorted(c.objective for c in CONSTRAINTS) == sorted(OBJECTIVE_NAMES)
    assert [c.key for c in CONSTRAINTS if c.is_drop] == ["max_accuracy_drop"]


def test_the_docs_table_names_each_limit_with_its_objective() -> None:
    section = DOCS.read_text().split("## `constraints`", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(max_\w+)` \| [^|]+ \| `(\w+)`", section, re.MULTILINE)
    assert dict(rows) == {c.key: c.objective for c in CONSTRAINTS}


@pytest.mark.parametrize(
    ("key", "objectives", "limit", "reference", "value", "violation"),
    [
        ("max_accuracy_drop", {"accuracy": 0.80}, 0.05, {"accuracy": 0.90}, 0.10, 0.05),
        ("max_accuracy_drop", {"accuracy": 0.88}, 0.05, {"accuracy": 0.90}, 0.02, -0.03),
        ("max_accuracy_drop", {"accuracy": 0.88}, 0.05, None, None, None),
        ("max_latency_ms", {"latency": 30.0}, 20.0, None, 30.0, 0.5),
        ("max_memory_mib", {"memory": 1000.0}, 4000.0, None, 1000.0, -0.75),
        ("max_energy_j", {"latency": 1.0}, 4.0, None, None, None),
    ],
)
def test_value_and_violation(
    key: str,
    objectives: dict[str, float],
    limit: float,
    reference: dict[str, float] | None,
    value: float | None,
    violation: float | None,
) -> None:
    constraint = CONSTRAINTS_BY_KEY[key]
    assert constraint.value(objectives, reference) == pytest.approx(value)
    assert constraint.violation(objectives, limit, reference) == pytest.approx(violation)


def test_units_follow_the_objective() -> None:
    assert CONSTRAINTS_BY_KEY["max_latency_ms"].unit == "ms/token"
    assert CONSTRAINTS_BY_KEY["max_memory_mib"].unit == "MiB"
