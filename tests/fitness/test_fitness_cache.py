"""The persistent fitness cache: keyed by recipe hash and fingerprint, failures kept."""

from __future__ import annotations

import json
import sqlite3

import pytest

from evo_compress.exceptions import RunStoreError
from evo_compress.fitness import EvaluationContext, FitnessCache, make_evaluator
from evo_compress.fitness._base import EvaluationResult, classify_failure, with_failure_class
from evo_compress.fitness.cache import open_cache
from evo_compress.genomes import SearchSpace
from evo_compress.testing import CACHE_CORRUPTIONS, corrupt_cache, samples


def test_round_trip_and_fingerprint_separation(tmp_path):
    space = SearchSpace.builtin()
    recipe = space.recipe({"quant": {"method": "awq"}})
    evaluator = make_evaluator("synthetic", {}, EvaluationContext())
    result = evaluator.evaluate(recipe, space)
    cache = FitnessCache(tmp_path / "c.sqlite")
    fingerprint = evaluator.fingerprint()
    assert cache.get(recipe, fingerprint) is None
    cache.put(recipe, fingerprint, result)
    cache.close()

    reopened = FitnessCache(tmp_path / "c.sqlite")
    hit = reopened.get(recipe, fingerprint)
    assert hit == result
    other = make_evaluator("synthetic", {"seed": 1}, EvaluationContext()).fingerprint()
    assert other != fingerprint and reopened.get(recipe, other) is None


def test_failures_are_cached_and_can_be_forgotten(tmp_path):
    space = SearchSpace.builtin()
    recipe = space.recipe({"quant": {"method": "rtn"}})
    evaluator = make_evaluator(
        "synthetic", {"fail_if": {"quant.method": ["rtn"]}}, EvaluationContext()
    )
    result = evaluator.evaluate(recipe, space)
    assert result.status == "failed"
    cache = FitnessCache(tmp_path / "c.sqlite")
    cache.put(recipe, evaluator.fingerprint(), result)
    cached = cache.get(recipe, evaluator.fingerprint())
    assert cached is not None and cached.status == "failed" and cached.reason == result.reason
    assert cache.forget_failures(evaluator.fingerprint()) == 1
    assert cache.get(recipe, evaluator.fingerprint()) is None


def test_an_unusable_cache_file_gives_a_clear_error(tmp_path):
    bad = tmp_path / "c.sqlite"
    bad.write_bytes(b"garbage" * 1000)
    with pytest.raises(RunStoreError, match="--no-cache"):
        FitnessCache(bad)


def test_the_cache_key_ignores_spelling_and_the_simulated_pause():
    context = EvaluationContext()
    plain = make_evaluator("synthetic", {}, context).fingerprint()
    assert make_evaluator("synthetic", {"n_params_b": 7}, context).fingerprint() == plain
    assert make_evaluator("synthetic", {"n_params_b": 7.0}, context).fingerprint() == plain
    assert make_evaluator("synthetic", {"cost_s": 0.5}, context).fingerprint() == plain
    assert make_evaluator("synthetic", {"n_params_b": 8}, context).fingerprint() != plain


def filled_cache(tmp_path, n=6, warn=None):
    """A cache holding ``n`` real synthetic results; returns it, the recipes, the results and
    the fingerprint."""
    space = SearchSpace.builtin()
    evaluator = make_evaluator("synthetic", {}, EvaluationContext())
    recipes = samples(space, n)
    results = [evaluator.evaluate(r, space) for r in recipes]
    cache = FitnessCache(tmp_path / "c.sqlite", warn=warn)
    for recipe, result in zip(recipes, results, strict=True):
        cache.put(recipe, evaluator.fingerprint(), result)
    return cache, recipes, results, evaluator.fingerprint()


@pytest.mark.parametrize("kind", sorted(CACHE_CORRUPTIONS))
def test_a_corrupted_entry_is_a_miss_with_one_warning(tmp_path, kind):
    warnings: list[str] = []
    cache, recipes, results, fingerprint = filled_cache(tmp_path, warn=warnings.append)
    assert corrupt_cache(cache.path, kind) == len(recipes)
    assert [cache.get(r, fingerprint) for r in recipes] == [None] * len(recipes)
    assert len(warnings) == 1, warnings  # one line, not one per entry
    assert str(cache.path) in warnings[0] and "evaluated again" in warnings[0]
    # The fresh result replaces the bad entry.
    cache.put(recipes[0], fingerprint, results[0])
    assert cache.get(recipes[0], fingerprint) == results[0]
    cache.close()


def test_a_file_that_is_not_a_cache_is_left_alone_with_one_warning(tmp_path):
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"garbage" * 1000)
    other = tmp_path / "other.sqlite"
    db = sqlite3.connect(other)
    with db:
        db.execute("CREATE TABLE entries (id INTEGER PRIMARY KEY, payload TEXT)")
        db.execute("INSERT INTO entries (payload) VALUES ('someone else''s data')")
    db.close()
    for path in (garbage, other):
        before = path.read_bytes()
        warnings: list[str] = []
        assert open_cache(path, warnings.append) is None
        assert len(warnings) == 1 and str(path) in warnings[0] and "--cache" in warnings[0]
        assert path.read_bytes() == before
        with pytest.raises(RunStoreError, match=r"not a fitness cache|cannot be opened"):
            FitnessCache(path)


def test_a_full_disk_stops_caching_with_one_warning(tmp_path):
    warnings: list[str] = []
    cache, recipes, results, fingerprint = filled_cache(tmp_path, n=2, warn=warnings.append)
    # No page beyond the ones in use: the next growth is "database or disk is full".
    pages = cache._db.execute("PRAGMA page_count").fetchone()[0]
    cache._db.execute(f"PRAGMA max_page_count = {pages}")
    space = SearchSpace.builtin()
    evaluator = make_evaluator("synthetic", {}, EvaluationContext())
    more = samples(space, 200, seed=1)
    for recipe in more:
        cache.put(recipe, fingerprint, evaluator.evaluate(recipe, space))
    assert len(warnings) == 1 and "full" in warnings[0], warnings
    assert cache.get(recipes[0], fingerprint) == results[0]  # what was cached still serves
    cache.close()


def test_a_failure_a_limit_caused_is_served_only_to_limits_as_tight(tmp_path):
    from evo_compress.fitness.worker import WorkerLimits, run_in_worker

    space = SearchSpace.builtin()
    timed_out, raised = samples(space, 2)
    short = {"timeout_s": 1.0, "memory_limit_mib": 2048.0}
    cache = FitnessCache(tmp_path / "c.sqlite")
    timeout = run_in_worker(
        "evo_compress.testing:worker_sleep", {"seconds": 60}, WorkerLimits(**short)
    )
    error = run_in_worker("evo_compress.testing:worker_raise", {}, WorkerLimits(**short))
    assert (timeout.reason or "").startswith("timeout") and error.status == "failed"
    cache.put(timed_out, "fp", timeout, short)
    cache.put(raised, "fp", error, short)

    assert cache.get(timed_out, "fp", short) == timeout
    assert cache.get(timed_out, "fp", {**short, "timeout_s": 0.5}) == timeout  # would recur
    assert cache.get(timed_out, "fp", {**short, "timeout_s": 600.0}) is None
    assert cache.get(timed_out, "fp", {**short, "memory_limit_mib": None}) is None
    assert cache.get(timed_out, "fp", {}) is None
    # A recipe's own failure does not depend on the limits.
    assert cache.get(raised, "fp", {**short, "timeout_s": 600.0}) == error
    cache.close()


def test_a_cache_from_before_limits_were_stored_is_upgraded_in_place(tmp_path):
    path = tmp_path / "old.sqlite"
    space = SearchSpace.builtin()
    ok_recipe, timed_out = samples(space, 2)
    evaluator = make_evaluator("synthetic", {}, EvaluationContext())
    ok = evaluator.evaluate(ok_recipe, space)
    db = sqlite3.connect(path)
    with db:
        db.execute(
            "CREATE TABLE entries (recipe_hash TEXT NOT NULL, fingerprint TEXT NOT NULL, "
            "recipe TEXT NOT NULL, status TEXT NOT NULL, objectives TEXT, reason TEXT, "
            "metadata TEXT NOT NULL, duration_s REAL NOT NULL, created_at REAL NOT NULL, "
            "PRIMARY KEY (recipe_hash, fingerprint))"
        )
        rows = [
            (ok_recipe, "ok", json.dumps(ok.objectives), None),
            (timed_out, "failed", None, "timeout: the evaluation ran past 4 s"),
        ]
        for recipe, status, objectives, reason in rows:
            db.execute(
                "INSERT INTO entries VALUES (?, 'fp', ?, ?, ?, ?, '{}', 1.0, 0.0)",
                (recipe.hash, recipe.canonical_json(), status, objectives, reason),
            )
    db.close()
    warnings: list[str] = []
    cache = FitnessCache(path, warn=warnings.append)
    hit = cache.get(ok_recipe, "fp", {"timeout_s": 600.0})
    assert hit is not None and hit.objectives == ok.objectives
    # Its limits were never recorded: a timeout of unknown limits is evaluated again.
    assert cache.get(timed_out, "fp", {"timeout_s": 600.0}) is None
    assert warnings == [] and len(cache) == 2
    cache.close()


@pytest.mark.parametrize(
    ("reason", "metadata", "expected"),
    [
        ("ValueError: sparsity 0.9 leaves no rows", {}, "recipe"),
        ("RuntimeError: the server rejected the checkpoint's format", {}, "recipe"),
        ("timeout: the evaluation ran past 4 s", {"limit_cause": "timeout"}, "limit"),
        ("the worker died (signal 9) (killed: out of memory)", {}, "limit"),
        (
            "EvaluationError: the quantization step (W8A16 rtn) failed with exit code 1: "
            "quantize_job: error: llm-compressor is not installed in this environment",
            {},
            "environment",
        ),
        ("ModuleNotFoundError: No module named 'peft'", {}, "environment"),
        ("OSError: [Errno 28] No space left on device", {}, "environment"),
        ("the worker died (exit code 1)", {}, "environment"),
        ("EvaluationError: the vLLM server died while being measured (...)", {}, "environment"),
        ("cancelled: the search is stopping", {}, "environment"),
        ("ServerError: cannot start the vLLM server guard: [Errno 2]", {}, "environment"),
        ("anything at all", {"failure_class": "environment"}, "environment"),
    ],
)
def test_every_failure_is_classed(reason, metadata, expected):
    failed = EvaluationResult.failure(reason, metadata)
    assert classify_failure(failed) == expected
    assert with_failure_class(failed).metadata["failure_class"] == expected
    assert classify_failure(EvaluationResult.failure(reason, metadata, "infeasible")) is None


def test_only_the_recipe_s_and_a_limit_s_failures_are_served_again(tmp_path):
    space = SearchSpace.builtin()
    recipe_failure, environment_failure, old = samples(space, 3)
    cache = FitnessCache(tmp_path / "c.sqlite")
    cache.put(recipe_failure, "fp", EvaluationResult.failure("ValueError: no rows left"))
    missing = EvaluationResult.failure("ModuleNotFoundError: No module named 'torchao'")
    cache.put(environment_failure, "fp", missing)
    served = cache.get(recipe_failure, "fp")
    assert served is not None and served.metadata["failure_class"] == "recipe"
    assert cache.get(environment_failure, "fp") is None  # the module may be there now
    # A row from before failures were classed: treated as the environment's, not served.
    cache.put(old, "fp", EvaluationResult.failure("ValueError: no rows left"))
    db = sqlite3.connect(tmp_path / "c.sqlite")
    db.execute("UPDATE entries SET metadata = '{}' WHERE recipe_hash = ?", (old.hash,))
    db.commit()
    db.close()
    assert cache.get(old, "fp") is None


def test_a_changed_package_version_changes_the_cache_key_not_the_run_s(monkeypatch):
    import evo_compress.fitness.hf.evaluator as hf

    context = EvaluationContext()
    before = make_evaluator("transformers", {}, context)
    key, run_key = before.cache_fingerprint(), before.fingerprint()
    assert set(hf.PACKAGES) <= set(before.packages())
    for changed in ("torch", "transformers", "torchao", "peft"):
        versions = dict(before.packages(), **{changed: "0.0.1"})
        monkeypatch.setattr(hf, "installed_versions", lambda names, v=versions: dict(v))
        after = make_evaluator("transformers", {}, context)
        assert after.cache_fingerprint() != key, changed
        assert after.fingerprint() == run_key, changed  # resume still accepts the run


def test_the_quantization_job_s_packages_and_text_are_in_the_cache_key(monkeypatch):
    # gptq on the transformers back end runs llm-compressor's job in the quantization
    # environment: a changed job or llm-compressor may give other weights, so results the
    # old one produced must not be served.
    import sys

    import evo_compress.fitness.model.environments as environments

    monkeypatch.setattr(environments, "default_python", lambda: sys.executable)
    context = EvaluationContext()
    keys = []
    for digest in ("job-a", "job-b"):
        monkeypatch.setattr(environments, "quantize_job_digest", lambda d=digest: d)
        evaluator = make_evaluator("transformers", {}, context)
        packages = evaluator.packages()
        assert packages["quantize_job"] == digest
        assert "quantization llmcompressor" in packages
        keys.append((evaluator.cache_fingerprint(), evaluator.fingerprint()))
    assert keys[0][0] != keys[1][0]
    assert keys[0][1] == keys[1][1]  # a run resumes after the job changed
