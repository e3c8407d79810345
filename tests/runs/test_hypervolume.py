"""The hypervolume box (runs/hypervolume.py): normalisation and indicator checked against
pymoo, a run's observed box, a user-set box, old runs, resume, and the signal it gives
`compare` and the adaptive operator credit on real (synthetic) runs."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pymoo.indicators.hv import HV

from evo_compress.app import resume_search
from evo_compress.config import HypervolumeConfig
from evo_compress.exceptions import ConfigError
from evo_compress.objectives import to_minimization
from evo_compress.runs import RunStore
from evo_compress.runs.analysis import history
from evo_compress.runs.compare import compare_runs
from evo_compress.runs.front import load_front, run_status
from evo_compress.runs.hypervolume import REFERENCE_POINT, Box, run_history
from evo_compress.runs.store import DB_NAME
from evo_compress.testing import invoke_cli, run_search

ADAPTIVE = {
    "operators": {
        "mutation": [{"name": "gene"}, {"name": "expert"}],
        "adaptive": {"method": "probability-matching"},
    }
}


def raw(run_dir: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(run_dir / DB_NAME)
    try:
        rows = db.execute(sql, args).fetchall()
        db.commit()
        return rows
    finally:
        db.close()


def points(seed: int, n: int = 30) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform([-0.9, 1, 100, 10, 0.01], [-0.3, 50, 20000, 900, 0.3], size=(n, 5))


# ---------------------------------------------------------------------- the box itself
def test_box_normalises_ideal_to_zero_nadir_to_one_and_matches_pymoo():
    F = points(0)
    box = Box.of([F])
    assert np.allclose(box.normalize(box.ideal), 0) and np.allclose(box.normalize(box.nadir), 1)
    expected = HV(ref_point=np.full(5, 1.1))((F - F.min(axis=0)) / np.ptp(F, axis=0))
    assert box.hypervolume(F) == pytest.approx(expected, rel=1e-12)
    assert Box.of([F]).hypervolume(box.ideal) == pytest.approx(REFERENCE_POINT**5)
    assert box.hypervolume(box.nadir) == pytest.approx(0.1**5)
    assert box.hypervolume(box.nadir + 1e6) == 0.0 == box.hypervolume(np.zeros((0, 5)))


def test_contributions_are_what_the_front_loses_without_each_point():
    F = points(1, 12)
    box = Box.of([F])
    total = box.hypervolume(F)
    for i, contribution in enumerate(box.contributions(F)):
        alone = total - box.hypervolume(np.delete(F, i, axis=0))
        assert contribution == pytest.approx(alone, rel=1e-9, abs=1e-12)


def test_fixed_corners_replace_the_observed_ones_in_natural_units():
    F = points(2)
    fixed = HypervolumeConfig.model_validate(
        {"ideal": {"accuracy": 0.95}, "nadir": {"latency": 100.0, "co2": 1.0}}
    )
    box = Box.of([F], fixed)
    data = box.to_data()
    assert data["ideal"]["accuracy"] == 0.95 and data["nadir"]["latency"] == 100.0
    assert data["nadir"]["co2"] == 1.0
    assert data["ideal"]["memory"] == pytest.approx(F[:, 2].min())
    assert data["nadir"]["accuracy"] == pytest.approx(-F[:, 0].max())
    again = Box.from_data(data)
    assert np.allclose(again.ideal, box.ideal) and np.allclose(again.nadir, box.nadir)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"ideal": {"latency": 9}, "nadir": {"latency": 3}}, "`hypervolume.nadir` `latency`"),
        ({"ideal": {"accuracy": 0.5}, "nadir": {"accuracy": 0.7}}, "`accuracy` must be below"),
        ({"ideal": {"latncy": 1}}, "unknown key `hypervolume.ideal.latncy`"),
        ({"nadir": {"accuracy": 2}}, "`hypervolume.nadir.accuracy` must be <= 1"),
    ],
)
def test_a_bad_box_in_the_config_names_the_field(config_factory, section, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        config_factory(hypervolume=section)


# ---------------------------------------------------------------------- a run's box
def test_checkpoints_record_the_box_of_their_moment(config_factory, tmp_path):
    run = run_search(config_factory(), tmp_path / "run")
    with RunStore.open(run) as store:
        evaluations = store.evaluations()
        reference = store.individual_at(-1, 0)
        assert reference is not None
        base = to_minimization(evaluations[reference.id].result.objectives)
        for checkpoint in store.checkpoints():
            front = np.array(
                [
                    to_minimization(evaluations[i].result.objectives)
                    for i in checkpoint.algorithm_state["archive"]
                ]
            )
            corners = np.vstack([front, base])
            box = Box.from_data(checkpoint.stats["hv_box"])
            assert np.allclose(box.ideal, corners.min(axis=0))
            assert np.allclose(box.nadir, corners.max(axis=0))
            assert checkpoint.stats["hypervolume"] == pytest.approx(box.hypervolume(front))
        assert store.get_meta("hv_scales", None) is None
        assert store.get_meta("hv_box")["reference_point"] == REFERENCE_POINT


def test_a_user_box_is_honoured_by_the_run_history_and_compare(config_factory, tmp_path):
    section = {
        "ideal": {"accuracy": 0.9, "latency": 0.0, "memory": 0.0, "energy": 0.0, "co2": 0.0},
        "nadir": {"accuracy": 0.3, "latency": 200, "memory": 40000, "energy": 3000, "co2": 1},
    }
    runs = [
        run_search(config_factory(hypervolume=section, search={"seed": s}), tmp_path / str(s))
        for s in (1, 2)
    ]
    ideal = to_minimization(section["ideal"])
    nadir = to_minimization(section["nadir"])
    hv = HV(ref_point=np.full(5, 1.1))
    with RunStore.open(runs[0]) as a, RunStore.open(runs[1]) as b:
        for checkpoint in a.checkpoints():
            assert checkpoint.stats["hv_box"]["ideal"] == section["ideal"]
            assert checkpoint.stats["hv_box"]["nadir"] == section["nadir"]
        rows = history(a)
        fronts = [np.array([to_minimization(m.objectives) for m in load_front(s)]) for s in (a, b)]
        expected = float(hv((fronts[0] - ideal) / (nadir - ideal)))
        assert rows[-1]["hypervolume"] == pytest.approx(expected, rel=1e-12)
        # Both runs fix the same box: compare measures in it rather than the fronts' union.
        result = compare_runs(a, b)
        assert result["common_box"] == {"ideal": section["ideal"], "nadir": section["nadir"]}
        assert result["a"]["hypervolume"] == pytest.approx(expected, rel=1e-12)
        assert result["a"]["hypervolume"] == pytest.approx(result["a"]["hypervolume_own"])


def test_compare_is_symmetric_and_uses_the_union_of_both_fronts(config_factory, tmp_path):
    a = run_search(config_factory(search={"seed": 1}), tmp_path / "a")
    c = run_search(
        config_factory(
            evaluator={"name": "synthetic", "settings": {"n_params_b": 3.0}}, search={"seed": 2}
        ),
        tmp_path / "c",
    )
    with RunStore.open(a) as sa, RunStore.open(c) as sc:
        ab, ba = compare_runs(sa, sc), compare_runs(sc, sa)
        union = np.vstack(
            [np.array([to_minimization(m.objectives) for m in load_front(s)]) for s in (sa, sc)]
        )
    assert ab["common_box"] == ba["common_box"]
    assert ab["a"]["hypervolume"] == ba["b"]["hypervolume"]
    assert ab["b"]["hypervolume"] == ba["a"]["hypervolume"]
    box = Box.from_data(ab["common_box"])
    assert np.allclose(box.ideal, union.min(axis=0)) and np.allclose(box.nadir, union.max(axis=0))


# ---------------------------------------------------------------------- saturation, credit
def test_the_box_tells_random_search_from_a_search_that_improved(config_factory, tmp_path):
    """In the old box (10x the baseline) the first, random generation already scored 95% of
    what 12 generations found; in the observed box the gap is several times wider, and the
    search's front beats a random search of the same budget in every seed."""
    for seed in (0, 1, 2):
        common = {"recipes": "baseline", "seed": seed}
        searched = run_search(
            config_factory(search={**common, "population_size": 24, "generations": 12}),
            tmp_path / f"nsga{seed}",
        )
        random = run_search(
            config_factory(search={**common, "population_size": 288, "generations": 1}),
            tmp_path / f"random{seed}",
        )
        with RunStore.open(searched) as s, RunStore.open(random) as r:
            rows = history(s)
            assert rows[0]["hypervolume"] < 0.85 * rows[-1]["hypervolume"]
            result = compare_runs(r, s)
        assert result["b"]["hypervolume"] > result["a"]["hypervolume"]
        assert result["a"]["dominated_share"] > result["b"]["dominated_share"]


def old_box_share(store: RunStore, generation: int, ident: int) -> float:
    """The share the credit gave before the box was normalised: 10x the baseline's values,
    1 - accuracy, reference point all ones."""
    evaluations = store.evaluations()
    reference = store.individual_at(-1, 0)
    assert reference is not None
    base = evaluations[reference.id].result.objectives
    scales = np.array([1.0] + [10 * base[k] for k in ("latency", "memory", "energy", "co2")])
    checkpoint = next(c for c in store.checkpoints() if c.generation == generation)
    ids = checkpoint.algorithm_state["archive"]
    F = np.array([to_minimization(evaluations[i].result.objectives) for i in ids])
    F[:, 0] += 1.0
    F /= scales
    hv = HV(ref_point=np.ones(5))
    total = float(hv(F))
    return (total - float(hv(F[[i != ident for i in ids]]))) / total


def test_operator_credit_gets_a_real_hypervolume_signal(config_factory, tmp_path):
    run = run_search(
        config_factory(search={"population_size": 16, "generations": 8, **ADAPTIVE}),
        tmp_path / "run",
    )
    rows = raw(
        run,
        "SELECT c.individual_id, c.generation, c.dominated_parent, c.hv_contribution, c.reward,"
        " json_extract(k.stats, '$.hypervolume') FROM credits c JOIN checkpoints k"
        " ON k.generation = c.generation WHERE c.entered_front = 1",
    )
    assert len(rows) > 20
    new, old = [], []
    with RunStore.open(run) as store:
        for ident, generation, dominated, contribution, reward, total in rows:
            share = contribution / total
            assert reward == pytest.approx((dominated + 1) / 2 + share)
            new.append(share)
            old.append(old_box_share(store, generation, ident))
    # Measured with the nine built-in quantization methods, seeds 0-2: the mean share is
    # 3.9-4.8x the old box's (0.0006), the median 8-15x.
    assert np.mean(new) > 3 * np.mean(old)
    assert np.median(new) > 4 * np.median(old)


def test_resume_gives_the_same_stats_credit_and_operator_chances(config_factory, tmp_path):
    full = config_factory(search={"generations": 6, **ADAPTIVE})
    run_search(full, tmp_path / "full")
    run_search(config_factory(search={"generations": 3, **ADAPTIVE}), tmp_path / "part")
    search = resume_search(tmp_path / "part", generations=6)
    resumed = search.run()
    search.close()

    def state(run: Path) -> tuple[Any, ...]:
        stats = raw(run, "SELECT stats, operator_state FROM checkpoints ORDER BY generation")
        credits = raw(run, "SELECT * FROM credits ORDER BY individual_id")
        return (
            [
                ({k: v for k, v in json.loads(s).items() if k != "seconds"}, json.loads(o))
                for s, o in stats
            ],
            credits,
        )

    assert state(tmp_path / "part") == state(tmp_path / "full")
    assert [r.hypervolume for r in resumed] == [
        json.loads(s)["hypervolume"]
        for (s,) in raw(tmp_path / "full", "SELECT stats FROM checkpoints WHERE generation >= 3")
    ]
    assert any(asdict(r)["hypervolume"] > 0 for r in resumed)


# ---------------------------------------------------------------------- old runs
def make_old(run: Path, archive: bool = True) -> None:
    """What a run of the previous version stored: `hv_scales`, no `hv_box`; with
    ``archive=False`` also checkpoints without their front (an older one still)."""
    raw(run, "DELETE FROM meta WHERE key = 'hv_box'")
    raw(run, "INSERT INTO meta VALUES ('hv_scales', '[1.0, 80.0, 150000.0, 3000.0, 0.3]')")
    raw(run, "UPDATE checkpoints SET stats = json_remove(stats, '$.hv_box')")
    raw(run, "UPDATE checkpoints SET stats = json_set(stats, '$.hypervolume', 0.5 + generation)")
    if not archive:
        raw(
            run,
            "UPDATE checkpoints SET algorithm_state = json_remove(algorithm_state, '$.archive')",
        )


def test_old_runs_show_in_the_new_box(config_factory, tmp_path):
    run = run_search(config_factory(), tmp_path / "run")
    with RunStore.open(run) as store:
        before = [row["hypervolume"] for row in history(store)]
    make_old(run)
    with RunStore.open(run) as store:
        assert [row["hypervolume"] for row in history(store)] == before
        assert run_status(store)["hypervolume"] == before[-1]
    code, out, _ = invoke_cli("history", str(run))
    assert code == 0 and f"{before[-1]:.4f}" in out
    code, out, _ = invoke_cli("status", str(run))
    assert code == 0 and f"hypervolume {before[-1]:.4f}" in out
    # This version resumes it: new checkpoints use the new box, history shows one box.
    search = resume_search(run, generations=6)
    added = search.run()
    search.close()
    with RunStore.open(run) as store:
        rows = history(store)
    assert len(rows) == 6 and rows[-1]["hypervolume"] == pytest.approx(added[-1].hypervolume)


def test_runs_without_fronts_in_their_checkpoints_show_what_they_recorded(
    config_factory, tmp_path
):
    run = run_search(config_factory(), tmp_path / "run")
    other = run_search(config_factory(search={"seed": 9}), tmp_path / "other")
    make_old(run, archive=False)
    with RunStore.open(run) as store:
        shown = run_history(store)
        assert shown.box is None
        assert [row["hypervolume"] for row in history(store)] == [0.5, 1.5, 2.5, 3.5]
        assert run_status(store)["hypervolume"] == 3.5
    code, out, err = invoke_cli("compare", str(run), str(other))
    assert code == 0, err
    assert "hypervolume (common box)" in out
