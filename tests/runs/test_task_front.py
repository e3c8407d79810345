"""Per-task scores (``metadata["tasks"]``) where a run's front is shown: `front --format json`,
the table and CSV, and the HTML report. The run uses ``evo_compress.testing.tasks``' double,
which records two tasks the way the real-model back ends do."""

from __future__ import annotations

import base64
import csv
import gzip
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest

from evo_compress.app import checked_config
from evo_compress.fitness.noise import AccuracyEstimate
from evo_compress.reports import write_report
from evo_compress.runs import RunStore
from evo_compress.runs.front import FrontMember, load_front
from evo_compress.testing import invoke_cli, register_task_evaluator, run_search

TASKS = [
    {"name": "my_gen", "weight": 2, "sensitivity": 0.5, "metric": "exact_match"},
    {"name": "my_mc", "weight": 1, "sensitivity": 2.0},
]


@pytest.fixture(scope="module")
def task_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    register_task_evaluator()
    tmp = tmp_path_factory.mktemp("tasks")
    config = checked_config(
        {
            "name": "tasks",
            "search": {"population_size": 8, "generations": 2, "seed": 3, "recipes": "aggressive"},
            "evaluator": {"name": "test-tasks", "settings": {"tasks": TASKS}},
            "constraints": {"max_accuracy_drop": 0.08, "max_task_drop": {"my_mc": 0.05}},
            "cache": {"enabled": False},
            "output": {"runs_root": str(tmp / "runs")},
        }
    )
    return run_search(config, tmp / "run")


def stored_tasks(run_dir: Path) -> dict[int, dict[str, Any]]:
    """Each front member's metadata.tasks as the run store holds it."""
    with RunStore.open(run_dir) as store:
        return {
            m.id: store.evaluation(m.id).result.metadata["tasks"]  # type: ignore[union-attr]
            for m in load_front(store)
        }


def test_front_json_shows_each_members_task_records(task_run: Path) -> None:
    code, out, err = invoke_cli("front", task_run, "--format", "json")
    assert code == 0, err
    members = json.loads(out)
    stored = stored_tasks(task_run)
    assert members and {m["id"] for m in members} == set(stored)
    for member in members:
        assert set(member["tasks"]) == {"my_gen", "my_mc"}
        for name, task in member["tasks"].items():
            assert set(task) == {"score", "stderr", "n", "metric", "weight"}
            assert task == stored[member["id"]][name]
        assert member["tasks"]["my_gen"]["metric"] == "exact_match"
        # the accuracy objective is the weighted mean of the scores, as the contract says
        scores = member["tasks"]
        mean = (2 * scores["my_gen"]["score"] + scores["my_mc"]["score"]) / 3
        assert member["objectives"]["accuracy"] == pytest.approx(mean)


def test_the_front_table_has_one_score_column_per_task(task_run: Path) -> None:
    code, out, err = invoke_cli("front", task_run)
    assert code == 0, err
    header = out[: out.index("┡")]  # the table's header rows
    assert "my_gen" in header and "my_mc" in header
    stored = stored_tasks(task_run)
    first = next(iter(sorted(stored)))
    row = next(line for line in out.splitlines() if line.startswith(f"│ {first:>2} │"))
    cells = [c.strip() for c in row.split("│")]
    for name in ("my_gen", "my_mc"):
        assert f"{stored[first][name]['score']:.3f}" in cells


def test_front_csv_has_each_tasks_score_and_stderr(task_run: Path) -> None:
    code, out, err = invoke_cli("front", task_run, "--format", "csv")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    stored = stored_tasks(task_run)
    for row in rows:
        task = stored[int(row["id"])]["my_mc"]
        assert float(row["task.my_mc.score"]) == task["score"]
        assert float(row["task.my_mc.stderr"]) == task["stderr"]


def test_the_report_shows_task_scores_in_the_hover_and_the_table(
    task_run: Path, tmp_path: Path
) -> None:
    with RunStore.open(task_run) as store:
        page = write_report(store, tmp_path / "report.html").read_text()
        front = load_front(store)
    table = page[page.index("<th>task my_gen") :]
    assert "<th>task my_mc" in table
    member = front[0]
    entry = member.tasks["my_mc"]
    score = AccuracyEstimate(entry["score"], entry["stderr"]).text()
    cell = f'{score}<div class="how">acc, {entry["n"]} items, weight 1</div>'
    assert cell in table
    # the hover of each point of the front plots, in the figures' packed data
    packed = re.search(r'<script type="application/gzip" id="report-figures">([^<]*)<', page)
    assert packed is not None
    figures = json.loads(gzip.decompress(base64.b64decode(packed.group(1))).decode("utf-8"))
    hovers = json.dumps(figures, ensure_ascii=False)
    assert f"task my_mc {score} (acc, {entry['n']} items, weight 1)" in hovers


def _member(how: dict[str, Any]) -> FrontMember:
    objectives = {"accuracy": 0.8, "latency": 1.0, "memory": 2.0, "energy": 3.0, "co2": 4.0}
    return FrontMember(1, 0, {}, objectives, True, how)


def test_a_member_without_task_records_shows_none() -> None:
    assert "tasks" not in _member({"evaluator": "synthetic"}).to_json()
    # records are read leniently: a malformed entry is left out, bad fields become null
    how = {"tasks": {"a": {"score": 0.5, "stderr": -1, "n": 2.5, "metric": 3}, "b": {"x": 1}}}
    assert _member(how).to_json()["tasks"] == {
        "a": {"score": 0.5, "stderr": None, "n": None, "metric": None, "weight": None}
    }
