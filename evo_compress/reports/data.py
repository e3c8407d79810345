"""What a report shows, read out of a run store in one consistent moment: ``collect`` returns a
``ReportData`` that the HTML page (``html.py``, ``figures.py``) and the PNGs (``png.py``) share.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from evo_compress.reports.layout import lineage_layout
from evo_compress.runs.analysis import history, operator_stats
from evo_compress.runs.front import FrontMember, load_front, run_status
from evo_compress.runs.lineage import Lineage, load_lineage
from evo_compress.runs.store import RunStore


@dataclass(frozen=True)
class ReportData:
    """Everything a report shows, read out of a run store once (the HTML and PNGs share it)."""

    status: dict[str, Any]  # ``run_status``
    evaluator: str
    model: str | None
    created_at: float | None
    config_yaml: str
    front: list[FrontMember]
    history: list[dict[str, Any]]
    operators: list[dict[str, Any]]
    lineage: Lineage
    positions: dict[int, tuple[float, float]]  # lineage node id -> (generation, row)
    # Every other recipe evaluated with objectives (id, generation, objectives), by id.
    evaluated: list[tuple[int, int, dict[str, float]]] = field(default_factory=list)

    @property
    def front_feasible(self) -> bool:
        return all(m.feasible for m in self.front)


def collect(store: RunStore) -> ReportData:
    """Read what a report shows from ``store``."""
    with store.snapshot():  # a search may be writing the run: read one moment of it
        return _collect(store)


def _collect(store: RunStore) -> ReportData:
    config_yaml = str(store.get_meta("config", ""))
    try:
        config = yaml.safe_load(config_yaml)
    except yaml.YAMLError:
        config = None
    config = config if isinstance(config, Mapping) else {}
    front = load_front(store)
    evaluator = _get(config, "evaluator", "name")
    if evaluator is None and front:
        evaluator = front[0].how.get("evaluator")
    lineage = load_lineage(store)
    created = store.get_meta("created_at", None)
    model = _get(config, "model", "id")
    on_front = {m.id for m in front}
    evaluated = [p for p in store.evaluated_objectives() if p[0] not in on_front]
    return ReportData(
        status=run_status(store),
        evaluator=str(evaluator or "unknown"),
        model=str(model) if model else None,
        created_at=float(created) if isinstance(created, int | float) else None,
        config_yaml=config_yaml,
        front=front,
        history=history(store),
        operators=operator_stats(store),
        lineage=lineage,
        positions=lineage_layout(lineage),
        evaluated=evaluated,
    )


def _get(mapping: Mapping[str, Any], *keys: str) -> Any:
    node: Any = mapping
    for key in keys:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node
