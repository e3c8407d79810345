"""A real search on the reference model, end to end, kept short enough for CI: the trained
model (cached once per machine), the transformers back end in worker processes, lm-eval
accuracy, measured latency and memory, estimated energy, checkpoint and front."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

EXE = [sys.executable, "-m", "evo_compress.cli"]


@pytest.mark.slow
def test_a_short_real_search_on_the_reference_model(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "ci-reference",
                "model": {"id": "reference"},
                "hardware": {"device": "cpu"},
                "constraints": {"max_accuracy_drop": 0.5},
                "search": {
                    "population_size": 4,
                    "generations": 2,
                    "seed": 0,
                    "recipes": "conservative",
                    "space": {
                        "genes": {
                            "recovery.steps": {"low": 50, "high": 100, "step": 50},
                            "serve.max_num_seqs": {"choices": [1, 4]},
                        }
                    },
                },
                "evaluator": {
                    "name": "transformers",
                    "settings": {
                        "threads": 2,
                        "limit": 60,
                        "latency_prompts": 4,
                        "max_new_tokens": 4,
                        "latency_repeats": 2,
                        "timeout_s": 600,
                    },
                },
                "output": {"runs_root": str(tmp_path / "runs")},
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
    assert "generation 1:" in proc.stdout

    front = json.loads(
        subprocess.run(
            [*EXE, "front", str(run_dir), "--format", "json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert front and all(m["feasible"] for m in front)

    import sqlite3

    db = sqlite3.connect(run_dir / "run.sqlite")
    rows = db.execute(
        "SELECT e.status, e.objectives, e.metadata FROM evaluations e "
        "JOIN individuals i ON i.id = e.individual_id WHERE i.generation = -1"
    ).fetchall()
    status, objectives, metadata = rows[0]
    assert status == "ok"
    baseline = json.loads(objectives)
    how = json.loads(metadata)["objectives"]
    # The trained reference model really solves the task; compression has room to lose.
    assert baseline["accuracy"] >= 0.8
    assert how["energy"]["measured"] is False and "estimated" in how["energy"]["how"]
    statuses = [r[0] for r in db.execute("SELECT status FROM evaluations")]
    assert statuses.count("ok") >= len(statuses) - 1
