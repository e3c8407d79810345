"""Adaptive operator selection: which of several operators makes the next child, with chances
that follow the credit each operator's children earned (probability matching, Thierens 2005).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import numpy as np

from evo_compress.exceptions import OperatorError

Method = Literal["fixed", "probability-matching"]


class AdaptiveSelector:
    """Chooses among a list of operators; probabilities adapt from credit (probability
    matching, Thierens 2005) within bounds.

    ``fixed`` keeps the configured weights. ``probability-matching`` keeps a quality ``q_i``
    per operator, starting at the normalised weights; at the end of each generation an operator
    used in it moves its quality towards its mean reward there by ``learning_rate``, and picks
    follow ``p_i = p_min + (1 - K p_min) q_i / sum(q)``, so no operator drops below
    ``min_prob`` and the rest is shared by quality.
    """

    def __init__(
        self,
        labels: Sequence[str],
        weights: Sequence[float],
        method: Method = "fixed",
        min_prob: float = 0.05,
        learning_rate: float = 0.3,
    ) -> None:
        labels = list(labels)
        if not labels:
            raise OperatorError("`labels` must name at least one operator, got none")
        if len(set(labels)) != len(labels):
            duplicates = sorted({label for label in labels if labels.count(label) > 1})
            raise OperatorError(f"`labels` must be unique, got {duplicates} more than once")
        if len(weights) != len(labels):
            raise OperatorError(
                f"`weights` must have one weight per label ({len(labels)}), got {len(weights)}"
            )
        for i, w in enumerate(weights):
            if not (isinstance(w, (int, float)) and not isinstance(w, bool)) or not (
                math.isfinite(w) and w > 0
            ):
                raise OperatorError(f"`weights[{i}]` must be a finite number > 0, got {w!r}")
        if method not in get_args(Method):
            known = list(get_args(Method))
            raise OperatorError(f"`method` must be one of {known}, got {method!r}")
        k = len(labels)
        if not (math.isfinite(min_prob) and 0.0 <= min_prob <= 1.0 / k):
            raise OperatorError(
                f"`min_prob` must be in [0, 1/{k}] for {k} operators, got {min_prob}"
            )
        if not (math.isfinite(learning_rate) and 0.0 < learning_rate <= 1.0):
            raise OperatorError(f"`learning_rate` must be in (0, 1], got {learning_rate}")
        self.labels: tuple[str, ...] = tuple(labels)
        self.method: Method = method
        self.min_prob = float(min_prob)
        self.learning_rate = float(learning_rate)
        self._weights = np.array(weights, dtype=float)
        self._q = self._weights / self._weights.sum()
        self._reward_sum = np.zeros(k)
        self._reward_count = np.zeros(k, dtype=int)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def quality(self) -> np.ndarray:
        """A copy of the qualities ``q``."""
        return self._q.copy()

    def probabilities(self) -> np.ndarray:
        k = len(self.labels)
        if self.method == "fixed":
            return self._weights / self._weights.sum()
        if k == 1:
            return np.ones(1)
        p_min = min(self.min_prob, 1.0 / k)
        total = self._q.sum()
        share = self._q / total if total > 0 else np.full(k, 1.0 / k)
        p = p_min + (1.0 - k * p_min) * share
        return p / p.sum()

    def pick(self, rng: np.random.Generator) -> int:
        """An operator index; a single operator consumes no randomness."""
        k = len(self.labels)
        return 0 if k == 1 else int(rng.choice(k, p=self.probabilities()))

    def credit(self, index: int, reward: float) -> None:
        """Add ``reward`` (>= 0) earned by a child of operator ``index`` this generation."""
        if not 0 <= index < len(self.labels) or isinstance(index, bool):
            raise OperatorError(
                f"operator index must be in [0, {len(self.labels)}), got {index!r}"
            )
        if not (math.isfinite(reward) and reward >= 0):
            raise OperatorError(
                f"reward of operator `{self.labels[index]}` must be a finite number >= 0, "
                f"got {reward}"
            )
        self._reward_sum[index] += float(reward)
        self._reward_count[index] += 1

    def update(self) -> None:
        """End of a generation: used operators move their quality towards their mean reward;
        unused ones keep it. Clears the generation's rewards (also for ``fixed``)."""
        if self.method == "probability-matching":
            used = self._reward_count > 0
            mean = np.divide(
                self._reward_sum, self._reward_count, out=np.zeros_like(self._q), where=used
            )
            lr = self.learning_rate
            self._q = np.where(used, (1.0 - lr) * self._q + lr * mean, self._q)
        self._reward_sum = np.zeros(len(self.labels))
        self._reward_count = np.zeros(len(self.labels), dtype=int)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Plain JSON: the labels, the qualities and this generation's rewards so far."""
        return {
            "labels": list(self.labels),
            "q": [float(x) for x in self._q],
            "reward_sum": [float(x) for x in self._reward_sum],
            "reward_count": [int(x) for x in self._reward_count],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        labels = list(state.get("labels", []))
        if labels != list(self.labels):
            raise OperatorError(
                f"saved operator selection is for operators {labels}, but the config has "
                f"{list(self.labels)}; resume with the same operators (and labels) in order"
            )
        k = len(self.labels)
        try:
            q = np.array(state["q"], dtype=float)
            reward_sum = np.array(state["reward_sum"], dtype=float)
            reward_count = np.array(state["reward_count"], dtype=int)
        except (KeyError, TypeError, ValueError) as exc:
            raise OperatorError(f"saved operator selection state is malformed: {exc}") from None
        if not all(a.shape == (k,) for a in (q, reward_sum, reward_count)):
            raise OperatorError(
                f"saved operator selection state must hold {k} values per list, got "
                f"{[len(np.atleast_1d(a)) for a in (q, reward_sum, reward_count)]}"
            )
        if not (np.isfinite(q).all() and (q >= 0).all()):
            raise OperatorError(f"saved operator qualities must be finite and >= 0, got {q}")
        self._q = q
        self._reward_sum = reward_sum
        self._reward_count = reward_count
