"""Every built-in compression method passes the method contract on every back end that
claims it (``evo_compress.testing.methods``); the toy plugin's method passes the same
contract in ``tests/test_plugins.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from evo_compress.methods import METHODS
from evo_compress.registry import BUILTIN
from evo_compress.testing.methods import check_method, method_cases

BUILTINS = [m.name for m in METHODS if METHODS.origin(m.name) == BUILTIN]


@pytest.mark.parametrize(("method", "backend"), method_cases(BUILTINS))
def test_every_builtin_method_passes_the_contract(
    method: str, backend: str, tmp_path: Path
) -> None:
    if backend == "transformers":
        pytest.importorskip("torchao")
        pytest.importorskip("bitsandbytes")
    skipped = check_method(method, backend, tmp_path)
    if skipped is not None:
        pytest.skip(skipped)


def test_the_contract_catches_a_method_that_lies_about_its_bits(tmp_path: Path) -> None:
    from dataclasses import replace

    pytest.importorskip("torchao")
    int8 = METHODS.get("int8_weight_only")
    with pytest.raises(AssertionError, match="bits"):
        check_method(replace(int8, weight_bits=4), "transformers", tmp_path)
