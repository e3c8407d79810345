"""kill -9 in the middle of a generation, resume, and get the uninterrupted run's front."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

EXE = [sys.executable, "-m", "evo_compress.cli"]


def evaluations(run_dir: Path) -> int:
    try:
        db = sqlite3.connect(run_dir / "run.sqlite", timeout=5)
        try:
            return int(db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:
        return 0


def snapshot(run_dir: Path) -> dict[int, tuple]:
    db = sqlite3.connect(run_dir / "run.sqlite")
    try:
        rows = db.execute("SELECT individual_id, finished_at, objectives FROM evaluations")
        return {row[0]: row for row in rows}
    finally:
        db.close()


def front(run_dir: Path) -> list[dict]:
    out = subprocess.run(
        [*EXE, "front", str(run_dir), "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def write_config(path: Path, evaluation: dict) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "name": "kill",
                "search": {
                    "population_size": 8,
                    "generations": 5,
                    "seed": 11,
                    "recipes": "aggressive",
                },
                "evaluator": {"name": "synthetic", "settings": {"cost_s": 0.08}},
                "evaluation": evaluation,
                "output": {"runs_root": str(path.parent / "runs")},
            }
        )
    )
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "evaluation",
    [
        {},
        {"workers": 3},
        # The driver dies: Ray cancels its tasks; resume goes on as after any crash.
        {"backend": "ray", "ray": {"local_cpus": 2}},
    ],
    ids=["serial", "local-workers", "ray"],
)
def test_sigkill_mid_generation_then_resume_gives_the_same_front(tmp_path, evaluation):
    if evaluation.get("backend") == "ray":
        pytest.importorskip("ray")
    # The uninterrupted run is serial: the killed one must match it however it evaluates.
    config = write_config(tmp_path / "config.yaml", evaluation)
    reference = tmp_path / "uninterrupted"
    subprocess.run(
        [
            *EXE,
            "run",
            "--config",
            str(write_config(tmp_path / "serial.yaml", {})),
            "--run-dir",
            str(reference),
            "--no-cache",
        ],
        capture_output=True,
        text=True,
        check=True,
    )

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*EXE, "run", "--config", str(config), "--run-dir", str(killed), "--no-cache"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Reference (1) + generation 0 (8) + generation 1 (8) + 3 into generation 2.
    deadline = time.monotonic() + 120
    while evaluations(killed) < 1 + 8 + 8 + 3:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = evaluations(killed)
    assert done < 1 + 8 * 5
    before = snapshot(killed)

    status = subprocess.run(
        [*EXE, "status", str(killed)], capture_output=True, text=True, check=True
    ).stdout
    assert "stopped before its last generation" in status

    resumed = subprocess.run(
        [*EXE, "resume", str(killed), "--no-cache"], capture_output=True, text=True, check=True
    )
    assert "generation 4:" in resumed.stdout
    assert front(killed) == front(reference)
    # Nothing evaluated before the kill was evaluated again: those rows are untouched.
    after = snapshot(killed)
    assert len(before) == done and all(after[key] == row for key, row in before.items())
