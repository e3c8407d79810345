"""The zoo benchmark's matrix on the two architectures with fused layouts (Phi-3, Mixtral):
every method cell is applied and measured or refused before loading; none fails."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("pymoo")

import bench_zoo


@pytest.mark.slow
def test_the_matrix_on_fused_layouts_has_no_failure():
    rows = bench_zoo.run_matrix(("phi3", "mixtral"))
    assert len(rows) == 2 * len(bench_zoo.cells(bench_zoo.SearchSpace.builtin()))
    failed = [(r["arch"], r["method"], r["reason"]) for r in rows if r["outcome"] == "failed"]
    assert not failed
    by = {(r["arch"], r["method"]): r for r in rows}
    assert by[("phi3", "awq")]["outcome"] == "refused"
    for method in ("structured_mlp", "structured_heads", "wanda 2:4", "lora", "nf4"):
        assert by[("phi3", method)]["outcome"] == "ok", method
        assert by[("mixtral", method)]["outcome"] == "ok", method
    experts = by[("mixtral", "int8_weight_only")]["experts"]
    assert experts["bytes_after"] == experts["bytes_before"] > 0
    table = bench_zoo.render(
        rows, {k: "x" for k in ("date", "cpu", "arch", "nproc", "threads")}, 1.0
    )
    assert "| structured_mlp | ok" in table and "expert KiB before" in table
