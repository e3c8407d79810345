"""What counts as a number: one rule for genes, recipes and the run store's rows.

``bool`` is an ``int`` to Python but never a number here (``true`` in a recipe is a switch,
not 1), and numpy's scalars count as the numbers they hold. A run store also keeps inf and
nan as text, since JSON has neither: only readers of stored JSON pass ``text=True``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (Python's or numpy's), ``bool`` excluded."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any, *, text: bool = False) -> bool:
    """Whether ``value`` is an integer or a float (Python's or numpy's), ``bool`` excluded.

    Args:
        value: what to check.
        text: also accept a string that ``float`` reads ("inf", "nan", "1.5"): how stored
            JSON keeps the numbers it has no literal for. Off for recipes, where "1.5" is a
            choice's name, not a number.
    """
    if isinstance(value, str):
        if not text:
            return False
        try:
            float(value)
        except ValueError:
            return False
        return True
    return is_int(value) or isinstance(value, (float, np.floating))


def as_float(value: Any) -> float:
    """``float(value)``, with integers too large for a float mapped to +-inf."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def finite_float(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (``bool`` excluded), else None: for
    scores, standard errors and counts read from records, where NaN or a string means absent.
    """
    if is_number(value):
        number = as_float(value)
        if math.isfinite(number):
            return number
    return None
