"""Racing in the search loop (synthetic evaluator): records say their stage, quick results
never reach the front, seeded runs and resumes are exact, and the cache keys by stage."""

from __future__ import annotations

import pytest

from evo_compress.app import resume_search, start_search
from evo_compress.exceptions import ConfigError
from evo_compress.fitness.synthetic import SyntheticEvaluator
from evo_compress.runs import RunStore
from evo_compress.runs.front import load_front
from evo_compress.testing import crash_evaluations, final_state
from evo_compress.testing import search_front as run_search

RACING = {"racing": True, "quick_limit": 25, "z": 2.0}
# Enough noise that the quick stage's stderr (noise * sqrt(250 / 25)) matters.
NOISY = {"name": "synthetic", "settings": {"noise": 0.01}}


def _racing_config(config_factory, **overrides):
    return config_factory(
        search={"generations": 5, "population_size": 10},
        evaluator=NOISY,
        fidelity=RACING,
        **overrides,
    )


def _stages(run_dir) -> dict[int, str | None]:
    with RunStore.open(run_dir, read_only=True) as store:
        return {
            ident: row.result.metadata.get("stage")
            for ident, row in store.evaluations().items()
            if store.individual(ident).generation >= 0
        }


def test_racing_stops_dominated_recipes_and_keeps_them_off_the_front(config_factory, tmp_path):
    front = run_search(_racing_config(config_factory), tmp_path / "run")
    stages = _stages(tmp_path / "run")
    assert set(stages.values()) == {"quick", "full"}  # every record says its stage
    assert front and all(m["stage"] == "full" for m in front)
    with RunStore.open(tmp_path / "run", read_only=True) as store:
        quick = [
            r for r in store.evaluations().values() if r.result.metadata.get("stage") == "quick"
        ]
        stats = [c.stats for c in store.checkpoints()]
    # A quick record's accuracy stands for 25 of 250 items: its stderr is sqrt(10) x larger.
    assert all(
        r.result.metadata["accuracy_stderr"] == pytest.approx(0.01 * 10**0.5) for r in quick
    )
    assert sum(s["quick"] for s in stats) == len(quick)


def test_without_racing_nothing_changes(config_factory, tmp_path):
    plain = config_factory(evaluator=NOISY)
    off = config_factory(evaluator=NOISY, fidelity={"racing": False, "quick_limit": 7})
    assert run_search(plain, tmp_path / "a") == run_search(off, tmp_path / "b")
    assert set(_stages(tmp_path / "a").values()) == {None}


def test_a_seeded_racing_run_repeats_bit_for_bit(config_factory, tmp_path):
    config = _racing_config(config_factory)
    assert run_search(config, tmp_path / "a") == run_search(config, tmp_path / "b")
    assert final_state(tmp_path / "a", True) == final_state(tmp_path / "b", True)
    assert _stages(tmp_path / "a") == _stages(tmp_path / "b")


def test_a_racing_run_resumed_after_a_crash_decides_as_the_uninterrupted_one(
    config_factory, tmp_path
):
    config = _racing_config(config_factory)
    expected = run_search(config, tmp_path / "full")

    class Crash(Exception):
        pass

    search = start_search(config, run_dir=tmp_path / "crashed")
    crash_evaluations(search, generation=3, after=3, error=Crash)
    with pytest.raises(Crash):
        search.run()
    search.close()
    resumed = resume_search(tmp_path / "crashed")
    resumed.run()
    front = [m.to_json() for m in load_front(resumed.store)]
    resumed.close()
    assert front == expected
    assert final_state(tmp_path / "crashed", True) == final_state(tmp_path / "full", True)
    assert _stages(tmp_path / "crashed") == _stages(tmp_path / "full")


def test_the_cache_serves_quick_results_only_to_racing_runs(config_factory, tmp_path):
    cache = {"enabled": True, "path": str(tmp_path / "cache.sqlite")}
    racing = _racing_config(config_factory, cache=cache)
    first = run_search(racing, tmp_path / "racing")
    quick_hashes = {
        store_row.hash
        for store_row, stage in _rows_with_stage(tmp_path / "racing")
        if stage == "quick"
    }
    assert quick_hashes

    # The same racing run again: every result, quick ones included, comes from the cache.
    assert run_search(racing, tmp_path / "again") == first
    with RunStore.open(tmp_path / "again", read_only=True) as store:
        sources = {row.source for row in store.evaluations().values()}
    assert sources == {"cache"}

    # A run without racing is never served a quick result: it measures those in full.
    plain = config_factory(
        search={"generations": 5, "population_size": 10}, evaluator=NOISY, cache=cache
    )
    run_search(plain, tmp_path / "plain")
    for row, stage in _rows_with_stage(tmp_path / "plain"):
        assert stage != "quick"
        if row.hash in quick_hashes:
            with RunStore.open(tmp_path / "plain", read_only=True) as store:
                assert store.evaluation(row.id).source == "evaluated"  # type: ignore[union-attr]


def _rows_with_stage(run_dir):
    with RunStore.open(run_dir, read_only=True) as store:
        evaluations = store.evaluations()
        return [
            (row, evaluations[row.id].result.metadata.get("stage"))
            for row in store.individuals()
            if row.generation >= 0
        ]


def test_racing_with_a_back_end_that_cannot_race_is_a_config_error(
    config_factory, tmp_path, monkeypatch
):
    monkeypatch.setattr(SyntheticEvaluator, "supports_racing", False)
    with pytest.raises(ConfigError, match=r"`fidelity\.racing`"):
        start_search(_racing_config(config_factory), run_dir=tmp_path / "run")
