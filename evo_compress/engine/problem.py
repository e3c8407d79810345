"""The recipe problem as pymoo sees it: five minimised objectives and constraint values
(<= 0 is satisfied), with a failed evaluation graded by how far past its limit it went."""

from __future__ import annotations

from typing import Any

import numpy as np
from pymoo.core.population import Population
from pymoo.core.problem import Problem

from evo_compress.config import ConstraintsConfig
from evo_compress.fitness import EvaluationResult
from evo_compress.fitness._base import limit_excess
from evo_compress.objectives import (
    OBJECTIVES,
    Constraint,
    constrained_values,
    constraint_of,
    to_minimization,
)

# A failed or infeasible evaluation gets at least this constraint violation (it loses every
# comparison with a success) and placeholder objectives pymoo never reads: survival ranks
# infeasible individuals by violation alone. Neither number is ever reported.
FAILURE_VIOLATION = 1e3
_PLACEHOLDER_F = 1e12


def failure_violation(result: EvaluationResult) -> float:
    """The violation of a failed evaluation: ``FAILURE_VIOLATION`` x (1 + how far past its
    limit it went) when the record says (out of memory by 10% -> 1100), so that among
    failures survival leans towards the near misses; ``FAILURE_VIOLATION`` otherwise. A
    function of the stored record only: a resumed run computes the same values."""
    excess = limit_excess(result)
    return FAILURE_VIOLATION if excess is None else FAILURE_VIOLATION * (1.0 + excess)


class RecipeProblem(Problem):
    """Five objectives, constraints; X holds recipe hashes. Evaluation happens outside pymoo."""

    def __init__(self, n_constraints: int) -> None:
        super().__init__(n_var=1, n_obj=len(OBJECTIVES), n_ieq_constr=n_constraints, vtype=object)


class Constraints:
    """The constraint row of a result: a failure's violation first, then one relative value
    per active limit of the config's `constraints` section (one per task of
    `max_task_drop`)."""

    def __init__(self, config: ConstraintsConfig) -> None:
        self.limits = config.active()
        self.names = list(self.limits)
        self._constraints: dict[str, Constraint] = {}
        for name in self.names:
            constraint = constraint_of(name)
            assert constraint is not None, f"{name}: the config schema lets no other key in"
            self._constraints[name] = constraint
        # The uncompressed baseline's result: what `max_accuracy_drop` and `max_task_drop`
        # are measured against.
        self.reference: EvaluationResult | None = None

    @property
    def needs_reference(self) -> bool:
        """Whether a limit is a drop from the baseline (then the baseline must succeed)."""
        return any(c.is_drop for c in self._constraints.values())

    @property
    def tasks(self) -> list[str]:
        """The tasks of `max_task_drop`, whose scores every success must record."""
        return [c.task for c in self._constraints.values() if c.task is not None]

    def __len__(self) -> int:
        return 1 + len(self.names)

    def of(self, result: EvaluationResult) -> np.ndarray:
        """<= 0 is satisfied. Limits are relative (violation / limit) so none dominates."""
        g = np.zeros(1 + len(self.names))
        if not result.ok or result.objectives is None:
            g[0] = failure_violation(result)
            return g
        reference = None
        if self.reference is not None and self.reference.objectives is not None:
            reference = constrained_values(self.reference.objectives, self.reference.metadata)
        values = constrained_values(result.objectives, result.metadata)
        for i, name in enumerate(self.names, start=1):
            constraint = self._constraints[name]
            violation = constraint.violation(values, self.limits[name], reference)
            if violation is None and constraint.is_task:
                # A success whose record lacks the task's score (the baseline's was checked
                # when it was measured): nothing shows it meets the limit, so it ranks with
                # the failures.
                violation = FAILURE_VIOLATION
            assert violation is not None, f"{name}: no value (the baseline is measured first)"
            g[i] = violation
        return g


def objectives_of(result: EvaluationResult) -> np.ndarray:
    """The minimisation vector of a result (placeholders for a failure, never read)."""
    if not result.ok or result.objectives is None:
        return np.full(len(OBJECTIVES), _PLACEHOLDER_F)
    return to_minimization(result.objectives)


def set_fitness(pop: Population, F: np.ndarray, G: np.ndarray) -> None:
    F = F.reshape(len(pop), len(OBJECTIVES))
    G = G.reshape(len(pop), -1)
    cv = np.maximum(G, 0.0).sum(axis=1)
    pop.set("F", F, "G", G, "H", np.zeros((len(pop), 0)), "CV", cv[:, None])
    for ind in pop:
        ind.evaluated = {"F", "G", "H", "CV"}


def fitness(ind: Any) -> tuple[np.ndarray, float]:
    """A population member's (F, CV)."""
    return np.asarray(ind.get("F"), dtype=float), float(ind.get("CV")[0])
