"""Per-task scores and `max_task_drop` limits in `export` (objectives.json, README.md) and
`compare`. The runs use ``evo_compress.testing.tasks``' double, which records two tasks the
way the real-model back ends do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from evo_compress.app import checked_config
from evo_compress.fitness.noise import AccuracyEstimate
from evo_compress.objectives import task_scores
from evo_compress.runs import RunStore
from evo_compress.runs.compare import compare_runs, render_comparison
from evo_compress.runs.export import OBJECTIVES_FILE, README_FILE, export_recipe
from evo_compress.runs.front import load_front
from evo_compress.testing import invoke_cli, register_task_evaluator, run_search

TASKS = [
    {"name": "my_gen", "weight": 2, "sensitivity": 0.5, "metric": "exact_match"},
    {"name": "my_mc", "weight": 1, "sensitivity": 2.0},
]
MC_DROP = 0.05


def _run(root: Path, name: str, mc_drop: float) -> Path:
    register_task_evaluator()
    config = checked_config(
        {
            "name": name,
            "search": {"population_size": 8, "generations": 2, "seed": 3, "recipes": "aggressive"},
            "evaluator": {"name": "test-tasks", "settings": {"tasks": TASKS}},
            "constraints": {"max_accuracy_drop": 0.08, "max_task_drop": {"my_mc": mc_drop}},
            "cache": {"enabled": False},
            "output": {"runs_root": str(root / "runs")},
        }
    )
    return run_search(config, root / name)


@pytest.fixture(scope="module")
def task_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run(tmp_path_factory.mktemp("tasks"), "tasks", MC_DROP)


def _mc_drops(run_dir: Path) -> tuple[dict[int, float], list[int], dict[int, dict[str, Any]]]:
    """Each success's my_mc drop from the baseline, the front's ids, each success's tasks."""
    with RunStore.open(run_dir) as store:
        reference = store.evaluation(store.individual_at(-1, 0).id).result  # type: ignore[union-attr]
        ref_mc = task_scores(reference.metadata)["my_mc"]
        rows = {i: r.result for i, r in store.evaluations().items() if r.result.ok}
        front = [m.id for m in load_front(store)]
    drops = {i: ref_mc - task_scores(r.metadata)["my_mc"] for i, r in rows.items()}
    return drops, front, {i: r.metadata["tasks"] for i, r in rows.items()}


def test_export_lists_the_task_scores_and_each_task_limit(task_run: Path, tmp_path: Path) -> None:
    drops, front, tasks = _mc_drops(task_run)
    ident = front[0]
    code, _, err = invoke_cli("export", task_run, ident, "--out", tmp_path / "out")
    assert code == 0, err
    data = json.loads((tmp_path / "out" / OBJECTIVES_FILE).read_text())
    assert data["tasks"] == tasks[ident]
    limit = data["constraints"]["max_task_drop.my_mc"]
    assert limit["limit"] == MC_DROP and limit["satisfied"] is True
    assert limit["value"] == pytest.approx(drops[ident])
    assert data["feasible"] is True

    readme = (tmp_path / "out" / README_FILE).read_text()
    assert "| task | score | metric | items | weight |" in readme
    for name, task in tasks[ident].items():
        score = AccuracyEstimate(task["score"], task["stderr"]).text()
        row = f"| {name} | {score} | {task['metric']} | {task['n']} | {task['weight']:g} |"
        assert row in readme
    assert f"- `max_task_drop.my_mc` <= {MC_DROP:g}: " in readme


def test_export_of_a_recipe_past_a_task_limit_says_it_is_violated(
    task_run: Path, tmp_path: Path
) -> None:
    drops, _, _ = _mc_drops(task_run)
    past = [i for i, drop in drops.items() if drop > MC_DROP]
    assert past, "the landscape has recipes that drop my_mc too far"
    with RunStore.open(task_run) as store:
        export_recipe(store, past[0], tmp_path / "out")
    data = json.loads((tmp_path / "out" / OBJECTIVES_FILE).read_text())
    assert data["constraints"]["max_task_drop.my_mc"]["satisfied"] is False
    assert data["feasible"] is False
    assert "(violated)" in (tmp_path / "out" / README_FILE).read_text()


def test_compare_reads_task_limits_as_flat_keys(task_run: Path, tmp_path: Path) -> None:
    other = _run(tmp_path, "stricter", 0.03)
    with RunStore.open(task_run) as a, RunStore.open(other) as b:
        result = compare_runs(a, b)
    assert result["a"]["constraints"] == {"max_accuracy_drop": 0.08, "max_task_drop.my_mc": 0.05}
    assert any(
        "max_task_drop.my_mc 0.05 vs max_accuracy_drop 0.08, max_task_drop.my_mc 0.03" in w
        for w in result["warnings"]
    ), result["warnings"]
    assert "B: stricter" in render_comparison(result)
