"""Helpers shared by the test suites (Optuna's ``optuna/testing`` plays the same role)."""

from __future__ import annotations

import numpy as np

from evo_compress.genomes import Recipe, SearchSpace

SEED_MAX = 2**32 - 1  # upper bound for seeds drawn by property tests


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def samples(space: SearchSpace, n: int, seed: int = 0) -> list[Recipe]:
    """``n`` recipes drawn from ``space`` with one generator seeded by ``seed``."""
    generator = rng(seed)
    return [space.sample(generator) for _ in range(n)]


def pins_except(space: SearchSpace, *free: str) -> dict[str, object]:
    """Pin every unconditional gene of ``space`` to its default except ``free``: a tiny space
    in which operators run out of new recipes quickly."""
    return {
        name: gene.default
        for name, gene in space.genes.items()
        if name not in free and not gene.active_if.clauses
    }
