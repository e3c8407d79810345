"""One rule for what counts as a number, with stored text as the only stated difference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evo_compress.numeric import as_float, is_int, is_number


@pytest.mark.parametrize("value", [0, -3, 10**30, np.int64(4), np.uint8(2)])
def test_integers_of_python_and_numpy_are_integers(value):
    assert is_int(value) and is_number(value)


@pytest.mark.parametrize("value", [True, False, np.bool_(True)])
def test_a_bool_is_never_a_number(value):
    assert not is_int(value) and not is_number(value) and not is_number(value, text=True)


@pytest.mark.parametrize("value", [1.5, math.inf, math.nan, np.float32(0.5)])
def test_floats_are_numbers_not_integers(value):
    assert is_number(value) and not is_int(value)


@pytest.mark.parametrize("value", ["inf", "nan", "-1.5", "2"])
def test_numeric_text_is_a_number_only_where_stored_json_is_read(value):
    assert not is_number(value)
    assert is_number(value, text=True)


@pytest.mark.parametrize("value", ["", "x", "1.5.2", None, [1], {"a": 1}])
def test_anything_else_is_not_a_number(value):
    assert not is_number(value) and not is_number(value, text=True)


def test_as_float_maps_integers_too_large_for_a_float_to_infinity():
    assert as_float(10**400) == math.inf and as_float(-(10**400)) == -math.inf
    assert as_float("2.5") == 2.5
