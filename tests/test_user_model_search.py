"""The path a real user takes, end to end: their own model folder, two lm-eval tasks of their
own over local JSONL (one generated answer, one multiple choice), weights and a per-task
constraint, a two-generation search on the transformers back end. This is the reproduction
of issue 18, which failed every evaluation before."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys

import pytest
import yaml

from evo_compress.reference import default_cache_dir, ensure_reference_model
from evo_compress.testing.user_tasks import write_user_tasks

EXE = [sys.executable, "-m", "evo_compress.cli"]


@pytest.mark.slow
def test_a_search_with_a_local_model_and_two_local_tasks(tmp_path):
    model = tmp_path / "mymodel"
    shutil.copytree(ensure_reference_model(default_cache_dir(), progress=False), model)
    tasks = write_user_tasks(tmp_path / "tasks")
    gen, mc = tasks["generate"], tasks["multiple_choice"]
    config = tmp_path / "population.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "my-model",
                "model": {"id": str(model)},
                "hardware": {"device": "cpu"},
                "constraints": {"max_task_drop": {mc: 0.5}},
                "search": {
                    "population_size": 4,
                    "generations": 2,
                    "seed": 0,
                    "recipes": "conservative",
                    "space": {"genes": {"recovery.steps": {"low": 50, "high": 100, "step": 50}}},
                },
                "evaluator": {
                    "name": "transformers",
                    "settings": {
                        "tasks": [
                            {"name": gen, "weight": 2},
                            {"name": mc, "weight": 1, "limit": 20, "num_fewshot": 0},
                        ],
                        "task_include_path": str(tasks["include_path"]),
                        "limit": 20,
                        "threads": 2,
                        "latency_prompts": 4,
                        "max_new_tokens": 4,
                        "latency_repeats": 2,
                        "timeout_s": 600,
                    },
                },
            }
        )
    )
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [*EXE, "run", "--config", str(config), "--run-dir", str(run_dir), "--no-cache"],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    db = sqlite3.connect(run_dir / "run.sqlite")
    rows = db.execute("SELECT status, objectives, metadata FROM evaluations").fetchall()
    assert len(rows) >= 5  # the baseline and two generations of offspring
    for status, objectives, metadata in rows:
        if status == "infeasible":  # refused before loading, with a reason: no scores
            continue
        assert status == "ok", metadata
        scores = json.loads(metadata)["tasks"]
        assert set(scores) == {gen, mc}
        weighted = (2 * scores[gen]["score"] + scores[mc]["score"]) / 3
        assert json.loads(objectives)["accuracy"] == pytest.approx(weighted)
        assert scores[mc]["n"] == 20 and scores[mc]["metric"] == "acc"
        assert scores[gen]["metric"] == "exact_match"

    front = json.loads(
        subprocess.run(
            [*EXE, "front", str(run_dir), "--format", "json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert front
    for member in front:
        assert set(member["tasks"]) == {gen, mc}
