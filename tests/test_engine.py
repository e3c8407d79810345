"""The search loop: determinism, resume, duplicates, failures, constraints, lineage, cache."""

from __future__ import annotations

import itertools
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import pytest

from evo_compress import app
from evo_compress.engine import FAILURE_VIOLATION, failure_violation
from evo_compress.engine.mating import Mating
from evo_compress.exceptions import EvaluationError, RunStoreError
from evo_compress.fitness import EVALUATORS, EvaluationContext, EvaluationResult, Placement
from evo_compress.fitness.synthetic import SyntheticEvaluator
from evo_compress.genomes import Recipe, SearchSpace
from evo_compress.progress import ProgressListener
from evo_compress.runs import RunStore
from evo_compress.runs.analysis import history as run_history
from evo_compress.runs.front import load_front
from evo_compress.testing import (
    CACHE_CORRUPTIONS,
    Messages,
    corrupt_cache,
    crash_evaluations,
    final_state,
    pins_except,
    resume_search,
)
from evo_compress.testing import search_front as run_search


@pytest.mark.parametrize("algorithm", ["nsga2", "nsga3"])
def test_same_seed_gives_the_same_front_bit_for_bit(config_factory, tmp_path, algorithm):
    config = config_factory(search={"algorithm": algorithm})
    first = run_search(config, tmp_path / "a")
    second = run_search(config, tmp_path / "b")
    assert first and first == second
    assert final_state(tmp_path / "a") == final_state(tmp_path / "b")


def test_a_different_seed_explores_differently(config_factory, tmp_path):
    run_search(config_factory(search={"seed": 1}), tmp_path / "a")
    run_search(config_factory(search={"seed": 2}), tmp_path / "b")
    hashes_a = {row[1] for row in final_state(tmp_path / "a")[2]}
    hashes_b = {row[1] for row in final_state(tmp_path / "b")[2]}
    assert hashes_a != hashes_b


@pytest.mark.parametrize("algorithm", ["nsga2", "nsga3"])
def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(
    config_factory, tmp_path, algorithm
):
    full = config_factory(search={"algorithm": algorithm, "generations": 5})
    expected = run_search(full, tmp_path / "full")

    short = config_factory(search={"algorithm": algorithm, "generations": 2})
    run_search(short, tmp_path / "part")
    search = app.resume_search(tmp_path / "part", generations=5)
    search.run()
    resumed = [m.to_json() for m in load_front(search.store)]
    search.close()
    assert resumed == expected
    assert final_state(tmp_path / "part") == final_state(tmp_path / "full")


def test_resume_after_a_crash_mid_generation_reuses_stored_evaluations(config_factory, tmp_path):
    config = config_factory(search={"generations": 4})
    expected = run_search(config, tmp_path / "full")

    class Crash(Exception):
        pass

    # Crash after two evaluations of generation 2: checkpoints 0 and 1 exist, generation 2's
    # individuals and two of its evaluations are committed.
    search = app.start_search(config, run_dir=tmp_path / "crashed")
    crash_evaluations(search, generation=2, after=2, error=Crash)
    with pytest.raises(Crash):
        search.run()
    search.close()
    with RunStore.open(tmp_path / "crashed") as store:
        assert store.last_checkpoint().generation == 1  # type: ignore[union-attr]
        evaluated_before = len(store.evaluations())

    resumed = app.resume_search(tmp_path / "crashed")
    fresh: list[str] = []
    resumed.listener.evaluation_finished = lambda g, r, source: fresh.append(source)  # type: ignore[method-assign]
    resumed.run()
    resumed.close()
    assert fresh.count("run") == 2  # the two committed evaluations of generation 2 were reused
    assert evaluated_before > 0
    with RunStore.open(tmp_path / "crashed") as store:
        front = [m.to_json() for m in load_front(store)]
    assert front == expected
    assert final_state(tmp_path / "crashed") == final_state(tmp_path / "full")


def test_no_recipe_is_evaluated_twice_in_a_run(config_factory, tmp_path):
    # A tiny space (everything pinned but two genes) forces many duplicate proposals.
    config = config_factory(
        search={
            "population_size": 6,
            "generations": 6,
            "recipes": "baseline",
            "space": {
                "pin": {
                    "quant.method": "awq",
                    "recovery.method": "none",
                    "kv.dtype": "auto",
                    "kv.sliding_window": False,
                    "serve.max_num_seqs": 32,
                    "serve.gpu_memory_utilization": 0.9,
                    "serve.attention_backend": "auto",
                },
                "genes": {"prune.method": {"choices": ["none", "wanda"]}},
            },
        }
    )
    search = app.start_search(config, run_dir=tmp_path / "run")
    search.run()
    with search.store as store:
        individuals = [r for r in store.individuals() if r.generation >= 0]
        sources = [store.evaluation(r.id).source for r in individuals]  # type: ignore[union-attr]
    hashes = [r.hash for r in individuals]
    assert len(hashes) == len(set(hashes))
    assert "run" not in sources[1:]  # nothing re-used except possibly the baseline reference


def test_exhausted_space_stops_early_with_a_message(config_factory, tmp_path):
    pins = pins_except(SearchSpace.builtin(), "serve.gpu_memory_utilization")
    config = config_factory(
        search={
            "population_size": 4,
            "generations": 5,
            "recipes": "baseline",
            "max_redraws": 20,
            "space": {
                "pin": pins,
                "genes": {"serve.gpu_memory_utilization": {"low": 0.8, "high": 0.95}},
            },
        }
    )
    messages: list[str] = []
    search = app.start_search(config, run_dir=tmp_path / "run")
    search.listener.message = messages.append  # type: ignore[method-assign]
    search.run()
    search.close()
    assert any("stopping early" in m for m in messages)


def test_failed_evaluations_are_recorded_and_the_search_goes_on(config_factory, tmp_path):
    config = config_factory(
        evaluator={
            "name": "synthetic",
            "settings": {"fail_if": {"quant.method": ["rtn", "gptq"]}},
        },
        search={"generations": 4, "recipes": "aggressive"},
    )
    search = app.start_search(config, run_dir=tmp_path / "run")
    search.run()
    with search.store as store:
        failed = [
            (store.individual(i), row)
            for i, row in store.evaluations().items()
            if row.result.status == "failed"
        ]
        front = load_front(store)
    assert failed, "the aggressive portfolio has rtn and gptq recipes, which must fail"
    for individual, row in failed:
        assert individual.recipe["quant.method"] in {"rtn", "gptq"}
        assert "fail_if" in (row.result.reason or "")
        assert row.result.objectives is None
    assert front and all(m.recipe["quant"]["method"] not in {"rtn", "gptq"} for m in front)


class _NoPruningEvaluator(SyntheticEvaluator):
    """A back end that cannot prune: pruning recipes are infeasible for it."""

    name = "test-no-pruning"

    def capabilities(self) -> Mapping[str, Collection[Any] | None]:
        caps = dict(super().capabilities())
        caps["prune.method"] = ["none"]
        return caps


def test_the_search_stays_inside_what_the_back_end_can_apply(config_factory, tmp_path):
    if "test-no-pruning" not in EVALUATORS:
        EVALUATORS.register("test-no-pruning", _NoPruningEvaluator)
    config = config_factory(evaluator={"name": "test-no-pruning", "settings": {}})
    messages: list[str] = []
    listener = ProgressListener()
    debug: list[str] = []
    listener.message = messages.append  # type: ignore[method-assign]
    listener.debug = debug.append  # type: ignore[method-assign]
    search = app.start_search(config, run_dir=tmp_path / "run", listener=listener)
    search.run()
    with search.store as store:
        rows = store.evaluations()
        recipes = [r.recipe for r in store.individuals() if r.generation >= 0]
    assert all(r.result.status == "ok" for r in rows.values())
    assert recipes and all(r["prune.method"] == "none" for r in recipes)
    # The conservative portfolio's pruning seeds were skipped: said for debugging only.
    assert any("skipped" in m and "prune.method" in m for m in debug)
    assert not any("skipped" in m for m in messages)


def test_a_recipe_the_back_end_cannot_apply_is_infeasible_with_a_reason():
    space = SearchSpace.builtin()
    evaluator = _NoPruningEvaluator({}, EvaluationContext())
    result = evaluator.evaluate(space.recipe({"prune": {"method": "wanda"}}), space)
    assert result.status == "infeasible"
    assert "prune.method" in (result.reason or "") and "wanda" in (result.reason or "")
    restricted = evaluator.restrict_space(space)
    assert restricted.genes["prune.method"].choices == ("none",)  # type: ignore[attr-defined]
    assert SyntheticEvaluator({}, EvaluationContext()).restrict_space(space) is space


def test_accuracy_drop_constraint_holds_on_the_front(config_factory, tmp_path):
    config = config_factory(constraints={"max_accuracy_drop": 0.01}, search={"generations": 4})
    search = app.start_search(config, run_dir=tmp_path / "run")
    search.run()
    with search.store as store:
        baseline = store.evaluation(store.individual_at(-1, 0).id)  # type: ignore[union-attr]
        front = load_front(store)
        everything = store.evaluations()
    assert baseline is not None and baseline.result.objectives is not None
    limit = baseline.result.objectives["accuracy"] - 0.01
    assert front and all(m.objectives["accuracy"] >= limit for m in front)
    # The constraint was binding: some evaluated recipes fell below it and were kept off.
    assert any(
        r.result.objectives and r.result.objectives["accuracy"] < limit
        for r in everything.values()
    )


def test_a_failed_baseline_with_an_accuracy_constraint_stops_with_a_reason(
    config_factory, tmp_path
):
    config = config_factory(
        constraints={"max_accuracy_drop": 0.05},
        evaluator={"name": "synthetic", "settings": {"fail_if": {"quant.method": ["none"]}}},
    )
    search = app.start_search(config, run_dir=tmp_path / "run")
    with pytest.raises(EvaluationError, match="baseline recipe failed"):
        search.run()
    search.close()


def test_lineage_links_every_child_to_earlier_parents_and_operators(config_factory, tmp_path):
    search = app.start_search(config_factory(), run_dir=tmp_path / "run")
    search.run()
    with search.store as store:
        rows = {r.id: r for r in store.individuals()}
    for row in rows.values():
        if row.generation <= 0:
            assert row.parents == []
            continue
        assert 1 <= len(row.parents) <= 2
        assert all(rows[p].generation < row.generation for p in row.parents)
        assert set(row.operators) <= {"uniform", "gene"} and row.operators


def test_the_cache_is_shared_across_runs_and_gives_the_same_front(config_factory, tmp_path):
    cache = {"enabled": True, "path": str(tmp_path / "cache.sqlite")}
    config = config_factory(cache=cache)
    first = run_search(config, tmp_path / "a")
    search = app.start_search(config, run_dir=tmp_path / "b")
    search.run()
    with search.store as store:
        sources = {row.source for row in store.evaluations().values()}
        second = [m.to_json() for m in load_front(store)]
    assert sources == {"cache"}
    assert second == first


def test_resume_refuses_fewer_generations_than_done(config_factory, tmp_path):
    run_search(config_factory(search={"generations": 3}), tmp_path / "run")
    with pytest.raises(RunStoreError, match="fewer than the 3 generations"):
        app.resume_search(tmp_path / "run", generations=2)


def test_a_running_search_locks_its_run_dir(config_factory, tmp_path):
    search = app.start_search(config_factory(), run_dir=tmp_path / "run")
    with pytest.raises(RunStoreError, match="in use by another evo-compress process"):
        app.resume_search(tmp_path / "run")
    search.close()
    app.resume_search(tmp_path / "run").close()  # released on close


def test_starting_over_an_existing_run_dir_is_refused(config_factory, tmp_path):
    run_search(config_factory(), tmp_path / "run")
    with pytest.raises(RunStoreError, match="already holds a run"):
        app.start_search(config_factory(), run_dir=tmp_path / "run")


def test_hypervolume_grows_over_generations(config_factory, tmp_path):
    # Population 16: with 8 the whole population is the 5-objective front and truncation
    # can shrink the hypervolume from one generation to the next.
    config = config_factory(search={"population_size": 16, "generations": 8})
    search = app.start_search(config, run_dir=tmp_path / "run")
    history = search.run()
    search.close()
    assert history[-1].hypervolume > history[0].hypervolume > 0


def test_default_run_dirs_never_collide(config_factory, tmp_path):
    config = config_factory(search={"generations": 1})
    first = app.start_search(config)
    second = app.start_search(config)  # same name, very likely the same second
    assert first.store.run_dir != second.store.run_dir
    assert first.store.run_dir.parent == tmp_path / "runs"
    first.close()
    second.close()


def test_the_front_is_an_archive_so_hypervolume_never_drops(config_factory, tmp_path):
    search = app.start_search(config_factory(search={"generations": 8}), run_dir=tmp_path / "run")
    history = search.run()
    with search.store as store:
        front_ids = {m.id for m in load_front(store)}
        rows = {r.id: r for r in store.individuals()}
        shown = run_history(store)
    # Each checkpoint measured its front in the box of its moment; `history` takes every
    # front again in the last box, where an archive's hypervolume can only grow.
    hv = [row["hypervolume"] for row in shown]
    assert all(later >= earlier for earlier, later in itertools.pairwise(hv))
    assert hv[-1] == pytest.approx(history[-1].hypervolume, rel=1e-12)
    # Members may come from any generation, not only the last population.
    assert len({rows[i].generation for i in front_ids}) > 1


def test_resume_needs_no_file_the_config_named(config_factory, tmp_path, monkeypatch):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(
        "genes:\n"
        "  quant.method: {type: choice, choices: [none, awq, int8_weight_only]}\n"
        "  prune.method: {type: choice, choices: [none, wanda]}\n"
        "  prune.sparsity: {type: float, low: 0.1, high: 0.6, step: 0.1,\n"
        "                   active_if: {prune.method: [wanda]}}\n"
    )
    monkeypatch.chdir(tmp_path)
    config = config_factory(
        search={"generations": 2, "recipes": "baseline", "space": {"base": "space.yaml"}}
    )
    search = app.start_search(config, run_dir=tmp_path / "run")
    search.run()
    search.close()
    space_file.unlink()
    monkeypatch.chdir("/")
    resumed = app.resume_search(tmp_path / "run", generations=3)
    assert len(resumed.run()) == 1
    resumed.close()


def test_an_early_stop_is_reported_by_status(config_factory, tmp_path):
    from evo_compress.runs.front import run_status

    pins = pins_except(SearchSpace.builtin())
    config = config_factory(
        search={
            "population_size": 4,
            "generations": 3,
            "recipes": "baseline",
            "max_redraws": 5,
            "space": {"pin": pins},
        }
    )
    search = app.start_search(config, run_dir=tmp_path / "run")
    search.run()
    search.close()
    with RunStore.open(tmp_path / "run") as store:
        assert run_status(store)["state"].startswith("finished early")


class _FlakyEvaluator(SyntheticEvaluator):
    """Fails every recipe while a marker file exists: a transient failure to retry."""

    name = "test-flaky"
    marker: Path | None = None

    def _evaluate(self, recipe: Recipe, placement: Placement) -> EvaluationResult:
        if self.marker is not None and self.marker.exists():
            return EvaluationResult.failure("transient: the device was busy")
        return super()._evaluate(recipe, placement)


def test_resume_with_retry_failed_evaluates_failures_again(config_factory, tmp_path):
    if "test-flaky" not in EVALUATORS:
        EVALUATORS.register("test-flaky", _FlakyEvaluator)
    _FlakyEvaluator.marker = tmp_path / "busy"
    _FlakyEvaluator.marker.touch()
    cache = {"enabled": True, "path": str(tmp_path / "cache.sqlite")}
    config = config_factory(
        evaluator={"name": "test-flaky", "settings": {}},
        search={"generations": 2, "recipes": "aggressive"},
        cache=cache,
    )
    run_search(config, tmp_path / "run")
    with RunStore.open(tmp_path / "run") as store:
        failed = {i for i, r in store.evaluations().items() if r.result.status == "failed"}
    assert failed

    _FlakyEvaluator.marker.unlink()
    plain = app.resume_search(tmp_path / "run", generations=3)  # without the flag: failures stay
    plain.run()
    plain.close()
    with RunStore.open(tmp_path / "run") as store:
        assert all(store.evaluation(i).result.status == "failed" for i in failed)  # type: ignore[union-attr]

    retried = app.resume_search(tmp_path / "run", generations=4, retry_failed=True)
    retried.run()
    retried.close()
    with RunStore.open(tmp_path / "run") as store:
        now = {i: store.evaluation(i) for i in failed}
        front = load_front(store)
    again = [i for i, row in now.items() if row is not None and row.result.ok]
    assert again, "failed members of the population (and the baseline) were evaluated again"
    assert all(now[i].source == "evaluated" for i in again)  # type: ignore[union-attr]
    assert front and all(m.feasible for m in front)


@pytest.mark.parametrize("algorithm", ["nsga2", "nsga3"])
def test_retry_failed_from_a_checkpoint_of_failures_finishes_and_stays_resumable(
    config_factory, tmp_path, algorithm
):
    # Failed survivors have no rank or crowding in the checkpoint (pymoo ranks only feasible
    # individuals); retried, they become feasible and tournament selection compared None.
    if "test-flaky" not in EVALUATORS:
        EVALUATORS.register("test-flaky", _FlakyEvaluator)
    _FlakyEvaluator.marker = tmp_path / "busy"
    _FlakyEvaluator.marker.touch()
    config = config_factory(
        evaluator={"name": "test-flaky", "settings": {}},
        search={"generations": 1, "algorithm": algorithm},
    )
    run_search(config, tmp_path / "run")
    with RunStore.open(tmp_path / "run") as store:
        checkpoint = store.last_checkpoint()
        assert checkpoint is not None
        population = [entry["id"] for entry in checkpoint.population]
        assert all(store.evaluation(i).result.status == "failed" for i in population)  # type: ignore[union-attr]

    _FlakyEvaluator.marker.unlink()
    resume_search(tmp_path / "run", generations=3, retry_failed=True)
    resume_search(tmp_path / "run", generations=4)
    with RunStore.open(tmp_path / "run") as store:
        checkpoint = store.last_checkpoint()
        assert checkpoint is not None and checkpoint.generation == 3
        assert all(store.evaluation(i).result.ok for i in population)  # type: ignore[union-attr]
        assert load_front(store)


def cache_warnings(messages: Messages) -> list[str]:
    return [m for m in messages.said if "cache" in m]


@pytest.mark.parametrize("kind", sorted(CACHE_CORRUPTIONS))
def test_corrupted_cache_entries_never_enter_the_run(config_factory, tmp_path, kind):
    cache = {"enabled": True, "path": str(tmp_path / "cache.sqlite")}
    config = config_factory(cache=cache, search={"generations": 2})
    first = run_search(config, tmp_path / "a")
    assert corrupt_cache(tmp_path / "cache.sqlite", kind) > 0

    messages = Messages()
    second = run_search(config, tmp_path / "b", messages)
    assert second == first  # every bad entry was a miss, evaluated again
    assert len(cache_warnings(messages)) == 1, messages.said
    with RunStore.open(tmp_path / "b") as store:
        sources = {row.source for row in store.evaluations().values()}
    assert "evaluated" in sources and "cache" not in sources
    # The run holds nothing from the bad entries: it resumes without the cache.
    resume_search(tmp_path / "b", generations=3, cache=False)
    # And the cache was repaired by the fresh results: a third run is served from it.
    third = app.start_search(config, run_dir=tmp_path / "c")
    try:
        third.run()
    finally:
        third.close()
    with RunStore.open(tmp_path / "c") as store:
        assert {row.source for row in store.evaluations().values()} == {"cache"}


@pytest.mark.parametrize("content", ["garbage", "other table"])
def test_a_cache_file_that_is_not_a_cache_is_skipped_with_one_warning(
    config_factory, tmp_path, content
):
    path = tmp_path / "cache.sqlite"
    if content == "garbage":
        path.write_bytes(b"not sqlite at all " * 200)
    else:
        import sqlite3

        db = sqlite3.connect(path)
        with db:
            db.execute("CREATE TABLE entries (id INTEGER PRIMARY KEY, payload TEXT)")
        db.close()
    before = path.read_bytes()
    config = config_factory(cache={"enabled": True, "path": str(path)})
    expected = run_search(config_factory(), tmp_path / "plain")
    messages = Messages()
    assert run_search(config, tmp_path / "run", messages) == expected
    [warning] = cache_warnings(messages)
    assert str(path) in warning and "without" in warning
    assert path.read_bytes() == before  # the user's file is not touched


def test_a_full_disk_under_the_cache_loses_nothing(config_factory, tmp_path):
    config = config_factory(cache={"enabled": True, "path": str(tmp_path / "cache.sqlite")})
    expected = run_search(config_factory(), tmp_path / "plain")
    messages = Messages()
    search = app.start_search(config, run_dir=tmp_path / "run", listener=messages)
    assert search.cache is not None
    pages = search.cache._db.execute("PRAGMA page_count").fetchone()[0]
    search.cache._db.execute(f"PRAGMA max_page_count = {pages}")  # the next page: disk full
    try:
        search.run()
        front = [m.to_json() for m in load_front(search.store)]
    finally:
        search.close()
    assert front == expected
    [warning] = cache_warnings(messages)
    assert "full" in warning


def test_the_expert_rarely_proposes_a_seen_child(config_factory, tmp_path, monkeypatch):
    # Each duplicate is thrown away and drawn again (`make_offspring`): the expert avoids
    # recipes evaluated earlier and children of the same generation, so draws ~ children.
    draws, kept = [0], [0]
    vary, make_offspring = Mating._vary, Mating.make_offspring

    def counted_vary(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        draws[0] += 1
        return vary(self, *args, **kwargs)

    def counted_offspring(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        children = make_offspring(self, *args, **kwargs)
        kept[0] += len(children)
        return children

    monkeypatch.setattr(Mating, "_vary", counted_vary)
    monkeypatch.setattr(Mating, "make_offspring", counted_offspring)
    config = config_factory(
        search={
            "population_size": 12,
            "generations": 6,
            "recipes": "baseline",
            "operators": {"mutation": [{"name": "expert"}], "mutation_prob": 1.0},
        },
        constraints={"max_accuracy_drop": 0.05},
    )
    run_search(config, tmp_path / "run")
    assert kept[0] >= 12 * 5
    assert draws[0] / kept[0] <= 1.05


def test_failures_are_graded_by_how_far_past_the_memory_limit_they_went(config_factory, tmp_path):
    # On a 4 GiB device most recipes do not fit: survival should lean towards the near misses.
    config = config_factory(
        search={"population_size": 8, "generations": 3, "recipes": "baseline"},
        evaluator={"name": "synthetic", "settings": {"device_memory_gb": 4}},
    )
    run_search(config, tmp_path / "run")
    with RunStore.open(tmp_path / "run") as store:
        population = store.last_checkpoint().population  # type: ignore[union-attr]
        rows = {e["id"]: (float(e["cv"]), store.evaluation(e["id"]).result) for e in population}
    failed = [(cv, r) for cv, r in rows.values() if not r.ok]
    assert len(failed) >= 2
    for cv, result in failed:
        memory = result.metadata["memory_mib"]["total_mib"]
        over = result.metadata["over_limit"]
        assert over["needed"] == memory > over["limit"]
        assert cv == pytest.approx(FAILURE_VIOLATION * memory / over["limit"])
        assert cv == failure_violation(result)  # the stored record alone decides it
    # Every failure is worse than every success; among failures, the nearer the better.
    worst_success = max((cv for cv, r in rows.values() if r.ok), default=0.0)
    assert worst_success < FAILURE_VIOLATION < min(cv for cv, _ in failed)

    def ratio(result: EvaluationResult) -> float:
        return result.metadata["over_limit"]["needed"] / result.metadata["over_limit"]["limit"]

    by_ratio = sorted(failed, key=lambda f: ratio(f[1]))
    assert [cv for cv, _ in by_ratio] == sorted(cv for cv, _ in failed)
    assert len({cv for cv, _ in failed}) > 1


def test_resume_after_a_package_upgrade_goes_on_and_names_what_changed(
    config_factory, tmp_path, monkeypatch
):
    from evo_compress.fitness.synthetic import SyntheticEvaluator
    from evo_compress.progress import ProgressListener

    versions = {"torch": "2.12.0", "peft": None}
    monkeypatch.setattr(SyntheticEvaluator, "packages", lambda self: dict(versions))
    run_search(config_factory(search={"generations": 2}), tmp_path / "run")
    with RunStore.open(tmp_path / "run") as store:
        assert store.get_meta("packages") == versions
        recorded = {
            row.result.metadata.get("packages") == versions for row in store.evaluations().values()
        }
        assert recorded == {True}  # each evaluation says what measured it

    versions.update(torch="2.13.0", peft="0.22.0")  # the user upgrades
    lines: list[str] = []
    listener = ProgressListener()
    listener.message = lines.append  # type: ignore[method-assign]
    search = app.resume_search(tmp_path / "run", generations=3, listener=listener)
    search.run()
    search.close()
    changed = [line for line in lines if "packages changed" in line]
    assert len(changed) == 1, lines
    assert "peft none -> 0.22.0, torch 2.12.0 -> 2.13.0" in changed[0]
    with RunStore.open(tmp_path / "run") as store:
        assert store.get_meta("packages") == versions
        last = max(store.evaluations().values(), key=lambda row: row.individual_id)
        assert last.result.metadata["packages"]["torch"] == "2.13.0"
    # Unchanged since: the next resume says nothing.
    lines.clear()
    app.resume_search(tmp_path / "run", listener=listener).close()
    assert not [line for line in lines if "packages changed" in line]
