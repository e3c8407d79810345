"""The hypervolume box and indicator, one implementation for the engine (checkpoint stats,
adaptive operator credit), `history`/`status`/reports, `compare` and the benchmarks.

Points are in minimisation space (``objectives.to_minimization``: accuracy negated). A
``Box`` is an ideal and a nadir point; each objective is normalised to
``(f - ideal) / (nadir - ideal)``, so the box is [0, 1] in every objective, and the
hypervolume is measured against the reference point ``REFERENCE_POINT`` (1.1) in every
objective, as hypervolume studies do: a point on the nadir still adds a thin slab, a point
beyond the reference adds nothing. Values run from 0 to 1.1^5 = 1.61051; higher is better.

A run's box is *observed*: the ideal and nadir of its front (the feasible recipes evaluated so
far that none dominates) together with the baseline reference (generation -1), so the box is on
the scale of what the run found and anchored at the uncompressed model. A `hypervolume`
config section fixes any corner (``HypervolumeConfig``). The box moves as the front does, so
a value is only comparable with values in the same box: each checkpoint records its
generation's front in the box of that moment (what `run` prints and what operator credit
uses), and ``run_history`` takes every generation's front again in one box, the last
checkpoint's, for `history`, `status` and reports.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import moocore
import numpy as np
import yaml
from pydantic import ValidationError

from evo_compress.config import HypervolumeConfig, format_validation_error
from evo_compress.exceptions import RunStoreError
from evo_compress.objectives import OBJECTIVES, from_minimization, to_minimization
from evo_compress.runs.store import Checkpoint, EvaluationRow, RunStore

REFERENCE_POINT = 1.1  # in the normalised box, every objective
N_OBJ = len(OBJECTIVES)


@dataclass(frozen=True)
class Box:
    """An ideal and a nadir point in minimisation space (arrays of five)."""

    ideal: np.ndarray
    nadir: np.ndarray

    @classmethod
    def of(
        cls, points: Iterable[np.ndarray] | np.ndarray, fixed: HypervolumeConfig | None = None
    ) -> Box:
        """The ideal and nadir of ``points`` (rows in minimisation space); ``fixed`` replaces
        the corners it sets. No points at all: the unit box at the origin, or what is fixed."""
        rows = [np.asarray(p, dtype=float).reshape(-1, N_OBJ) for p in points]
        union = np.vstack(rows) if rows else np.zeros((0, N_OBJ))
        if len(union):
            ideal, nadir = union.min(axis=0), union.max(axis=0)
        else:
            ideal, nadir = np.zeros(N_OBJ), np.ones(N_OBJ)
        if fixed is not None:
            ideal = _override(ideal, fixed.ideal.given())
            nadir = _override(nadir, fixed.nadir.given())
        return cls(ideal, nadir)

    @property
    def span(self) -> np.ndarray:
        """nadir - ideal; 1 where they coincide (every point has the same value there, or a
        fixed corner sits beyond the observed one: its points lie outside the box)."""
        return np.where(self.nadir > self.ideal, self.nadir - self.ideal, 1.0)

    def normalize(self, F: np.ndarray) -> np.ndarray:
        F = np.asarray(F, dtype=float).reshape(-1, N_OBJ)
        return (F - self.ideal) / self.span

    def hypervolume(self, F: np.ndarray) -> float:
        """Hypervolume of minimisation-space points in this box, reference point 1.1."""
        norm = self._inside(F)
        if len(norm) == 0:
            return 0.0
        return float(moocore.hypervolume(norm, ref=np.full(N_OBJ, REFERENCE_POINT)))

    def contributions(self, F: np.ndarray) -> np.ndarray:
        """Per point, the hypervolume only it covers (0 for a dominated or duplicated point,
        or one beyond the reference point)."""
        norm = self.normalize(F)
        out = np.zeros(len(norm))
        inside = np.all(norm < REFERENCE_POINT, axis=1)
        if inside.any():
            # Dominated points count: a point's share is exactly what the set loses without
            # it (the same speed as ignoring them on a front, which has none).
            out[inside] = moocore.hv_contributions(
                norm[inside], ref=np.full(N_OBJ, REFERENCE_POINT), ignore_dominated=False
            )
        return out

    def _inside(self, F: np.ndarray) -> np.ndarray:
        norm = self.normalize(F)
        return norm[np.all(norm < REFERENCE_POINT, axis=1)]

    def to_data(self) -> dict[str, Any]:
        """Natural units, by objective name: for checkpoints, JSON and the terminal."""
        return {
            "ideal": from_minimization(self.ideal),
            "nadir": from_minimization(self.nadir),
            "reference_point": REFERENCE_POINT,
        }

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Box:
        return cls(to_minimization(data["ideal"]), to_minimization(data["nadir"]))

    def describe(self, digits: int = 4) -> str:
        """One line: each objective's range, worst to best for accuracy."""
        ideal, nadir = from_minimization(self.ideal), from_minimization(self.nadir)
        parts = [
            f"{o.name} {nadir[o.name]:.{digits}g}..{ideal[o.name]:.{digits}g}"
            if o.direction == "max"
            else f"{o.name} {ideal[o.name]:.{digits}g}..{nadir[o.name]:.{digits}g}"
            for o in OBJECTIVES
        ]
        return (
            f"{', '.join(parts)}; reference point {REFERENCE_POINT} in each normalised objective"
        )


def _override(values: np.ndarray, given: Mapping[str, float]) -> np.ndarray:
    out = values.copy()
    for i, o in enumerate(OBJECTIVES):
        if o.name in given:
            out[i] = o.sign * float(given[o.name])
    return out


# ---------------------------------------------------------------------- a run's box
def run_box(front: np.ndarray, reference: np.ndarray | None, fixed: HypervolumeConfig) -> Box:
    """A run's box at one moment: its front (minimisation rows) and the baseline reference."""
    points = [front] if reference is None else [front, reference]
    return Box.of(points, fixed)


def stored_box_config(store: RunStore) -> HypervolumeConfig:
    """The `hypervolume` section of a run's stored config (empty for runs made before it)."""
    try:
        config = yaml.safe_load(store.get_meta("config", "") or "") or {}
    except yaml.YAMLError:
        raise RunStoreError(f"{store.run_dir}: the stored config is not valid YAML") from None
    section = config.get("hypervolume") if isinstance(config, dict) else None
    try:
        return HypervolumeConfig.model_validate(section or {})
    except ValidationError as exc:
        raise RunStoreError(
            format_validation_error(exc, f"{store.run_dir} config", "hypervolume.")
        ) from None


def reference_objectives(
    store: RunStore, evaluations: Mapping[int, EvaluationRow] | None = None
) -> np.ndarray | None:
    """The baseline reference's objectives (minimisation), or None when it has none."""
    row = store.individual_at(-1, 0)
    if row is None:
        return None
    evaluation = evaluations.get(row.id) if evaluations is not None else store.evaluation(row.id)
    if evaluation is None or evaluation.result.objectives is None:
        return None
    return to_minimization(evaluation.result.objectives)


def checkpoint_front(
    checkpoint: Checkpoint, evaluations: Mapping[int, EvaluationRow]
) -> np.ndarray | None:
    """A checkpoint's front (its archive) in minimisation space; None for a checkpoint without
    one (written before the front was an archive) or one naming a missing evaluation."""
    archive = checkpoint.algorithm_state.get("archive")
    if not isinstance(archive, list):
        return None
    rows = []
    for ident in archive:
        evaluation = evaluations.get(int(ident))
        if evaluation is None or evaluation.result.objectives is None:
            return None
        rows.append(to_minimization(evaluation.result.objectives))
    return np.array(rows, dtype=float).reshape(len(rows), N_OBJ)


@dataclass(frozen=True)
class RunHypervolumes:
    """Every checkpoint's hypervolume in one box (``box``; None: the values are the ones the
    checkpoints recorded, each in its own box, for a run whose fronts cannot be read back)."""

    by_generation: dict[int, float]
    box: Box | None

    @property
    def last(self) -> float | None:
        return self.by_generation[max(self.by_generation)] if self.by_generation else None


def run_history(
    store: RunStore, checkpoints: Sequence[Checkpoint] | None = None
) -> RunHypervolumes:
    """Each generation's front in the box of the last checkpoint, so the values compare across
    generations (and never go down: each front is an archive of the one before). Runs of
    older versions (their checkpoints recorded `hv_scales` box values) are recomputed the same
    way; a run whose checkpoints hold no front keeps the recorded values."""
    checkpoints = list(store.checkpoints() if checkpoints is None else checkpoints)
    if not checkpoints:
        return RunHypervolumes({}, None)
    evaluations = store.evaluations()
    fronts = [checkpoint_front(c, evaluations) for c in checkpoints]
    if any(f is None for f in fronts):
        recorded = {c.generation: c.stats.get("hypervolume") for c in checkpoints}
        return RunHypervolumes(
            {g: float(v) for g, v in recorded.items() if isinstance(v, (int, float))}, None
        )
    last = fronts[-1]
    assert last is not None
    box = run_box(last, reference_objectives(store, evaluations), stored_box_config(store))
    return RunHypervolumes(
        {
            c.generation: box.hypervolume(f) if f is not None and len(f) else 0.0
            for c, f in zip(checkpoints, fronts, strict=True)
        },
        box,
    )
