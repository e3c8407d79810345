"""Operator credit: how much each child's operators earned, for adaptive operator selection
and the run store's `credits` table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pymoo.core.population import Population

from evo_compress.engine.archive import Archive
from evo_compress.engine.problem import fitness
from evo_compress.operators import AdaptiveSelector
from evo_compress.operators._base import Operator


def credit(
    offspring: Population | None,
    generation: int,
    hv_total: float,
    archive: Archive,
    selectors: Mapping[str, AdaptiveSelector],
    operators: Mapping[str, Sequence[Operator]],
) -> list[dict[str, Any]]:
    """Credit each child's operators: it dominates a parent, it entered the front, the
    share of the front's hypervolume (``hv_total``) only it covers. The reward,
    (dominated + entered) / 2 + share, feeds adaptive operator selection; an operator that
    fell back earns 0. Returns the rows for the run store; the selectors are updated."""
    rows = []
    # The hypervolume share costs one hypervolume per child on the front; it is worked
    # out only when a selector has a choice to learn (recorded as null otherwise).
    with_share = any(len(s) > 1 and s.method != "fixed" for s in selectors.values())
    front_ids = archive.ids()
    # Exclusive contributions in the box of this generation: computed from the front and
    # the reference alone, so a resumed run credits exactly as the uninterrupted one.
    exclusive: dict[int, float] = {}
    if with_share and front_ids and hv_total > 0:
        contributions = archive.box.contributions(archive.F())
        exclusive = dict(zip(front_ids, contributions.tolist(), strict=True))
    for ind in offspring if offspring is not None else []:
        credited = ind.get("credited")
        if credited is None:  # the first generation: no operator made it
            continue
        ident = int(ind.get("iid"))
        mine = fitness(ind)
        feasible = mine[1] <= 0
        dominated = feasible and any(dominates(mine, p) for p in ind.get("parent_fitness"))
        entered = ident in archive
        contribution: float | None = None
        share = 0.0
        if with_share:
            contribution = 0.0
            if entered and ident in exclusive:
                contribution = max(exclusive[ident], 0.0)
                share = contribution / hv_total
        reward = (float(dominated) + float(entered)) / 2 + share
        for kind, index, fell_back in credited:
            selectors[kind].credit(index, 0.0 if fell_back else reward)
        rows.append(
            {
                "individual_id": ident,
                "generation": generation,
                "operators": [
                    ("fallback:" if fell_back else "") + operators[kind][index].label
                    for kind, index, fell_back in credited
                ],
                "feasible": int(feasible),
                "dominated_parent": int(dominated),
                "entered_front": int(entered),
                "hv_contribution": contribution,
                "reward": reward,
            }
        )
    for selector in selectors.values():
        selector.update()
    return rows


def dominates(a: tuple[np.ndarray, float], b: tuple[np.ndarray, float]) -> bool:
    """Constrained domination (Deb): feasible beats infeasible, less violation beats more,
    among feasible ones Pareto dominance."""
    (fa, cva), (fb, cvb) = a, b
    if cva > 0 or cvb > 0:
        return cva < cvb
    return bool(np.all(fa <= fb) and np.any(fa < fb))
