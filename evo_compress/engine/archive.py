"""The run's front (every feasible recipe no evaluated recipe dominates, over all
generations) and the hypervolume box it is measured in (``runs.hypervolume``, which
``compare`` and the reports use too)."""

from __future__ import annotations

import numpy as np
from pymoo.core.population import Population
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from evo_compress.config import HypervolumeConfig
from evo_compress.exceptions import RunStoreError
from evo_compress.fitness import EvaluationResult
from evo_compress.objectives import OBJECTIVES, to_minimization
from evo_compress.runs.hypervolume import Box, run_box
from evo_compress.runs.store import RunStore


class Archive:
    """Individual id -> minimisation F of the front, and the box of the last completed
    generation: its front's and the baseline reference's ideal and nadir, with the corners
    the config's `hypervolume` section fixes. Stats and operator credit are measured in it."""

    def __init__(self, config: HypervolumeConfig) -> None:
        self.config = config
        self.front: dict[int, np.ndarray] = {}
        self.box = Box.of([], config)

    def __len__(self) -> int:
        return len(self.front)

    def __contains__(self, ident: int) -> bool:
        return ident in self.front

    def ids(self) -> list[int]:
        return sorted(self.front)

    def F(self) -> np.ndarray:
        return np.array([self.front[i] for i in sorted(self.front)])

    def update(self, offspring: Population | None) -> None:
        """Add the feasible ``offspring`` and keep the non-dominated (not just the survivors,
        which truncation may thin out)."""
        candidates = dict(self.front)
        for ind in offspring if offspring is not None else []:
            if ind.get("CV")[0] <= 0:
                candidates[int(ind.get("iid"))] = np.asarray(ind.get("F"), dtype=float)
        if not candidates:
            self.front = {}
            return
        ids = sorted(candidates)
        F = np.array([candidates[i] for i in ids])
        first = NonDominatedSorting().do(F, only_non_dominated_front=True)
        self.front = {ids[int(i)]: F[int(i)] for i in sorted(first)}

    def restore(self, ids: list[int], store: RunStore, generation: int) -> None:
        """The front a checkpoint names, from the stored evaluations."""
        self.front = {}
        for ident in ids:
            evaluation = store.evaluation(ident)
            if evaluation is None or evaluation.result.objectives is None:
                raise RunStoreError(
                    f"{store.run_dir}: checkpoint {generation}'s front names "
                    f"individual {ident} without a successful evaluation; the store is damaged"
                )
            self.front[ident] = to_minimization(evaluation.result.objectives)

    def update_box(self, reference: EvaluationResult | None) -> None:
        """The box of this moment, from the front and the baseline ``reference``."""
        front = self.F().reshape(-1, len(OBJECTIVES))
        ref = None
        if reference is not None and reference.objectives is not None:
            ref = to_minimization(reference.objectives)
        self.box = run_box(front, ref, self.config)

    def hypervolume(self, F: np.ndarray | None = None) -> float:
        """Hypervolume of minimisation-space points (default: the front) in the box
        (normalised to [0, 1], reference point 1.1)."""
        if F is None:
            return self.box.hypervolume(self.F()) if self.front else 0.0
        return self.box.hypervolume(F)
