"""Surrogate-assisted pre-screening of offspring: spend real evaluations where they matter.

Each generation the engine breeds ``pool`` times more children than it will evaluate. A
Gaussian-process model of every objective and constraint, fitted on everything this run has
evaluated, predicts the candidates; the ``n`` with the best optimistic prediction (rank and
crowding of the lower confidence bound, feasibility first) are evaluated for real, the rest
are dropped unevaluated. The model is plain numpy and deterministic: the same history gives
the same choice, so resume and parallel evaluation keep giving the same front.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting
from scipy.linalg import cho_solve, cholesky, solve_triangular

from evo_compress.genomes import Recipe, SearchSpace
from evo_compress.genomes.genes import BoolGene, ChoiceGene, Gene, RangeGene

# Length scales tried (times sqrt of the feature count) and noise levels (of the standardised
# target's variance); the pair with the best marginal likelihood is used.
_LENGTH_SCALES = (0.1, 0.2, 0.35, 0.6, 1.0)
_NOISES = (1e-4, 1e-2, 1e-1)
_JITTER = 1e-8
_FAILURE_RISK = 0.3  # predicted failure above which a candidate counts as infeasible


# ---------------------------------------------------------------------- features
def _numeric_choices(gene: ChoiceGene) -> bool:
    return all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in gene.choices)


def _width(gene: Gene) -> int:
    if isinstance(gene, ChoiceGene) and not _numeric_choices(gene):
        return len(gene.choices)
    return 1


class RecipeEncoder:
    """A recipe as a point in [0, 1]^d: a range gene or numeric choice by its position, a bool
    as 0/1, any other choice one-hot. An inactive gene sits at its default."""

    def __init__(self, space: SearchSpace) -> None:
        self.genes: tuple[Gene, ...] = tuple(space.genes.values())
        self.width = sum(_width(g) for g in self.genes)
        self._rows: dict[str, np.ndarray] = {}  # by recipe hash: a run re-encodes its history
        # Per gene, worked out once: its column and how a value fills it. Screening encodes
        # hundreds of new candidates a generation, so the per-recipe work is a table look-up.
        self._columns: list[_Column] = []
        col = 0
        for gene in self.genes:
            if isinstance(gene, ChoiceGene):
                k = len(gene.choices)
                if _numeric_choices(gene):
                    order = sorted(range(k), key=lambda j: float(gene.choices[j]))
                    cells = [(0, order.index(j) / max(k - 1, 1)) for j in range(k)]
                else:
                    cells = [(j, 1.0) for j in range(k)]
                self._columns.append(_Column(gene, col, "choice", cells=cells))
            elif isinstance(gene, BoolGene):
                self._columns.append(_Column(gene, col, "bool"))
            elif isinstance(gene, RangeGene):
                self._columns.append(_Column(gene, col, "range"))
            col += _width(gene)  # an unknown gene type: no information, a constant column

    def __call__(self, recipes: Sequence[Recipe]) -> np.ndarray:
        X = np.zeros((len(recipes), self.width))
        for i, recipe in enumerate(recipes):
            row = self._rows.get(recipe.hash)
            if row is None:
                row = self._rows[recipe.hash] = self._encode(recipe)
            X[i] = row
        return X

    def _encode(self, recipe: Recipe) -> np.ndarray:
        x = np.zeros(self.width)
        for column in self._columns:
            gene = column.gene
            value = recipe.get(gene.name, gene.default)
            if column.kind == "choice":
                offset, cell = column.cells[column.index(value)]
                x[column.col + offset] = cell
            elif column.kind == "bool":
                x[column.col] = 1.0 if value else 0.0
            else:
                assert isinstance(gene, RangeGene)
                span = gene.high - gene.low
                x[column.col] = (float(value) - gene.low) / span if span > 0 else 0.5
        return x


class _Column:
    """Where one gene sits in the encoding; for a choice, the (offset, value) of each choice."""

    __slots__ = ("_lookup", "cells", "col", "gene", "kind")

    def __init__(
        self, gene: Gene, col: int, kind: str, cells: list[tuple[int, float]] | None = None
    ) -> None:
        self.gene = gene
        self.col = col
        self.kind = kind
        self.cells = cells or []
        self._lookup: dict[tuple[object, bool], int] = {}
        if isinstance(gene, ChoiceGene):
            for j, choice in reversed(list(enumerate(gene.choices))):  # the first match wins
                try:
                    if choice == choice:  # a NaN choice matches nothing, as in ``_index``
                        self._lookup[choice, isinstance(choice, bool)] = j
                except TypeError:
                    pass

    def index(self, value: object) -> int:
        """``_index(gene, value)``, by hash when the value allows it."""
        try:
            return self._lookup[value, isinstance(value, bool)]
        except (KeyError, TypeError):
            assert isinstance(self.gene, ChoiceGene)
            return _index(self.gene, value)


def _index(gene: ChoiceGene, value: object) -> int:
    for j, choice in enumerate(gene.choices):
        if choice == value and isinstance(choice, bool) == isinstance(value, bool):
            return j
    return 0


# ---------------------------------------------------------------------- the model
class GaussianProcess:
    """Exact GP regression, squared-exponential kernel shared by all outputs, each output
    standardised; length scale and noise chosen by the summed log marginal likelihood."""

    def fit(self, X: np.ndarray, Y: np.ndarray) -> GaussianProcess:
        self.X = np.asarray(X, dtype=float)
        Y = np.asarray(Y, dtype=float)
        self.mean = Y.mean(axis=0)
        self.scale = Y.std(axis=0)
        self.scale[self.scale <= 0] = 1.0
        Z = (Y - self.mean) / self.scale
        sq = _squared_distances(self.X, self.X)
        d = max(self.X.shape[1], 1)
        best: tuple[float, float, np.ndarray, np.ndarray] | None = None
        n = len(self.X)
        diagonal = np.arange(n)
        for ls in _LENGTH_SCALES:
            length = ls * np.sqrt(d)
            K0 = np.exp(-0.5 * sq / length**2)
            for noise in _NOISES:
                # K0 + noise * I without building I, in the column order LAPACK works in so
                # that the factorisation can overwrite it: the same numbers, fewer copies.
                K = np.array(K0, order="F")
                K[diagonal, diagonal] += noise + _JITTER
                try:
                    L = cholesky(K, lower=True, overwrite_a=True, check_finite=False)
                except np.linalg.LinAlgError:
                    continue
                alpha = _cho_solve(L, Z)
                # log p(Z) summed over outputs, up to a constant.
                fit = -0.5 * float(np.sum(Z * alpha)) - Z.shape[1] * float(
                    np.sum(np.log(np.diag(L)))
                )
                if best is None or fit > best[0]:
                    best = (fit, length, L, alpha)
        if best is None:  # cannot happen with the noise floor, but never crash a search
            length = np.sqrt(d)
            L = np.linalg.cholesky(np.exp(-0.5 * sq / length**2) + 0.1 * np.eye(n))
            best = (0.0, length, L, _cho_solve(L, Z))
        _, self.length, self.L, self.alpha = best
        return self

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation per row and output, in the outputs' own units."""
        Ks = np.exp(-0.5 * _squared_distances(np.asarray(X, dtype=float), self.X) / self.length**2)
        mean = Ks @ self.alpha
        v = solve_triangular(self.L, Ks.T, lower=True, check_finite=False)
        var = np.clip(1.0 - np.sum(v * v, axis=0), 0.0, None)
        std = np.sqrt(var)[:, None]
        return mean * self.scale + self.mean, std * self.scale


def _squared_distances(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    sq = np.sum(A * A, axis=1)[:, None] + np.sum(B * B, axis=1)[None, :] - 2.0 * A @ B.T
    return np.clip(sq, 0.0, None)


def _cho_solve(L: np.ndarray, Y: np.ndarray) -> np.ndarray:
    return cho_solve((L, True), Y, check_finite=False)


# ---------------------------------------------------------------------- screening
@dataclass(frozen=True)
class History:
    """What the run has measured: recipes, minimisation objectives (rows of failed evaluations
    are ignored for them), constraint values (<= 0 satisfied) and which evaluations failed."""

    recipes: Sequence[Recipe]
    F: np.ndarray
    G: np.ndarray  # constraint columns other than the failure one
    failed: np.ndarray  # bool per row


class Screening:
    """Choose which of many candidate children to evaluate for real."""

    def __init__(
        self, space: SearchSpace, exploration: float = 1.0, max_history: int = 400
    ) -> None:
        self.encode = RecipeEncoder(space)
        self.exploration = exploration
        self.max_history = max_history

    def choose(self, candidates: Sequence[Recipe], history: History, n: int) -> list[int]:
        """Indices of the ``n`` candidates to evaluate, in candidate order."""
        if len(candidates) <= n:
            return list(range(len(candidates)))
        F_opt, cv = self.predict(candidates, history)
        order = _rank_and_crowding(F_opt, cv)
        return sorted(order[:n])

    def predict(
        self, candidates: Sequence[Recipe], history: History
    ) -> tuple[np.ndarray, np.ndarray]:
        """Optimistic objectives (lower confidence bound, in the model's transformed units)
        and predicted constraint violation of each candidate."""
        Xc = self.encode(candidates)
        ok = ~history.failed
        keep = _recent(np.flatnonzero(ok), self.max_history)
        X = self.encode([history.recipes[i] for i in keep])
        targets = _transform(history.F[keep])
        outputs = np.hstack([targets, history.G[keep]]) if history.G.size else targets
        mean, std = GaussianProcess().fit(X, outputs).predict(Xc)
        m = targets.shape[1]
        F_opt = mean[:, :m] - self.exploration * std[:, :m]
        cv = np.clip(mean[:, m:], 0.0, None).sum(axis=1) if outputs.shape[1] > m else 0.0
        cv = np.asarray(cv, dtype=float) * np.ones(len(candidates))
        if history.failed.any():
            every = _recent(np.arange(len(history.failed)), self.max_history)
            Xa = self.encode([history.recipes[i] for i in every])
            outcome = history.failed[every, None].astype(float)
            p_fail, _ = GaussianProcess().fit(Xa, outcome).predict(Xc)
            # A wasted evaluation costs as much as a good one: a candidate the model gives a
            # fair chance of failing counts as infeasible.
            cv = cv + np.clip(p_fail[:, 0] - _FAILURE_RISK, 0.0, None)
        return F_opt, cv


def _recent(indices: np.ndarray, limit: int) -> np.ndarray:
    return indices[-limit:] if len(indices) > limit else indices


def _transform(F: np.ndarray) -> np.ndarray:
    """Objectives that are positive everywhere are modelled in log space (costs span orders
    of magnitude); a monotone map, so dominance is unchanged."""
    out = np.array(F, dtype=float)
    for j in range(out.shape[1]):
        column = out[:, j]
        if np.all(column > 0):
            out[:, j] = np.log(column)
    return out


def _rank_and_crowding(F: np.ndarray, cv: np.ndarray) -> list[int]:
    """All rows best first: feasible before infeasible (by violation), then by
    non-dominated front, then by crowding distance (largest first) within a front."""
    feasible = np.flatnonzero(cv <= 0)
    infeasible = np.flatnonzero(cv > 0)
    order: list[int] = []
    if len(feasible):
        fronts = NonDominatedSorting().do(F[feasible])
        for front in fronts:
            members = feasible[front]
            crowd = _crowding(F[members])
            order.extend(int(members[k]) for k in np.argsort(-crowd, kind="stable"))
    order.extend(int(i) for i in infeasible[np.argsort(cv[infeasible], kind="stable")])
    return order


def _crowding(F: np.ndarray) -> np.ndarray:
    """NSGA-II's crowding distance of one front. Not pymoo's ``calc_crowding_distance``: it
    orders some fronts differently, so the same history would choose other candidates. It
    gives no infinity for an objective that is equal across the front (this gives its first
    and last row one), and sums each side's gap on its own, so exact ties come apart in the
    last bit (``[[0.6, 1.9], [0.7, 1.4], [1.0, 0.7], [1.1, 0.2]]``: rows 1 and 2 tie here)."""
    n, m = F.shape
    if n <= 2:
        return np.full(n, np.inf)
    distance = np.zeros(n)
    for j in range(m):
        order = np.argsort(F[:, j], kind="stable")
        span = F[order[-1], j] - F[order[0], j]
        distance[order[0]] = distance[order[-1]] = np.inf
        if span <= 0:
            continue
        gaps = (F[order[2:], j] - F[order[:-2], j]) / span
        distance[order[1:-1]] += gaps
    return distance
