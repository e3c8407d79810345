"""Parallel evaluation in a whole search: the same front serially, on local workers and on
Ray; results committed one by one, so a crash loses only what was in flight."""

from __future__ import annotations

import pytest

from evo_compress.app import resume_search, start_search
from evo_compress.runs import RunStore
from evo_compress.runs.front import load_front
from evo_compress.testing import crash_evaluations, final_state
from evo_compress.testing import search_front as run_search

# Pauses that differ per recipe, so parallel evaluations finish out of offspring order.
SLOW = {"name": "synthetic", "settings": {"cost_s": 0.02, "cost_spread": 1.0}}


def test_local_workers_give_the_serial_front(config_factory, tmp_path):
    serial = run_search(config_factory(evaluator=SLOW), tmp_path / "serial")
    parallel_config = config_factory(evaluator=SLOW, evaluation={"workers": 3})
    parallel = run_search(parallel_config, tmp_path / "parallel")
    assert serial and parallel == serial
    assert final_state(tmp_path / "parallel", evaluations=True) == final_state(
        tmp_path / "serial", evaluations=True
    )
    with RunStore.open(tmp_path / "parallel") as store:
        slots = {
            e.result.metadata.get("placement", {}).get("slot")
            for e in store.evaluations().values()
            if e.source == "evaluated"
        }
    assert slots >= {0, 1, 2}  # the work was spread over the three workers


def test_a_crash_with_evaluations_in_flight_resumes_to_the_same_front(config_factory, tmp_path):
    config = config_factory(evaluator=SLOW, evaluation={"workers": 2}, search={"generations": 4})
    expected = run_search(config, tmp_path / "full")

    class Crash(Exception):
        pass

    search = start_search(config, run_dir=tmp_path / "crashed")
    crash_evaluations(search, generation=2, after=3, error=Crash)
    with pytest.raises(Crash):
        search.run()
    search.close()
    with RunStore.open(tmp_path / "crashed") as store:
        assert store.last_checkpoint().generation == 1  # type: ignore[union-attr]
        generation_2 = {row.id for row in store.individuals(2)}
        kept = [i for i in store.evaluations() if i in generation_2]
    assert kept  # results that finished before the crash were committed

    resumed = resume_search(tmp_path / "crashed")
    sources: list[str] = []
    resumed.listener.evaluation_finished = lambda g, r, s: sources.append(s)  # type: ignore[method-assign]
    resumed.run()
    resumed.close()
    assert sources.count("run") >= len(kept)  # committed results were not evaluated again
    with RunStore.open(tmp_path / "crashed") as store:
        assert [m.to_json() for m in load_front(store)] == expected


@pytest.mark.slow
def test_ray_gives_the_serial_front(config_factory, tmp_path):
    pytest.importorskip("ray")
    config = config_factory(evaluator=SLOW, search={"generations": 3})
    serial = run_search(config, tmp_path / "serial")
    ray_config = config_factory(
        evaluator=SLOW,
        search={"generations": 3},
        evaluation={"backend": "ray", "ray": {"local_cpus": 2}},
    )
    on_ray = run_search(ray_config, tmp_path / "ray")
    assert serial and on_ray == serial
    assert final_state(tmp_path / "ray", evaluations=True) == final_state(
        tmp_path / "serial", evaluations=True
    )
    with RunStore.open(tmp_path / "ray") as store:
        where = {
            e.result.metadata.get("placement", {}).get("where", "")
            for e in store.evaluations().values()
            if e.source == "evaluated"
        }
    assert all("ray" in w.lower() or "node" in w.lower() for w in where)
