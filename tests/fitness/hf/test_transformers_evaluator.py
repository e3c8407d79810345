"""The transformers back end end to end on a tiny random Llama: recipes applied in a worker
process, five objectives measured, failures recorded."""

from __future__ import annotations

from pathlib import Path

import pytest

from evo_compress.config import CarbonConfig, HardwareConfig, ModelConfig
from evo_compress.exceptions import ConfigError
from evo_compress.fitness import EvaluationContext, make_evaluator
from evo_compress.fitness.racing import RaceMember, RaceRule
from evo_compress.genomes import SearchSpace
from evo_compress.testing import save_random_llama

SPACE = SearchSpace.builtin()
SETTINGS = {
    "threads": 1,
    "limit": 24,
    "latency_prompts": 4,
    "max_new_tokens": 4,
    "latency_repeats": 2,
    "calibration_samples": 16,
    "timeout_s": 240,
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random ~100k-parameter Llama with the reference tokenizer, saved as a local folder
    (random weights: accuracy is ~0, but every code path runs)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    return save_random_llama(
        folder,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )


def evaluator_for(folder: Path, **settings):
    context = EvaluationContext(
        ModelConfig(id=str(folder)), HardwareConfig(device="cpu"), CarbonConfig()
    )
    return make_evaluator("transformers", {**SETTINGS, **settings}, context)


def test_baseline_and_int8_give_five_measured_objectives(tiny_model):
    evaluator = evaluator_for(tiny_model)
    evaluator.prepare()
    base = evaluator.evaluate(SPACE.recipe({"serve": {"max_num_seqs": 2}}), SPACE)
    assert base.ok, base.reason
    int8 = evaluator.evaluate(
        SPACE.recipe({"quant": {"method": "int8_weight_only"}, "serve": {"max_num_seqs": 2}}),
        SPACE,
    )
    assert int8.ok, int8.reason
    assert base.objectives and int8.objectives
    assert all(v >= 0 for v in base.objectives.values())
    how = base.metadata["objectives"]
    assert how["accuracy"]["how"].startswith("lm-eval")
    # No power counters on a CI machine: energy says it is an estimate.
    assert how["energy"]["measured"] is False and "estimated" in how["energy"]["how"]
    assert base.metadata["worker"]["pid"]  # ran in a worker process
    weights = [r.metadata["compression"]["quant"]["weight_bytes"] for r in (base, int8)]
    assert weights[1] < weights[0] / 2


def test_pruning_and_recovery_run_in_the_pipeline(tiny_model):
    evaluator = evaluator_for(tiny_model)
    recipe = SPACE.recipe(
        {
            "prune": {"method": "wanda", "sparsity": 0.5},
            "recovery": {"method": "lora", "lora_rank": 4, "steps": 50},
            "quant": {"method": "rtn", "group_size": 32},
            "serve": {"max_num_seqs": 1},
        }
    )
    result = evaluator.evaluate(recipe, SPACE)
    assert result.ok, result.reason
    compression = result.metadata["compression"]
    assert compression["prune"]["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert compression["recovery"]["steps"] == 50
    assert compression["energy"]["joules"] > 0


def test_a_timeout_is_a_recorded_failure(tiny_model):
    evaluator = evaluator_for(tiny_model, timeout_s=0.5)
    result = evaluator.evaluate(SPACE.baseline(), SPACE)
    assert result.status == "failed" and (result.reason or "").startswith("timeout")


def test_the_cpu_back_end_declares_what_it_cannot_apply(tiny_model):
    evaluator = evaluator_for(tiny_model)
    restricted = evaluator.restrict_space(SPACE)
    quant = restricted.genes["quant.method"].choices  # type: ignore[attr-defined]
    assert "fp8" not in quant and "int8_weight_only" in quant
    assert restricted.genes["serve.gpu_memory_utilization"].high == 0.9  # type: ignore[attr-defined]
    result = evaluator.evaluate(SPACE.recipe({"quant": {"method": "fp8"}}), SPACE)
    assert result.status == "infeasible" and "fp8" in (result.reason or "")


def test_bad_settings_name_the_field(tiny_model):
    with pytest.raises(ConfigError, match=r"`evaluator.settings.threads`"):
        evaluator_for(tiny_model, threads=0)
    with pytest.raises(ConfigError, match=r"unknown key `evaluator.settings.thread`"):
        evaluator_for(tiny_model, thread=2)


def test_two_cpu_workers_share_the_cores_and_both_results_come_back(tiny_model, monkeypatch):
    from evo_compress.config import EvaluationConfig
    from evo_compress.fitness.pool import LocalPool, Task, configure_evaluator

    monkeypatch.setattr("evo_compress.fitness.pool.available_cores", lambda: 2)
    solo = evaluator_for(tiny_model, threads=2)
    evaluator, plan = configure_evaluator(EvaluationConfig(workers=2), solo)
    assert plan.workers == 2 and evaluator.threads() == 1
    # Measured two at a time on shared cores: never mixed with solo results in the cache.
    assert evaluator.fingerprint() != solo.fingerprint()
    evaluator.prepare()
    recipes = [
        SPACE.recipe({"serve": {"max_num_seqs": 2}}),
        SPACE.recipe({"quant": {"method": "int8_weight_only"}, "serve": {"max_num_seqs": 2}}),
    ]
    with LocalPool(evaluator, plan) as pool:
        results = dict(pool.run([Task(i, r, SPACE) for i, r in enumerate(recipes)]))
    assert sorted(results) == [0, 1]
    assert all(r.ok for r in results.values()), [r.reason for r in results.values()]
    assert {r.metadata["placement"]["slot"] for r in results.values()} == {0, 1}
    assert results[0].metadata["worker"]["pid"] != results[1].metadata["worker"]["pid"]
    assert all(r.metadata["torch_threads"] == 1 for r in results.values())


def _slow_until_trained(test):  # type: ignore[no-untyped-def]
    """Slow only while the reference model is not trained and cached yet (a training run)."""
    from evo_compress.reference import default_cache_dir, reference_model_dir
    from evo_compress.reference.model import is_complete

    trained = is_complete(reference_model_dir(default_cache_dir()))
    return test if trained else pytest.mark.slow(test)


@_slow_until_trained
def test_the_record_carries_the_accuracys_binomial_stderr_through_cache_and_store(tmp_path):
    import math

    from evo_compress import output
    from evo_compress.fitness import FitnessCache
    from evo_compress.runs import RunStore
    from evo_compress.runs.front import FrontMember

    # The trained reference model scores ~0.93: a stderr that is neither 0 nor trivial.
    evaluator = evaluator_for(Path("reference"), limit=60)
    evaluator.prepare()
    recipe = SPACE.recipe({"serve": {"max_num_seqs": 2}})
    result = evaluator.evaluate(recipe, SPACE)
    assert result.ok and result.objectives, result.reason
    p, meta = result.objectives["accuracy"], result.metadata
    assert 0 < p < 1
    assert meta["accuracy_n"] == 60
    assert meta["accuracy_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 59), rel=1e-9)
    assert meta["objectives"]["accuracy"]["stderr"] == meta["accuracy_stderr"]

    cache = FitnessCache(tmp_path / "cache.sqlite")
    cache.put(recipe, evaluator.fingerprint(), result)
    cache.close()
    cached = FitnessCache(tmp_path / "cache.sqlite").get(recipe, evaluator.fingerprint())
    assert cached == result

    with RunStore.create(tmp_path / "run", "name: stderr\n", {"name": "stderr"}) as store:
        [ident] = store.add_individuals(
            [
                {
                    "generation": 0,
                    "slot": 0,
                    "hash": recipe.hash,
                    "recipe": recipe.canonical_json(),
                    "parents": [],
                    "operators": ["initial"],
                }
            ]
        )
        store.add_evaluation(ident, result, "run")
    with RunStore.open(tmp_path / "run", read_only=True) as store:
        row = store.evaluation(ident)
    assert row is not None and row.result == result

    member = FrontMember(ident, 0, recipe.to_dict(nested=True), row.result.objectives, True, meta)
    assert member.to_json()["accuracy_n"] == 60
    with output.console.capture() as shown:
        output.print_front([member])
    assert f"{p:.3f} ± {meta['accuracy_stderr']:.3f}" in shown.get()


@_slow_until_trained
def test_racing_on_the_reference_model_finishes_exactly_or_stops_quick():
    evaluator = evaluator_for(Path("reference"), limit=120)
    evaluator.prepare()
    recipe = SPACE.recipe({"quant": {"method": "int8_weight_only"}, "serve": {"max_num_seqs": 2}})
    plain = evaluator.evaluate(recipe, SPACE)
    assert plain.ok and plain.objectives, plain.reason

    # Nothing on the front yet: the first 40 items, then the other 80, combined.
    full = evaluator.evaluate(recipe, SPACE, race=RaceRule(40, 2.0))
    assert full.ok and full.objectives, full.reason
    assert full.metadata["stage"] == "full"
    assert full.metadata["accuracy_run"]["racing"] == {"quick_n": 40, "rest_n": 80}
    assert full.metadata["accuracy_n"] == plain.metadata["accuracy_n"] == 120
    assert full.objectives["accuracy"] == plain.objectives["accuracy"]
    assert full.metadata["accuracy_stderr"] == pytest.approx(
        plain.metadata["accuracy_stderr"], rel=1e-9
    )

    # A front member better in every objective than anything this model measures: the
    # recipe stops after its 40 quick items.
    best = RaceMember((-1.0, 0.0, 0.0, 0.0, 0.0), 0.0)
    quick = evaluator.evaluate(recipe, SPACE, race=RaceRule(40, 0.0, (best,)))
    assert quick.ok and quick.objectives, quick.reason
    assert quick.metadata["stage"] == "quick"
    assert quick.metadata["accuracy_n"] == 40
    assert "racing" not in quick.metadata["accuracy_run"]
    # What the quick stage saves in time is measured by `make bench` (bench_racing.py), not
    # here: on two shared cores a timing comparison in a test is a coin toss.
