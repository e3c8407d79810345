"""Racing (multi-fidelity evaluation): measure a recipe's accuracy on the first few test items,
and finish the measurement only when the recipe can still reach the front.

The search passes a ``RaceRule`` with each evaluation: plain data (the front's objectives as
of the start of the generation, each with its accuracy's standard error, and ``z``), so the
decision is a pure function of what was measured and of the run's own state, and a resumed
run decides exactly as the uninterrupted one. The evaluator applies the recipe once, measures
everything on ``quick_limit`` items and asks ``RaceRule.stop``: when even the optimistic
accuracy is dominated by a front member, the quick result is returned as it is
(``metadata.stage: "quick"``); otherwise the remaining items are measured and the result is
the full one (``stage: "full"``), with the same accuracy a run without racing measures.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from evo_compress.fitness.noise import N_KEY, STDERR_KEY
from evo_compress.numeric import finite_float
from evo_compress.objectives import to_minimization

STAGE_KEY = "stage"  # metadata key: "quick" or "full"; absent on results of a run without racing
QUICK = "quick"
FULL = "full"


@dataclass(frozen=True)
class RaceMember:
    """One front member as the rule sees it: its minimisation objectives (``to_minimization``
    order) and its accuracy's standard error (0 when unknown)."""

    F: tuple[float, ...]
    stderr: float = 0.0


@dataclass(frozen=True)
class RaceRule:
    """When a quick measurement stops: ``quick_limit`` test items first; stop when a member of
    ``front`` dominates the quick result with its accuracy raised to the optimistic bound."""

    quick_limit: int
    z: float
    front: tuple[RaceMember, ...] = ()

    def __post_init__(self) -> None:
        assert self.quick_limit >= 1 and self.z >= 0, (self.quick_limit, self.z)

    def optimistic(self, accuracy: float, stderr: float | None, n: int | None) -> float:
        """The quick accuracy plus ``z`` standard errors; a zero or unknown stderr (every item
        right or wrong) is replaced by the Laplace-smoothed binomial one, so 0/50 does not
        claim certainty."""
        se = stderr if stderr is not None and stderr > 0 else None
        if se is None and n is not None and n >= 1:
            p = (accuracy * n + 1.0) / (n + 2.0)
            se = math.sqrt(p * (1.0 - p) / n)
        return accuracy + self.z * (se or 0.0)

    def stop(self, objectives: Mapping[str, float], metadata: Mapping[str, Any]) -> bool:
        """Whether the quick result cannot reach the front: some member is at least as good in
        every objective and better in one, even against accuracy + z * combined stderr (two
        accuracies within noise of each other are never decided on quick items)."""
        if not self.front:
            return False
        stderr = finite_float(metadata.get(STDERR_KEY))
        n = metadata.get(N_KEY)
        quick = to_minimization(objectives)
        for member in self.front:
            combined = math.hypot(stderr or 0.0, member.stderr)
            bound = self.optimistic(float(objectives["accuracy"]), combined or None, n)
            optimistic = quick.copy()
            optimistic[0] = -bound  # accuracy is maximised: index 0, sign flipped
            F = np.asarray(member.F, dtype=float)
            if bool(np.all(optimistic >= F) and np.any(optimistic > F)):
                return True
        return False

    def to_data(self) -> dict[str, Any]:
        return {
            "quick_limit": self.quick_limit,
            "z": self.z,
            "front": [{"F": list(m.F), "stderr": m.stderr} for m in self.front],
        }

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> RaceRule:
        front = tuple(
            RaceMember(tuple(float(v) for v in m["F"]), float(m["stderr"])) for m in data["front"]
        )
        return cls(int(data["quick_limit"]), float(data["z"]), front)


def quick_fingerprint(fingerprint: str, extra: Mapping[str, Any]) -> str:
    """The cache key of quick results: the evaluator's fingerprint plus the quick stage's
    parameters. A quick result is never served as a full one."""
    text = json.dumps({"fingerprint": fingerprint, QUICK: dict(extra)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def stage_of(metadata: Mapping[str, Any]) -> str:
    """The stage that produced a result: quick, or full (results of runs without racing)."""
    return QUICK if metadata.get(STAGE_KEY) == QUICK else FULL


def combine_means(
    parts: Sequence[tuple[float, int, float | None]],
) -> tuple[float, int, float | None]:
    """Mean, count and standard error of the concatenated items of ``parts`` (each a mean,
    its items and its standard error of the mean with the sample variance, lm-eval's
    ``mean_stderr``): what one run over all the items reports. The stderr is None when a part
    lacks one."""
    n = sum(k for _, k, _ in parts)
    total = sum(m * k for m, k, _ in parts)
    mean = total / n
    if n < 2 or any(se is None and k > 1 for _, k, se in parts):
        return mean, n, None
    # Sum of squares of each part from its mean and sample variance (se² k).
    squares = 0.0
    for m, k, se in parts:
        variance = (se or 0.0) ** 2 * k
        squares += (k - 1) * variance + k * m * m
    variance = max(0.0, (squares - n * mean * mean) / (n - 1))
    return mean, n, math.sqrt(variance / n)


__all__ = [
    "FULL",
    "QUICK",
    "STAGE_KEY",
    "RaceMember",
    "RaceRule",
    "combine_means",
    "quick_fingerprint",
    "stage_of",
]
