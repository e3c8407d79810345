"""The run store under faults: a kill during its creation, a full disk, damaged rows, a lost
WAL, a reader racing the writer, a read-only run directory. Each ends in a usable store or
one clear line, never a traceback or a run that can neither start nor resume."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evo_compress.runs.store import DB_NAME, SCHEMA
from evo_compress.testing import assert_one_line_error, run_cli


def write_config(tmp_path: Path, generations: int = 3) -> Path:
    data = {
        "name": "faults",
        "search": {"population_size": 6, "generations": generations, "seed": 5},
        "evaluator": {"name": "synthetic"},
        "cache": {"enabled": False},
        "output": {"runs_root": str(tmp_path / "runs")},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def front_ids(run_dir: Path, **kwargs) -> list[int]:
    out = run_cli("front", run_dir, "--format", "json", **kwargs)
    return [m["id"] for m in json.loads(out.stdout)]


# ---------------------------------------------------------------------- 1: creation
# The process dies (SIGKILL) the moment the store's meta rows are written: the one step every
# way of creating the store goes through.
KILL_IN_CREATE = """
import os, signal, sys
from evo_compress.runs.store import RunStore
RunStore.set_meta = lambda self, values: os.kill(os.getpid(), signal.SIGKILL)
from evo_compress.cli import main
sys.argv = ["evo-compress", *sys.argv[1:]]
main()
"""


def test_a_kill_while_the_store_is_created_leaves_a_directory_run_accepts(tmp_path):
    config = write_config(tmp_path)
    run_dir = tmp_path / "run"
    args = ["run", "--config", str(config), "--run-dir", str(run_dir)]
    killed = subprocess.run(
        [sys.executable, "-c", KILL_IN_CREATE, *args], capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # No half-made store: either none or a complete one.
    proc = run_cli("resume", run_dir, check=False)
    assert_one_line_error(proc, str(run_dir))

    run_cli(*args)
    assert front_ids(run_dir)
    assert "3 of 3" in run_cli("status", run_dir).stdout


@pytest.mark.parametrize("leftover", ["empty file", "schema without meta"])
def test_run_reuses_an_unfinished_store_from_an_older_crash(tmp_path, leftover):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if leftover == "empty file":
        (run_dir / DB_NAME).write_bytes(b"")
    else:
        db = sqlite3.connect(run_dir / DB_NAME)
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA)
        db.close()
    proc = run_cli("resume", run_dir, check=False)
    assert_one_line_error(proc, "evo-compress run")

    out = run_cli("run", "--config", write_config(tmp_path), "--run-dir", run_dir)
    assert out.stdout.count("unfinished run store") == 1, out.stdout
    assert front_ids(run_dir)


def test_run_still_refuses_a_store_that_holds_data(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    db = sqlite3.connect(run_dir / DB_NAME)
    db.execute("CREATE TABLE notes (text TEXT)")
    db.execute("INSERT INTO notes VALUES ('mine')")
    db.commit()
    db.close()
    proc = run_cli("run", "--config", write_config(tmp_path), "--run-dir", run_dir, check=False)
    assert_one_line_error(proc, "already holds")
    db = sqlite3.connect(run_dir / DB_NAME)
    assert db.execute("SELECT text FROM notes").fetchall() == [("mine",)]
    db.close()
