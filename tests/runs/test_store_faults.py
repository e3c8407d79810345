"""The run store under faults: a kill during its creation, a full disk, damaged rows, a lost
WAL, a reader racing the writer, a read-only run directory. Each ends in a usable store or
one clear line, never a traceback or a run that can neither start nor resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from evo_compress.app import start_search
from evo_compress.exceptions import RunStoreError
from evo_compress.progress import ProgressListener
from evo_compress.reports.html import collect
from evo_compress.runs import RunStore
from evo_compress.runs.analysis import operator_stats
from evo_compress.runs.front import load_front, run_status
from evo_compress.runs.lineage import load_lineage
from evo_compress.runs.store import DB_NAME, SCHEMA
from evo_compress.testing import (
    assert_one_line_error,
    final_state,
    resume_search,
    run_cli,
    run_search,
)


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


# ---------------------------------------------------------------------- 2: a full disk
def test_a_full_store_stops_the_search_with_advice_and_resumes_to_the_same_end(
    config_factory, tmp_path
):
    config = config_factory()
    reference = final_state(run_search(config, tmp_path / "reference"), evaluations=True)

    run_dir = tmp_path / "run"
    search = start_search(config, run_dir=run_dir)
    try:
        # SQLite's own limit on the file's size: writes fail with SQLITE_FULL, as on a full
        # disk, a few pages into the run.
        pages = search.store._db.execute("PRAGMA page_count").fetchone()[0]
        search.store._db.execute(f"PRAGMA max_page_count = {pages + 6}")
        with pytest.raises(RunStoreError) as caught:
            search.run()
    finally:
        search.close()
    message = str(caught.value)
    assert "\n" not in message
    assert f"disk full while writing the run store at {run_dir / DB_NAME}" in message
    assert f"evo-compress resume {run_dir}" in message

    resume_search(run_dir)
    assert final_state(run_dir, evaluations=True) == reference


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mount point whose size a test sets (``mount`` needs root: skipped without)."""
    disk = tmp_path / "disk"
    disk.mkdir()

    def size(kib: int, remount: bool = False) -> None:
        options = f"{'remount,' if remount else ''}size={kib}k"
        args = ["mount", "-o", options, str(disk)] if remount else []
        args = args or ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(disk)]
        done = subprocess.run(args, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")

    yield disk, size
    subprocess.run(["umount", str(disk)], capture_output=True)


# Sizes at which the disk fills while the store is created, in its first generation and
# in a later one.
@pytest.mark.parametrize("kib", [8, 48, 96, 160])
def test_a_full_disk_is_one_line_then_the_run_resumes_once_space_is_freed(
    tmp_path, small_disk, kib
):
    disk, size = small_disk
    size(kib)
    config = write_config(tmp_path, generations=30)
    run_dir = disk / "run"
    proc = run_cli("run", "--config", config, "--run-dir", run_dir, check=False)
    line = assert_one_line_error(proc, "disk full", "free space")

    size(8192, remount=True)
    if "evo-compress resume" in line:
        done_before = [int(r) for r in _checkpoints(run_dir)]
        run_cli("resume", run_dir)
        assert _checkpoints(run_dir)[: len(done_before)] == done_before
    else:  # the store was never created: nothing to resume, and nothing half made
        assert "run again" in line
        assert not (run_dir / DB_NAME).exists()
        run_cli("run", "--config", config, "--run-dir", run_dir)
    assert "30 of 30" in run_cli("status", run_dir).stdout


def _checkpoints(run_dir: Path) -> list[int]:
    db = sqlite3.connect(run_dir / DB_NAME)
    try:
        return [r[0] for r in db.execute("SELECT generation FROM checkpoints ORDER BY 1")]
    finally:
        db.close()


# ---------------------------------------------------------------------- 3: damaged rows
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished 3-generation run; each test damages its own copy."""
    root = tmp_path_factory.mktemp("finished")
    run_dir = root / "run"
    run_cli("run", "--config", write_config(root), "--run-dir", run_dir)
    return run_dir


@pytest.fixture
def copied(finished, tmp_path):
    """A copy of the finished run for one test to change."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    return run_dir


@pytest.fixture
def damaged(copied):
    run_dir = copied

    def damage(sql: str) -> Path:
        db = sqlite3.connect(run_dir / DB_NAME)
        assert db.execute(sql).rowcount > 0
        db.commit()
        db.close()
        return run_dir

    return damage


class Messages(ProgressListener):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)


@pytest.mark.parametrize(
    ("sql", "detail"),
    [
        (
            "UPDATE checkpoints SET algorithm_state = '{}' WHERE generation = 2",
            "`algorithm_state` lacks `n_iter`",
        ),
        ("UPDATE checkpoints SET population = '[]' WHERE generation = 2", "`population` is empty"),
        (
            "UPDATE checkpoints SET algorithm_state = json_set(algorithm_state, '$.n_iter', 'x') "
            "WHERE generation = 2",
            "`algorithm_state.n_iter` must be an integer, got 'x'",
        ),
    ],
)
def test_resume_falls_back_past_a_damaged_last_checkpoint(finished, damaged, sql, detail):
    run_dir = damaged(sql)
    listener = Messages()
    resume_search(run_dir, listener=listener)
    warnings = [line for line in listener.lines if "damaged" in line]
    assert len(warnings) == 1, listener.lines
    assert f"run store {run_dir}: checkpoint of generation 2 is damaged: {detail}" in warnings[0]
    # Generation 2 was done again from checkpoint 1: the run ends where it had.
    assert final_state(run_dir, evaluations=True) == final_state(finished, evaluations=True)


@pytest.mark.parametrize(
    ("sql", "command", "fragments"),
    [
        (
            "UPDATE checkpoints SET algorithm_state = '{}' WHERE generation = 2",
            "front",
            ("checkpoint of generation 2 is damaged: `algorithm_state` lacks `n_iter`",),
        ),
        (
            "UPDATE checkpoints SET population = '[]' WHERE generation = 2",
            "front",
            ("checkpoint of generation 2 is damaged: `population` is empty",),
        ),
        (
            "UPDATE checkpoints SET population = '[]'",
            "resume",
            ("checkpoint of generation 0 is damaged: `population` is empty",),
        ),
        (
            "UPDATE meta SET value = '\"name: [unclosed\"' WHERE key = 'config'",
            "resume",
            ("meta `config` is damaged: not valid YAML",),
        ),
        (
            "UPDATE evaluations SET objectives = json_remove(objectives, '$.latency') "
            "WHERE status = 'ok'",
            "front",
            ("is damaged: `objectives` lacks `latency`", "evaluation of individual"),
        ),
        (
            "UPDATE evaluations SET objectives = json_remove(objectives, '$.latency') "
            "WHERE status = 'ok'",
            "resume",
            ("is damaged: `objectives` lacks `latency`",),
        ),
        (
            "UPDATE individuals SET parents = '{\"a\": 1}' WHERE generation = 1",
            "lineage",
            ("is damaged: `parents` must be a list of individual ids, got {'a': 1}",),
        ),
    ],
)
def test_a_damaged_row_is_named_in_one_line(damaged, sql, command, fragments):
    run_dir = damaged(sql)
    args = ("--generations", "4") if command == "resume" else ()
    proc = run_cli(command, run_dir, *args, check=False)
    assert_one_line_error(proc, f"run store {run_dir}: ", *fragments)


# ---------------------------------------------------------------------- 4: a lost WAL
KILL_IN_GENERATION_2 = """
import os, signal, sys
from pathlib import Path

from evo_compress.app import load_config, start_search

search = start_search(load_config(sys.argv[1]), run_dir=Path(sys.argv[2]))
original = search.evaluator.evaluate

def evaluate(recipe, space, placement=None):
    if getattr(search, "_generation", 0) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(recipe, space, placement)

search.evaluator.evaluate = evaluate
search.run()
"""


def test_completed_generations_survive_losing_the_wal_of_a_killed_run(tmp_path):
    config = write_config(tmp_path)
    reference = tmp_path / "reference"
    run_cli("run", "--config", config, "--run-dir", reference)
    run_dir = tmp_path / "run"
    killed = subprocess.run(
        [sys.executable, "-c", KILL_IN_GENERATION_2, str(config), str(run_dir)],
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    for suffix in ("-wal", "-shm"):
        (run_dir / (DB_NAME + suffix)).unlink(missing_ok=True)

    assert "generations: 2 of 3" in run_cli("status", run_dir).stdout
    run_cli("resume", run_dir)
    assert final_state(run_dir, evaluations=True) == final_state(reference, evaluations=True)


# ---------------------------------------------------------------------- 5: reading a live run
def grow_between_reads(reader: RunStore, run_dir: Path, generations: int) -> None:
    """The first time ``reader`` lists the individuals, a writer finishes another generation
    before the reader's next query: what a `lineage` or `report` beside a running search
    meets."""
    original = reader.individuals
    grown = {"done": False}

    def individuals(generation=None):
        rows = original(generation)
        if not grown["done"]:
            grown["done"] = True
            resume_search(run_dir, generations=generations)
        return rows

    reader.individuals = individuals  # type: ignore[method-assign]


def test_lineage_reads_one_snapshot_of_a_run_being_written(copied):
    run_dir = copied
    with RunStore.open(run_dir) as reader:
        before = [m.id for m in load_front(reader)]
        grow_between_reads(reader, run_dir, generations=4)
        graph = load_lineage(reader)
    assert graph.roots == before  # the front as of the snapshot, not the new generation's
    assert all(node.generation <= 2 for node in graph.nodes.values())
    assert "4 of 4" in run_cli("status", run_dir).stdout  # the writer did finish


def test_report_reads_one_snapshot_of_a_run_being_written(copied):
    run_dir = copied
    with RunStore.open(run_dir) as reader:
        grow_between_reads(reader, run_dir, generations=4)
        data = collect(reader)
    assert data.status["generations_done"] == 3 == len(data.history)
    assert {m.id for m in data.front} == set(data.lineage.roots)


def test_lineage_shows_a_parent_the_store_lacks_instead_of_failing(copied):
    run_dir = copied
    db = sqlite3.connect(run_dir / DB_NAME)
    child, parents = db.execute(
        "SELECT id, parents FROM individuals WHERE generation = 2 ORDER BY id LIMIT 1"
    ).fetchone()
    missing = json.loads(parents)[0]
    db.execute("DELETE FROM evaluations WHERE individual_id = ?", (missing,))
    db.execute("DELETE FROM credits WHERE individual_id = ?", (missing,))
    db.execute("DELETE FROM individuals WHERE id = ?", (missing,))
    db.commit()
    db.close()
    out = run_cli("lineage", run_dir, child).stdout
    assert f"#{missing}" in out and "not in the run store" in out


# ---------------------------------------------------------------------- 6: read-only runs
@pytest.fixture
def read_only_user(tmp_path_factory):
    """How to run the CLI as someone who may read a run directory but not write it: root
    ignores permission bits, so root runs it as `nobody` (setpriv); anyone else just loses
    write permission. Returns (a world-readable scratch folder, the prefix for run_cli)."""
    base = Path(tempfile.mkdtemp(prefix="evo-ro-"))
    base.chmod(0o755)  # pytest's own tmp folders are private to their owner
    prefix: list[str] = []
    if os.geteuid() == 0:
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        probe = subprocess.run([*prefix, sys.executable, "-c", "import evo_compress"])
        if probe.returncode != 0:
            pytest.skip("running as root, and cannot run the CLI as `nobody` to drop it")
    yield base, prefix
    for path in base.rglob("*"):
        if path.is_dir():
            path.chmod(0o755)
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("state", ["finished", "killed"])
def test_read_commands_work_on_a_run_directory_they_cannot_write(tmp_path, read_only_user, state):
    base, prefix = read_only_user
    config = write_config(tmp_path)
    run_dir = base / "run"
    if state == "finished":
        run_cli("run", "--config", config, "--run-dir", run_dir)
    else:  # the run's -wal and -shm files are still there
        subprocess.run([sys.executable, "-c", KILL_IN_GENERATION_2, str(config), str(run_dir)])
        assert (run_dir / (DB_NAME + "-wal")).exists()
    listing = sorted(p.name for p in run_dir.iterdir())
    for path in run_dir.iterdir():
        path.chmod(0o444)
    run_dir.chmod(0o555)
    out_dir = base / "out"
    out_dir.mkdir()
    out_dir.chmod(0o777)

    done = "3 of 3" if state == "finished" else "2 of 3"
    assert done in run_cli("status", run_dir, prefix=prefix).stdout
    seen = front_ids(run_dir, prefix=prefix)
    assert run_cli("history", run_dir, "--format", "json", prefix=prefix).stdout
    assert f"#{seen[0]}" in run_cli("lineage", run_dir, prefix=prefix).stdout
    assert run_cli("operators", run_dir, prefix=prefix).stdout
    report = out_dir / "report.html"
    run_cli("report", run_dir, "--out", report, prefix=prefix)
    assert report.stat().st_size > 0
    assert sorted(p.name for p in run_dir.iterdir()) == listing  # nothing left behind
    assert seen == front_ids(run_dir)  # what its owner sees


def test_reading_an_older_store_changes_nothing_in_it(damaged):
    run_dir = damaged("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    db = sqlite3.connect(run_dir / DB_NAME)
    db.executescript("DROP TABLE llm_calls; DROP TABLE credits;")
    db.close()
    with RunStore.open(run_dir, read_only=True) as store:
        assert run_status(store)["generations_done"] == 3
        assert operator_stats(store)  # from the individuals alone
    db = sqlite3.connect(run_dir / DB_NAME)
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
    db.close()
    assert "credits" not in tables and version == "1"
