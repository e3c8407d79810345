"""The five objectives every evaluation returns, with units and directions.

pymoo minimises, so ``to_minimization`` flips maximised objectives; everything the user sees
(store, tables, JSON) keeps the natural sign.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class Objective:
    name: str
    unit: str
    direction: Literal["max", "min"]
    doc: str

    @property
    def sign(self) -> float:
        return -1.0 if self.direction == "max" else 1.0


OBJECTIVES: tuple[Objective, ...] = (
    Objective("accuracy", "fraction", "max", "task metric of the compressed model (0..1)"),
    Objective("latency", "ms/token", "min", "median time per output token while serving"),
    Objective("memory", "MiB", "min", "peak device memory while serving"),
    Objective("energy", "J/1k tokens", "min", "energy per 1,000 generated tokens"),
    Objective(
        "co2",
        "g CO2e/1k tokens",
        "min",
        "emissions per 1,000 generated tokens, one-time compression CO2 amortised in",
    ),
)
OBJECTIVE_NAMES: tuple[str, ...] = tuple(o.name for o in OBJECTIVES)


def check_objectives(values: Mapping[str, float]) -> dict[str, float]:
    """Five named finite floats, in canonical order; raises ValueError otherwise."""
    missing = [n for n in OBJECTIVE_NAMES if n not in values]
    extra = [n for n in values if n not in OBJECTIVE_NAMES]
    if missing or extra:
        raise ValueError(
            f"objectives must be exactly {list(OBJECTIVE_NAMES)}; "
            f"missing {missing}, unexpected {extra}"
        )
    out = {}
    for name in OBJECTIVE_NAMES:
        value = float(values[name])
        if not math.isfinite(value):
            raise ValueError(f"objective `{name}` is not finite: {value}")
        out[name] = value
    return out


def to_minimization(values: Mapping[str, float]) -> np.ndarray:
    return np.array([o.sign * float(values[o.name]) for o in OBJECTIVES], dtype=float)


def from_minimization(row: np.ndarray) -> dict[str, float]:
    return {o.name: float(o.sign * v) for o, v in zip(OBJECTIVES, row, strict=True)}
