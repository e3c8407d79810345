"""The quality benchmark's pieces at a tiny size (one seed, 30 evaluations), so it cannot rot."""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

optuna = pytest.importorskip("optuna", reason="the `bench` extra is not installed")

import bench_quality as bq  # noqa: E402
import landscapes  # noqa: E402
from bench_engine import run_engine  # noqa: E402
from recipe_encoding import decode, encode  # noqa: E402

from evo_compress.app import checked_config  # noqa: E402
from evo_compress.exceptions import ConfigError  # noqa: E402
from evo_compress.fitness import EVALUATORS, EvaluationContext  # noqa: E402
from evo_compress.genomes import SearchSpace  # noqa: E402
from evo_compress.testing import SEED_MAX, samples  # noqa: E402

BUDGET = 30
DTLZ2 = next(ls for ls in bq.LANDSCAPES if ls.name == "dtlz2")


@pytest.fixture(autouse=True)
def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, SEED_MAX))
def test_decode_reads_back_what_encode_wrote(seed: int) -> None:
    space = SearchSpace.builtin()
    for recipe in samples(space, 5, seed):
        x = encode(recipe, space)
        assert np.all((x >= 0) & (x <= 1))
        assert space.repair(decode(x, space), np.random.default_rng(seed)) == recipe


def test_dtlz2_objectives_lie_on_the_sphere_of_the_distance_variables() -> None:
    """Undo the affine maps: f_1^2 + ... + f_5^2 = (1 + g)^2, g from the distance genes."""
    space = SearchSpace.builtin()
    evaluator = landscapes.DTLZ2Evaluator({}, EvaluationContext())
    position = set(landscapes.DEFAULT_POSITION_GENES)
    for recipe in samples(space, 50, seed=1):
        result = evaluator.evaluate(recipe, space)
        assert result.ok and result.objectives is not None
        assert evaluator.evaluate(recipe, space).objectives == result.objectives
        f = [
            (result.objectives[name] - offset) / slope
            for name, (offset, slope) in landscapes._OFFSET_SLOPE.items()
        ]
        x = dict(zip(space.genes, encode(recipe, space), strict=True))
        g = sum((x[name] - 0.5) ** 2 for name in space.genes if name not in position)
        assert min(f) >= 0
        assert math.fsum(v * v for v in f) == pytest.approx((1 + g) ** 2)


def test_dtlz2_is_a_registered_evaluator_with_checked_settings(tmp_path: Path) -> None:
    assert "dtlz2" in EVALUATORS
    bad = {"position_genes": ["quant.method", "prune.method", "serve.max_num_seqs", "nope"]}
    with pytest.raises(ConfigError, match="nope"):
        checked_config(
            {
                "evaluator": {"name": "dtlz2", "settings": bad},
                "output": {"runs_root": str(tmp_path)},
            }
        )


def test_constraint_rows_match_the_engine() -> None:
    """The engine's own front (its hypervolume) is what the benchmark's feasibility gives
    over the same evaluations."""
    engine = run_engine(8, 4, 0, **DTLZ2.config_options())
    space, evaluator = bq.make_space_and_evaluator(**DTLZ2.config_options())
    constraints = bq.Constraints.of(DTLZ2, space, evaluator)
    front, feasible = bq.feasible_front(engine.results, constraints)
    assert 0 < feasible < len(engine.results)  # the constraints cut on this landscape
    assert engine.hypervolume(front) == pytest.approx(engine.stats[-1].hypervolume)


def test_every_method_runs_and_is_scored_in_one_box() -> None:
    cells = bq.measure([BUDGET], 1)
    assert [(c.landscape, c.budget) for c in cells] == [(ls.name, BUDGET) for ls in bq.LANDSCAPES]
    for cell in cells:
        assert set(cell.runs) == set(bq.METHODS)
        assert all(run.evaluations == BUDGET for runs in cell.runs.values() for run in runs)
        assert cell.box is not None and np.all(cell.box.ideal <= cell.box.nadir)
        for values in cell.hypervolumes.values():
            assert all(0 <= v <= bq.REFERENCE_POINT**5 for v in values)
        rows = bq.summarise(cell)
        assert [r.method for r in rows] == list(bq.METHODS)
        assert rows[0].p_value is None and all(0 <= r.p_value <= 1 for r in rows[1:])
        tpe = next(r for r in rows if r.method == bq.TPE)
        assert tpe.vs_tpe == pytest.approx(1.0) or math.isnan(tpe.vs_tpe)
    text = bq.render(bq.machine_info(), cells, 1, 1.0, smoke=True)
    assert "Smoke run" in text
    assert all(name in text for name in bq.METHODS)


def test_quick_run_writes_only_where_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bq, "QUICK_BUDGETS", (BUDGET,))
    written: list[Path] = []
    write_section = bq.write_section

    def record(name: str, body: str, path: Path) -> None:
        written.append(path)
        write_section(name, body, path)

    monkeypatch.setattr(bq, "write_section", record)
    assert bq.main(["--quick", "--seeds", "1"]) == 0
    assert written == []
    out = tmp_path / "BENCHMARKS.md"
    assert bq.main(["--quick", "--seeds", "1", "--out", str(out)]) == 0
    assert written == [out]
    text = out.read_text()
    assert "<!-- quality:start -->" in text and "Smoke run" in text
