"""Comparing real (synthetic) runs: hypervolumes in one common box, recomputed here with
pymoo; domination shares; warnings when the runs were not measured alike."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pymoo.indicators.hv import HV

from evo_compress.runs import RunStore
from evo_compress.runs.compare import compare_runs, render_comparison
from evo_compress.runs.front import load_front
from evo_compress.testing import run_search as run


@pytest.fixture
def runs(config_factory, tmp_path) -> dict[str, Path]:
    """Two seeds of one setup, and a third whose evaluator models a smaller model on a dirtier
    grid: its recipes are faster and smaller but emit more, so the common box is neither run's
    own, and its fingerprint differs."""
    return {
        "a": run(config_factory(search={"seed": 1}), tmp_path / "a"),
        "b": run(config_factory(search={"seed": 2}), tmp_path / "b"),
        "c": run(
            config_factory(
                evaluator={"name": "synthetic", "settings": {"n_params_b": 3.0}},
                carbon={"grid_intensity_g_per_kwh": 2000.0},
            ),
            tmp_path / "c",
        ),
    }


def minimization_front(store: RunStore) -> np.ndarray:
    return np.array(
        [
            [-m.objectives["accuracy"]]
            + [m.objectives[k] for k in ("latency", "memory", "energy", "co2")]
            for m in load_front(store)
        ]
    )


def compare(x: Path, y: Path) -> dict[str, Any]:
    with RunStore.open(x) as a, RunStore.open(y) as b:
        return compare_runs(a, b)


def test_common_box_hypervolumes_match_pymoo_on_the_normalised_fronts(runs):
    result = compare(runs["a"], runs["c"])
    json.dumps(result)  # plain data, as `--format json` prints it
    with RunStore.open(runs["a"]) as a, RunStore.open(runs["c"]) as c:
        fronts = {"a": minimization_front(a), "b": minimization_front(c)}
        union = np.vstack(list(fronts.values()))
        ideal, nadir = union.min(axis=0), union.max(axis=0)
        hv = HV(ref_point=np.full(5, 1.1))
        for side, store in (("a", a), ("b", c)):
            expected = hv((fronts[side] - ideal) / (nadir - ideal))
            assert result[side]["hypervolume"] == pytest.approx(expected, rel=1e-12)
            # The own-box value is what the run's last checkpoint reported.
            last = store.last_checkpoint()
            assert last is not None
            assert result[side]["hypervolume_own"] == pytest.approx(
                last.stats["hypervolume"], rel=1e-12
            )
            assert result[side]["front_size"] == len(load_front(store))
    assert result["common_box"]["ideal"]["accuracy"] == pytest.approx(-ideal[0])
    assert result["common_box"]["nadir"]["co2"] == pytest.approx(nadir[4])
    assert result["reference_point"] == [1.1] * 5


def test_best_values_and_domination_shares(runs):
    result = compare(runs["a"], runs["b"])
    with RunStore.open(runs["a"]) as a, RunStore.open(runs["b"]) as b:
        fronts = {"a": load_front(a), "b": load_front(b)}
    for side, other in (("a", "b"), ("b", "a")):
        front = fronts[side]
        assert result[side]["best"]["accuracy"] == max(m.objectives["accuracy"] for m in front)
        for name in ("latency", "memory", "energy", "co2"):
            assert result[side]["best"][name] == min(m.objectives[name] for m in front)

        def dominates(p: dict[str, float], q: dict[str, float]) -> bool:
            better_or_equal = p["accuracy"] >= q["accuracy"] and all(
                p[k] <= q[k] for k in ("latency", "memory", "energy", "co2")
            )
            return better_or_equal and p != q

        count = sum(
            any(dominates(p.objectives, q.objectives) for p in fronts[other]) for q in front
        )
        assert result[side]["dominated"] == count
        assert result[side]["dominated_share"] == pytest.approx(count / len(front))
    assert result["warnings"] == []


def test_a_run_compared_with_itself(runs):
    result = compare(runs["a"], runs["a"])
    assert result["a"]["hypervolume"] == result["b"]["hypervolume"] > 0
    assert result["a"]["dominated"] == result["b"]["dominated"] == 0
    assert result["a"]["dominated_share"] == result["b"]["dominated_share"] == 0.0
    assert result["warnings"] == []


def test_warnings_when_the_runs_were_not_measured_alike(runs, config_factory, tmp_path):
    result = compare(runs["a"], runs["c"])
    assert len(result["warnings"]) == 1
    assert "fingerprints differ" in result["warnings"][0]
    text = render_comparison(result)
    assert "warning: the evaluators' fingerprints differ" in text

    other_model = run(
        config_factory(model={"id": "synthetic-13b"}, search={"seed": 1}), tmp_path / "m"
    )
    result = compare(runs["a"], other_model)
    joined = "\n".join(result["warnings"])
    assert "different models (`synthetic-7b` vs `synthetic-13b`)" in joined


def test_the_terminal_table_shows_both_runs(runs):
    result = compare(runs["a"], runs["b"])
    text = render_comparison(result)
    lines = text.splitlines()
    assert lines[0].split() == ["A:", "test", "B:", "test"]
    hv_line = next(line for line in lines if line.startswith("hypervolume (common box)"))
    assert f"{result['a']['hypervolume']:.6g}" in hv_line
    assert f"{result['b']['hypervolume']:.6g}" in hv_line
    share = next(line for line in lines if line.startswith("dominated by the other front"))
    assert f"{result['a']['dominated']} of {result['a']['front_size']}" in share
    assert "common box (both fronts' ideal..nadir): accuracy" in text
    assert "reference point 1.1" in text and "warning" not in text
