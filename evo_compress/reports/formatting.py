"""How the report writes a run's values as text: numbers, shares, objective labels, times, how
each value was obtained, per-task scores and what an LLM said. Plain text, not yet escaped:
the figures escape it for plotly.js, the page's template for HTML."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from evo_compress.fitness.noise import AccuracyEstimate
from evo_compress.runs.front import FrontMember
from evo_compress.runs.lineage import Node

SYNTHETIC_HOW = "synthetic (computed, not measured)"
# The shares of an operator's children the report shows: (key in ``operator_stats``, label).
SHARES = (
    ("valid", "valid"),
    ("feasible", "feasible"),
    ("dominated_parent", "dominated a parent"),
    ("entered_front", "entered the front"),
)


def how_text(metadata: Mapping[str, Any], objective: str) -> str:
    """How one objective value was obtained, from the evaluation metadata: ``measured: ...``,
    ``estimated: ...`` or that the synthetic evaluator computed it."""
    details = metadata.get("objectives")
    detail = details.get(objective) if isinstance(details, Mapping) else None
    if metadata.get("synthetic") is True or (
        isinstance(detail, Mapping) and detail.get("how") == "synthetic"
    ):
        return SYNTHETIC_HOW
    if not isinstance(detail, Mapping):
        return str(detail) if detail else "not recorded"
    text = " ".join(str(detail.get("how") or "").split())
    measured = detail.get("measured")
    if measured is True:
        return f"measured: {text}" if text else "measured"
    if measured is False:
        if text.lower().startswith("estimated"):
            return text
        return f"estimated: {text}" if text else "estimated"
    return text or "not recorded"


def format_value(value: Any, digits: int = 4) -> str:
    """A value as a table or hover shows it: ``-`` for none, thousands separated, about four
    significant digits for a float."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        size = abs(value)
        if size >= 1000:
            return f"{value:,.0f}"
        if size >= 10:
            return f"{value:.1f}"
        if size >= 1e-3 or value == 0:
            return f"{value:.{digits}f}"
        return f"{value:.3g}"
    return str(value)


def format_share(value: Any) -> str:
    """A share in [0, 1] as a whole percentage, ``-`` for none."""
    return "-" if value is None else f"{100.0 * float(value):.0f}%"


def format_time(timestamp: float | None) -> str:
    """A Unix time as ``YYYY-MM-DD HH:MM:SS UTC``, ``unknown`` for none."""
    if timestamp is None:
        return "unknown"
    moment = datetime.fromtimestamp(timestamp, tz=timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def objective_label(objective: Any) -> str:
    """``name (unit) ↑`` (higher is better) or ``↓`` (lower is better)."""
    arrow = "↑" if objective.direction == "max" else "↓"
    return f"{objective.name} ({objective.unit}) {arrow}"


def node_rationale(node: Node) -> tuple[str, str] | None:
    """``(provider/model, rationale)`` of the LLM request that made ``node``, if one did."""
    rationale = node.rationale
    if rationale is None:
        return None
    call = next(
        (c for c in reversed(node.llm) if c.get("outcome") == "valid" and c.get("rationale")),
        node.llm[-1] if node.llm else {},
    )
    return f"{call.get('provider', '?')}/{call.get('model', '?')}", rationale


def member_value(member: FrontMember, objective: str) -> str:
    """One objective of a front member as text; accuracy ``0.936 ± 0.015`` where the record
    holds its standard error."""
    if objective == "accuracy" and member.accuracy.stderr is not None:
        return member.accuracy.text()
    return format_value(member.objectives[objective])


def task_value(entry: Mapping[str, Any]) -> str:
    """A task's score, ``0.812 ± 0.010`` where the record holds its standard error."""
    return AccuracyEstimate(entry["score"], entry["stderr"]).text()


def task_how(entry: Mapping[str, Any]) -> str:
    """What a task's score is: its metric, items and weight, those the record holds."""
    parts = [str(entry["metric"])] if entry["metric"] else []
    if entry["n"] is not None:
        parts.append(f"{entry['n']} items")
    if entry["weight"] is not None:
        parts.append(f"weight {entry['weight']:g}")
    return ", ".join(parts)
