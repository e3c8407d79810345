"""How noisy a measured accuracy is: its standard error, where a record keeps it, and whether
two recipes' accuracies differ by more than that noise.

Every evaluation record of a real back end carries ``metadata["accuracy_stderr"]`` (the
standard error of the accuracy objective) and ``metadata["accuracy_n"]`` (the test items it
was measured on); the synthetic evaluator carries ``accuracy_stderr`` (its noise setting) and
no ``accuracy_n``. ``within_noise`` is what racing (adding items before deciding between two
close recipes) will use; for now the front table marks such pairs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from evo_compress.numeric import finite_float

STDERR_KEY = "accuracy_stderr"
N_KEY = "accuracy_n"


def binomial_stderr(p: float, n: int) -> float | None:
    """Standard error of a mean of ``n`` 0/1 scores whose mean is ``p``: sqrt(p(1-p)/(n-1)),
    which is what lm-eval's ``mean_stderr`` gives for such scores. None when ``n`` < 2 or
    ``p`` is no fraction."""
    if n < 2 or not (0.0 <= p <= 1.0):
        return None
    return math.sqrt(p * (1.0 - p) / (n - 1))


def accuracy_stderr(p: float, n: int, reported: float | None) -> tuple[float | None, str | None]:
    """The standard error of an accuracy ``p`` measured on ``n`` items and where it came
    from: lm-eval's own (``reported``; it is computed on the items scored, with ``limit``
    too, and for 0/1 metrics equals the binomial one) or, when lm-eval gives none, the
    binomial formula (for per-item scores in [0, 1] with mean p, p(1-p) bounds their
    variance, so it errs large, never small). ``(None, None)`` when neither applies."""
    if reported is not None and math.isfinite(reported) and reported >= 0:
        return float(reported), "lm-eval"
    binomial = binomial_stderr(p, n)
    if binomial is not None:
        return binomial, "binomial sqrt(p(1-p)/(n-1))"
    return None, None


@dataclass(frozen=True)
class AccuracyEstimate:
    """One recipe's accuracy with its standard error (None: unknown) and items (None: not a
    count of test items, e.g. the synthetic evaluator's noise)."""

    value: float
    stderr: float | None = None
    n: int | None = None

    @classmethod
    def of(cls, objectives: Mapping[str, float], metadata: Mapping[str, Any]) -> AccuracyEstimate:
        """The estimate a record holds: its accuracy objective and ``accuracy_stderr`` /
        ``accuracy_n`` from its metadata (ignored when not a finite non-negative number)."""
        stderr: Any = metadata.get(STDERR_KEY)
        n: Any = metadata.get(N_KEY)
        return cls(
            float(objectives["accuracy"]),
            float(stderr) if finite_float(stderr) is not None and stderr >= 0 else None,
            int(n) if finite_float(n) is not None and float(n).is_integer() and n >= 1 else None,
        )

    def text(self, digits: int = 3) -> str:
        """``0.936 ± 0.015`` where the stderr is known, else the accuracy alone."""
        if self.stderr is None:
            return f"{self.value:.{digits}f}"
        return f"{self.value:.{digits}f} ± {self.stderr:.{digits}f}"


def within_noise(a: AccuracyEstimate, b: AccuracyEstimate, z: float = 2.0) -> bool:
    """Whether two accuracies differ by less than ``z`` combined standard errors,
    |a - b| < z * sqrt(se_a² + se_b²): the search cannot tell which is better from these
    measurements. False when either stderr is unknown (nothing says they are close)."""
    if z < 0:
        raise ValueError(f"`z` must be >= 0, got {z}")
    if a.stderr is None or b.stderr is None:
        return False
    return abs(a.value - b.value) < z * math.hypot(a.stderr, b.stderr)


def pairs_within_noise(
    estimates: Sequence[tuple[int, AccuracyEstimate]], z: float = 2.0
) -> list[tuple[int, int]]:
    """The (id, id) pairs of ``estimates`` whose accuracies are within noise, in input order."""
    return [
        (ia, ib)
        for i, (ia, a) in enumerate(estimates)
        for ib, b in estimates[i + 1 :]
        if within_noise(a, b, z)
    ]
