"""Compare two runs: their fronts side by side, each front's hypervolume in one common box,
the best value of each objective and how much of each front the other dominates.

Each run measures its hypervolume in its own box (runs/hypervolume.py), so the two values the
runs report are on different scales; here both fronts are normalised by the ideal and nadir of
the union of both fronts (the box hypervolume studies use), which is the same whichever run is
A. When both runs fix the same corners in their `hypervolume` sections, those corners hold.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np
import yaml

from evo_compress.exceptions import RunStoreError
from evo_compress.objectives import OBJECTIVES, flat_limits, to_minimization
from evo_compress.runs.front import FrontMember, load_front
from evo_compress.runs.hypervolume import REFERENCE_POINT, Box, run_history, stored_box_config
from evo_compress.runs.store import RunStore

LABELS = ("A", "B")


def dominated_count(F: np.ndarray, by: np.ndarray) -> int:
    """How many rows of ``F`` some row of ``by`` Pareto-dominates (minimisation)."""
    if len(F) == 0 or len(by) == 0:
        return 0
    le = np.all(by[None, :, :] <= F[:, None, :], axis=2)
    lt = np.any(by[None, :, :] < F[:, None, :], axis=2)
    return int(np.any(le & lt, axis=1).sum())


def compare_runs(a: RunStore, b: RunStore) -> dict[str, Any]:
    """Both runs' fronts and their hypervolumes in a common box (plain data).

    ``common_box`` is the ideal and nadir of the union of both fronts (natural units);
    ``hypervolume`` of each side is measured in it, ``hypervolume_own`` in the run's own box
    (what its `history` and `status` show). ``dominated`` counts the front's points some point
    of the other front dominates. ``warnings`` says why the numbers may not be comparable."""
    sides = [_side(store, label) for store, label in zip((a, b), LABELS, strict=True)]
    warnings: list[str] = []
    if all(side["generations_done"] == 0 for side in sides):
        raise RunStoreError(
            f"neither {a.run_dir} nor {b.run_dir} has finished a generation: nothing to compare"
        )
    for side in sides:
        if side["generations_done"] == 0:
            warnings.append(f"run {side['label']} has finished no generation: its front is empty")
    fixed = [side.pop("_box_config") for side in sides]
    same_fixed = fixed[0] == fixed[1]
    if not same_fixed:
        warnings.append(
            "the runs fix different hypervolume boxes (`hypervolume` in their configs): the "
            "common box is the union of both fronts, neither run's"
        )
    fronts = [_minimization(side.pop("_front")) for side in sides]
    box = Box.of(fronts, fixed[0] if same_fixed else None)
    for i, side in enumerate(sides):
        other = fronts[1 - i]
        side["hypervolume"] = box.hypervolume(fronts[i]) if len(fronts[i]) else 0.0
        count = dominated_count(fronts[i], other)
        side["dominated"] = count
        side["dominated_share"] = count / len(fronts[i]) if len(fronts[i]) else None
    warnings += _warnings(sides)
    return {
        "a": sides[0],
        "b": sides[1],
        "objectives": [
            {"name": o.name, "unit": o.unit, "direction": o.direction} for o in OBJECTIVES
        ],
        "common_box": {k: v for k, v in box.to_data().items() if k != "reference_point"},
        "reference_point": [REFERENCE_POINT] * len(OBJECTIVES),
        "warnings": warnings,
    }


def _side(store: RunStore, label: str) -> dict[str, Any]:
    try:
        config = yaml.safe_load(store.get_meta("config", "") or "") or {}
    except yaml.YAMLError:
        raise RunStoreError(f"{store.run_dir}: the stored config is not valid YAML") from None
    if not isinstance(config, dict):
        raise RunStoreError(f"{store.run_dir}: the stored config is not a mapping")
    front = load_front(store)
    checkpoints = store.checkpoints()
    own = run_history(store, checkpoints)
    best: dict[str, float | None] = {}
    for o in OBJECTIVES:
        values = [m.objectives[o.name] for m in front]
        best[o.name] = (max if o.direction == "max" else min)(values) if values else None
    return {
        "label": label,
        "name": store.get_meta("name", None) or store.run_dir.name,
        "run_dir": str(store.run_dir),
        "model": (config.get("model") or {}).get("id"),
        "evaluator": (config.get("evaluator") or {}).get("name"),
        "fingerprint": store.get_meta("fingerprint", None),
        "constraints": flat_limits(config.get("constraints") or {}),
        "generations_done": checkpoints[-1].generation + 1 if checkpoints else 0,
        "hypervolume_own": own.last if own.last is not None else 0.0,
        "front_size": len(front),
        "feasible": front[0].feasible if front else None,
        "best": best,
        "front": [m.to_json() for m in front],
        "_front": front,
        "_box_config": stored_box_config(store),
    }


def _minimization(front: Sequence[FrontMember]) -> np.ndarray:
    if not front:
        return np.zeros((0, len(OBJECTIVES)))
    return np.array([to_minimization(m.objectives) for m in front])


def _warnings(sides: Sequence[dict[str, Any]]) -> list[str]:
    a, b = sides
    out = []
    if a["model"] != b["model"]:
        out.append(
            f"the runs use different models (`{a['model']}` vs `{b['model']}`): their "
            "objectives are not comparable"
        )
    if a["evaluator"] != b["evaluator"]:
        out.append(
            f"the runs use different evaluators (`{a['evaluator']}` vs `{b['evaluator']}`): "
            "their objectives were not obtained the same way and are not comparable"
        )
    if a["fingerprint"] != b["fingerprint"]:
        out.append(
            "the evaluators' fingerprints differ (settings, model or environment): the "
            "objectives were not obtained under the same conditions and are not comparable"
        )
    if a["constraints"] != b["constraints"]:
        out.append(
            f"the runs' constraints differ ({_constraints_text(a['constraints'])} vs "
            f"{_constraints_text(b['constraints'])}): their fronts are filtered differently"
        )
    for side in sides:
        if side["feasible"] is False:
            out.append(
                f"run {side['label']} has no feasible recipe: its front lists the "
                "least-violating ones"
            )
    return out


def _constraints_text(constraints: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(constraints.items())) or "none"


# ---------------------------------------------------------------------- the terminal table
def _num(value: Any, digits: int = 6) -> str:
    if value is None:
        return "-"
    return f"{float(value):.{digits}g}"


def render_comparison(result: dict[str, Any]) -> str:
    """``compare_runs``'s result as a plain-text table for the terminal."""
    a, b = result["a"], result["b"]
    rows: list[tuple[str, str, str]] = [
        ("", f"A: {a['name']}", f"B: {b['name']}"),
        ("run directory", a["run_dir"], b["run_dir"]),
        ("model", str(a["model"]), str(b["model"])),
        ("evaluator", str(a["evaluator"]), str(b["evaluator"])),
        ("front size", str(a["front_size"]), str(b["front_size"])),
        ("hypervolume (common box)", _num(a["hypervolume"]), _num(b["hypervolume"])),
        ("hypervolume (own box)", _num(a["hypervolume_own"]), _num(b["hypervolume_own"])),
    ]
    for o in result["objectives"]:
        word = "highest" if o["direction"] == "max" else "lowest"
        rows.append(
            (
                f"{word} {o['name']} ({o['unit']})",
                _num(a["best"][o["name"]]),
                _num(b["best"][o["name"]]),
            )
        )
    rows.append(("dominated by the other front", _share(a), _share(b)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = []
    for n, row in enumerate(rows):
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * width for width in widths))
    box = Box.from_data(result["common_box"])
    lines.append("")
    lines += textwrap.wrap(
        f"common box (both fronts' ideal..nadir): {box.describe()}",
        width=99,
        subsequent_indent="  ",
    )
    for warning in result["warnings"]:
        lines += textwrap.wrap(f"warning: {warning}", width=99, subsequent_indent="  ")
    return "\n".join(lines)


def _share(side: dict[str, Any]) -> str:
    if side["dominated_share"] is None:
        return "-"
    return f"{side['dominated']} of {side['front_size']} ({side['dominated_share']:.0%})"
