"""`constraints.max_task_drop`: one drop limit per task against the baseline's score of that
task, honoured by the search, checked against the evaluator's tasks at `validate`, kept by
resume. The back end is ``evo_compress.testing.tasks``' double, which records per-task scores
the way the real-model back ends do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from evo_compress import app
from evo_compress.config import ConstraintsConfig, parse_config
from evo_compress.engine import FAILURE_VIOLATION
from evo_compress.engine.problem import Constraints
from evo_compress.exceptions import ConfigError, EvaluationError
from evo_compress.fitness import EVALUATORS, EvaluationResult
from evo_compress.genomes import Recipe
from evo_compress.objectives import constraint_of, task_scores
from evo_compress.runs import RunStore
from evo_compress.runs.front import load_front
from evo_compress.testing import (
    TaskScoresEvaluator,
    final_state,
    invoke_cli,
    register_task_evaluator,
    resume_search,
    run_search,
)

# my_mc takes twice the landscape's accuracy drop, my_gen half; with weights 2:1 the weighted
# mean takes it exactly, so the accuracy objective is the landscape's.
TASKS = [
    {"name": "my_gen", "weight": 2, "sensitivity": 0.5, "metric": "exact_match"},
    {"name": "my_mc", "weight": 1, "sensitivity": 2.0},
]
ACCURACY_DROP = 0.08
MC_DROP = 0.05


def task_config(config_factory: Any, **overrides: Any) -> Any:
    register_task_evaluator()
    sections: dict[str, Any] = {
        "evaluator": {"name": "test-tasks", "settings": {"tasks": TASKS}},
        "search": {"population_size": 8, "generations": 4, "seed": 3, "recipes": "aggressive"},
        "constraints": {"max_accuracy_drop": ACCURACY_DROP, "max_task_drop": {"my_mc": MC_DROP}},
    }
    return config_factory(**(sections | overrides))


def drops(store: RunStore) -> dict[int, tuple[float, float]]:
    """Each successful evaluation's (accuracy drop, my_mc drop) against the baseline's."""
    reference = store.evaluation(store.individual_at(-1, 0).id).result  # type: ignore[union-attr]
    assert reference.objectives is not None
    ref_mc = task_scores(reference.metadata)["my_mc"]
    out = {}
    for ident, row in store.evaluations().items():
        if row.result.ok and row.result.objectives is not None:
            mc = task_scores(row.result.metadata)["my_mc"]
            accuracy = reference.objectives["accuracy"] - row.result.objectives["accuracy"]
            out[ident] = (accuracy, ref_mc - mc)
    return out


# ---------------------------------------------------------------------- schema
def test_max_task_drop_is_one_flat_limit_per_task() -> None:
    config = ConstraintsConfig.model_validate(
        {"max_memory_mib": 9000, "max_task_drop": {"my_gen": 0.1, "my.mc": 0.02}}
    )
    assert config.active() == {
        "max_memory_mib": 9000,
        "max_task_drop.my_gen": 0.1,
        "max_task_drop.my.mc": 0.02,
    }
    constraint = constraint_of("max_task_drop.my.mc")
    assert constraint is not None and constraint.task == "my.mc" and constraint.is_drop
    assert constraint.unit == "fraction"
    assert constraint_of("max_task_drop.") is None and constraint_of("max_bogus") is None
    assert ConstraintsConfig().active() == {}  # absent: no column, as before


@pytest.mark.parametrize(
    ("value", "fragments"),
    [
        ({"my_mc": 1.5}, ["`constraints.max_task_drop.my_mc`", "<= 1", "1.5"]),
        ({"my_mc": -0.1}, ["`constraints.max_task_drop.my_mc`", ">= 0"]),
        ({"my_mc": "a lot"}, ["`constraints.max_task_drop.my_mc`", "must be a number"]),
        ([0.05], ["`constraints.max_task_drop`", "must be a mapping"]),
        ({" ": 0.05}, ["`constraints.max_task_drop`", "task names must not be empty"]),
    ],
)
def test_bad_max_task_drop_values_are_one_line_errors(value: Any, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"constraints": {"max_task_drop": value}})
    assert "\n" not in str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value)


# ---------------------------------------------------------------------- the constraint row
def _success(accuracy: float, scores: dict[str, float]) -> EvaluationResult:
    objectives = {"accuracy": accuracy, "latency": 10.0, "memory": 900.0, "energy": 5.0}
    return EvaluationResult.success(
        objectives | {"co2": 1.0},
        {"tasks": {name: {"score": s, "metric": "acc"} for name, s in scores.items()}},
    )


def test_one_task_past_its_limit_violates_while_the_mean_meets_its_own() -> None:
    constraints = Constraints(
        ConstraintsConfig(max_accuracy_drop=0.05, max_task_drop={"my_gen": 0.1, "my_mc": 0.05})
    )
    names = ["max_accuracy_drop", "max_task_drop.my_gen", "max_task_drop.my_mc"]
    assert constraints.names == names
    assert constraints.needs_reference and constraints.tasks == ["my_gen", "my_mc"]
    constraints.reference = _success(0.80, {"my_gen": 0.80, "my_mc": 0.80})
    # mean drop 0.03 (fine), my_mc drop 0.09 (0.04 past its 0.05), my_gen drop 0.0
    g = constraints.of(_success(0.77, {"my_gen": 0.80, "my_mc": 0.71}))
    assert g[0] == 0.0
    assert g[1] == pytest.approx(0.03 - 0.05)
    assert g[2] == pytest.approx(0.0 - 0.1)
    assert g[3] == pytest.approx(0.09 - 0.05)
    # a success whose record lacks a task's score cannot be shown to meet its limit
    g = constraints.of(_success(0.80, {"my_gen": 0.80}))
    assert g[3] == FAILURE_VIOLATION and g[2] <= 0


def test_without_max_task_drop_the_row_is_what_it_was() -> None:
    constraints = Constraints(ConstraintsConfig(max_accuracy_drop=0.05))
    assert constraints.names == ["max_accuracy_drop"] and constraints.tasks == []
    constraints.reference = _success(0.80, {})
    assert constraints.of(_success(0.74, {"x": 0.1})).tolist() == pytest.approx([0.0, 0.01])
    assert not Constraints(ConstraintsConfig(max_memory_mib=10)).needs_reference


# ---------------------------------------------------------------------- the search
def test_the_search_keeps_recipes_that_drop_one_task_too_far_off_the_front(
    config_factory, tmp_path
):
    with RunStore.open(run_search(task_config(config_factory), tmp_path / "tasks")) as store:
        measured = drops(store)
        front = load_front(store)
    # Recipes the accuracy limit alone lets through that drop my_mc too far: the landscape
    # has them, so the task limit had something to refuse.
    refused = {i for i, (acc, mc) in measured.items() if acc <= ACCURACY_DROP and mc > MC_DROP}
    assert refused
    assert front and all(m.feasible for m in front)
    assert not refused & {m.id for m in front}
    assert all(measured[m.id][1] <= MC_DROP + 1e-12 for m in front)

    # The same search without the task limit puts such recipes on its front.
    plain = task_config(config_factory, constraints={"max_accuracy_drop": ACCURACY_DROP})
    with RunStore.open(run_search(plain, tmp_path / "plain")) as store:
        measured = drops(store)
        assert any(measured[m.id][1] > MC_DROP for m in load_front(store))


def test_resume_keeps_max_task_drop_and_matches_an_uninterrupted_run(config_factory, tmp_path):
    full = task_config(config_factory)
    run_search(full, tmp_path / "full")
    short = task_config(
        config_factory,
        search={"population_size": 8, "generations": 2, "seed": 3, "recipes": "aggressive"},
    )
    run_search(short, tmp_path / "part")
    with RunStore.open(tmp_path / "part") as store:
        stored = yaml.safe_load(store.get_meta("config"))
    assert stored["constraints"]["max_task_drop"] == {"my_mc": MC_DROP}
    resume_search(tmp_path / "part", generations=4)
    assert final_state(tmp_path / "part", evaluations=True) == final_state(
        tmp_path / "full", evaluations=True
    )


class _NoTaskRecords(TaskScoresEvaluator):
    """Names tasks but records no per-task scores: a back end that breaks the contract."""

    name = "test-no-task-records"

    def _compute(self, recipe: Recipe) -> EvaluationResult:
        result = super()._compute(recipe)
        metadata = {k: v for k, v in result.metadata.items() if k != "tasks"}
        return EvaluationResult(result.status, result.objectives, result.reason, metadata)


def test_a_baseline_without_the_task_score_stops_the_run_naming_the_field(
    config_factory, tmp_path
):
    if _NoTaskRecords.name not in EVALUATORS:
        EVALUATORS.register(_NoTaskRecords.name, _NoTaskRecords)
    config = task_config(
        config_factory, evaluator={"name": _NoTaskRecords.name, "settings": {"tasks": TASKS}}
    )
    search = app.start_search(config, run_dir=tmp_path / "run")
    try:
        with pytest.raises(EvaluationError, match=r"`constraints.max_task_drop.my_mc`: the "):
            search.run()
    finally:
        search.close()


def test_a_failed_baseline_stops_a_run_with_only_task_limits(config_factory, tmp_path):
    settings = {"tasks": TASKS, "fail_if": {"quant.method": ["none"]}}
    config = task_config(
        config_factory,
        evaluator={"name": "test-tasks", "settings": settings},
        constraints={"max_task_drop": {"my_gen": 0.1}},
    )
    search = app.start_search(config, run_dir=tmp_path / "run")
    try:
        with pytest.raises(EvaluationError, match=r"`constraints\.max_task_drop` is measured"):
            search.run()
    finally:
        search.close()


# ---------------------------------------------------------------------- validate
def _check(tmp_path: Path, **sections: Any) -> None:
    register_task_evaluator()
    data = {"cache": {"enabled": False}, "output": {"runs_root": str(tmp_path)}} | sections
    app.checked_config(data)


def test_an_unknown_task_is_a_config_error_listing_the_tasks(tmp_path):
    with pytest.raises(ConfigError) as info:
        _check(
            tmp_path,
            evaluator={"name": "test-tasks", "settings": {"tasks": TASKS}},
            constraints={"max_task_drop": {"my_mc": 0.1, "foo": 0.05}},
        )
    assert str(info.value) == (
        "config: `constraints.max_task_drop.foo`: no such task in `evaluator.settings.tasks` "
        "(my_gen, my_mc)"
    )
    _check(  # every name known: valid
        tmp_path,
        evaluator={"name": "test-tasks", "settings": {"tasks": TASKS}},
        constraints={"max_task_drop": {"my_mc": 0.1, "my_gen": 0.05}},
    )


def test_the_single_task_setting_names_the_only_task(tmp_path):
    real = {"model": {"id": str(tmp_path / "my-model")}, "hardware": {"device": "cpu"}}
    evaluator = {"name": "transformers", "settings": {"task": "my_gen"}}
    _check(tmp_path, **real, evaluator=evaluator, constraints={"max_task_drop": {"my_gen": 0.1}})
    with pytest.raises(ConfigError, match=r"no such task in `evaluator.settings.task` \(my_gen\)"):
        _check(tmp_path, **real, evaluator=evaluator, constraints={"max_task_drop": {"mc": 0.1}})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        # the section of the back end this CPU machine picks
        (
            {"transformers": {"task": "my_gen"}},
            "`constraints.max_task_drop.my_mc`: no such task in "
            "`evaluator.settings.transformers.task` (my_gen)",
        ),
        # and the section of the back end another machine would pick
        (
            {"transformers": {"task": "my_mc"}, "vllm": {"tasks": [{"name": "a"}, "b"]}},
            "`constraints.max_task_drop.my_mc`: no such task in "
            "`evaluator.settings.vllm.tasks` (a, b)",
        ),
        (
            {"transformers": {"task": "my_mc"}, "vllm": {}},
            "`constraints.max_task_drop.my_mc`: no such task in "
            "`evaluator.settings.vllm.task` (reference)",
        ),
    ],
)
def test_auto_checks_every_back_ends_section(tmp_path, settings, message):
    real = {"model": {"id": str(tmp_path / "my-model")}, "hardware": {"device": "cpu"}}
    with pytest.raises(ConfigError) as info:
        _check(
            tmp_path,
            **real,
            evaluator={"name": "auto", "settings": settings},
            constraints={"max_task_drop": {"my_mc": 0.1}},
        )
    assert str(info.value) == f"config: {message}"


def test_auto_passes_when_every_section_has_the_task(tmp_path):
    real = {"model": {"id": str(tmp_path / "my-model")}, "hardware": {"device": "cpu"}}
    settings = {"transformers": {"task": "my_mc"}, "vllm": {"task": "my_mc"}}
    _check(
        tmp_path,
        **real,
        evaluator={"name": "auto", "settings": settings},
        constraints={"max_task_drop": {"my_mc": 0.1}},
    )


@pytest.mark.parametrize("name", ["synthetic", "auto"])
def test_the_synthetic_evaluator_refuses_max_task_drop(tmp_path, name):
    with pytest.raises(ConfigError) as info:
        _check(
            tmp_path,
            model={"id": "synthetic-7b"},
            evaluator={"name": name},
            constraints={"max_task_drop": {"my_mc": 0.1}},
        )
    assert str(info.value).startswith(
        "config: `constraints.max_task_drop`: the synthetic evaluator scores no lm-eval tasks"
    )


@pytest.mark.parametrize("key", ["tasks", "task", "task_include_path"])
def test_the_synthetic_evaluator_refuses_task_settings_with_a_reason(tmp_path, key):
    with pytest.raises(ConfigError) as info:
        _check(
            tmp_path,
            model={"id": "synthetic-7b"},
            evaluator={"name": "synthetic", "settings": {key: TASKS}},
        )
    assert str(info.value).startswith(
        f"config: `evaluator.settings.{key}`: the synthetic evaluator scores no lm-eval tasks"
    )


def test_validate_reports_an_unknown_task_in_one_line_and_runs_nothing(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"id": "synthetic-7b"},
                "output": {"runs_root": str(tmp_path / "runs")},
                "constraints": {"max_task_drop": {"my_mc": 0.1}},
            }
        )
    )
    for command in (["validate", path], ["run", "--config", path]):
        code, _, err = invoke_cli(*command)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1, err
        assert "`constraints.max_task_drop`" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_informed_operators_see_the_task_limits_and_the_baselines_scores(config_factory, tmp_path):
    config = task_config(
        config_factory,
        search={
            "population_size": 8,
            "generations": 3,
            "seed": 3,
            "recipes": "aggressive",
            "operators": {"mutation": [{"name": "expert"}]},
        },
    )
    search = app.start_search(config, run_dir=tmp_path / "run")
    try:
        search.run()
        context = search.variation_context(3)
        reference = search.store.evaluation(search.store.individual_at(-1, 0).id)
        assert reference is not None
        assert context.constraints == {
            "max_accuracy_drop": ACCURACY_DROP,
            "max_task_drop.my_mc": MC_DROP,
        }
        assert context.reference_tasks == task_scores(reference.result.metadata)
        measured = drops(search.store)
        for member in context.front:
            assert set(member.violations) == {"max_accuracy_drop", "max_task_drop.my_mc"}
            mc = member.violations["max_task_drop.my_mc"]
            assert mc == pytest.approx(measured[member.id][1] - MC_DROP)
    finally:
        search.close()
