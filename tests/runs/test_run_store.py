"""The run store: plain readable rows, the writer lock, clear errors on damaged files."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest

from evo_compress.app import start_search
from evo_compress.exceptions import RunStoreError
from evo_compress.runs import RunStore
from evo_compress.runs._schema import SCHEMA_VERSION
from evo_compress.runs.front import load_front, run_status
from evo_compress.runs.store import DB_NAME


@pytest.fixture
def finished_run(config_factory, tmp_path):
    run_dir = tmp_path / "run"
    search = start_search(config_factory(), run_dir=run_dir)
    search.run()
    search.close()
    return run_dir


def test_rows_are_plain_json_readable_without_evo_compress(finished_run):
    db = sqlite3.connect(finished_run / DB_NAME)
    recipe, parents, operators = db.execute(
        "SELECT recipe, parents, operators FROM individuals WHERE generation = 2 LIMIT 1"
    ).fetchone()
    assert "quant.method" in json.loads(recipe)
    assert isinstance(json.loads(parents), list) and json.loads(operators)
    objectives, metadata = db.execute(
        "SELECT objectives, metadata FROM evaluations WHERE status = 'ok' LIMIT 1"
    ).fetchone()
    assert set(json.loads(objectives)) == {"accuracy", "latency", "memory", "energy", "co2"}
    assert json.loads(metadata)["synthetic"] is True
    population, state = db.execute(
        "SELECT population, algorithm_state FROM checkpoints ORDER BY generation DESC LIMIT 1"
    ).fetchone()
    # Big RNG integers are stored as text so jq and JavaScript read them exactly.
    assert isinstance(json.loads(state)["rng"]["state"]["state"]["int"], str)
    assert all("id" in entry for entry in json.loads(population))
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_config_is_frozen_in_the_run_dir(finished_run):
    assert "population_size: 8" in (finished_run / "config.yaml").read_text()


def test_a_second_process_cannot_take_the_lock(finished_run):
    store = RunStore.open(finished_run)
    store.lock()
    code = (
        "from evo_compress.runs import RunStore\n"
        f"s = RunStore.open({str(finished_run)!r})\n"
        "try:\n    s.lock()\nexcept Exception as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "in use by another evo-compress process" in out.stdout
    assert "pid" in out.stdout
    assert run_status(RunStore.open(finished_run))["state"].startswith("running")
    store.close()
    assert run_status(RunStore.open(finished_run))["state"] == "finished"


def test_missing_and_foreign_directories_give_clear_errors(tmp_path):
    with pytest.raises(RunStoreError, match="does not exist"):
        RunStore.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunStoreError, match="not a run directory"):
        RunStore.open(tmp_path / "empty")


def test_a_corrupted_database_gives_a_clear_error(finished_run):
    (finished_run / DB_NAME).write_bytes(b"this is not sqlite" * 100)
    for suffix in ("-wal", "-shm"):
        (finished_run / (DB_NAME + suffix)).unlink(missing_ok=True)
    with pytest.raises(RunStoreError, match=r"not a (readable SQLite run store|evo-compress)"):
        RunStore.open(finished_run)


def test_a_damaged_checkpoint_row_names_the_checkpoint(finished_run):
    db = sqlite3.connect(finished_run / DB_NAME)
    db.execute("UPDATE checkpoints SET population = '{broken' WHERE generation = 3")
    db.commit()
    db.close()
    with (
        RunStore.open(finished_run) as store,
        pytest.raises(RunStoreError, match="checkpoint of generation 3 is damaged"),
    ):
        load_front(store)


@pytest.mark.parametrize(
    ("sql", "read", "message"),
    [
        (
            "UPDATE checkpoints SET population = json_remove(population, '$[0].id')",
            RunStore.checkpoints,
            "checkpoint of generation 0 is damaged: `population[0]` lacks `id`",
        ),
        (
            "UPDATE checkpoints SET population = json_set(population, '$[1].cv', 'x')",
            RunStore.checkpoints,
            "`population[1].cv` must be a number, got 'x'",
        ),
        (
            "UPDATE checkpoints SET algorithm_state = json_set(algorithm_state, '$.survival', 3)",
            RunStore.checkpoints,
            "`algorithm_state.survival` must be a mapping, got 3",
        ),
        (
            "UPDATE evaluations SET objectives = json_set(objectives, '$.energy', 'inf') "
            "WHERE status = 'ok'",
            RunStore.evaluated_objectives,
            "`objectives.energy` must be a finite number, got 'inf'",
        ),
        (
            "UPDATE evaluations SET objectives = replace(objectives, '\"co2\": ', "
            "'\"co2\": 1' || printf('%0400d', 0) || ', \"was\": ') WHERE status = 'ok'",
            RunStore.evaluations,
            "`objectives.co2` must be a finite number, got 1000",
        ),
        (
            "UPDATE evaluations SET status = 'done'",
            RunStore.evaluations,
            "`status` must be 'ok', 'failed' or 'infeasible', got 'done'",
        ),
        (
            "UPDATE evaluations SET objectives = NULL WHERE status = 'ok'",
            RunStore.evaluations,
            "`objectives` is missing from a successful evaluation",
        ),
        (
            "UPDATE individuals SET operators = '[\"uniform\", 3]' WHERE generation = 1",
            RunStore.individuals,
            "`operators` must be a list of names, got ['uniform', 3]",
        ),
        (
            "UPDATE individuals SET recipe = '[1]' WHERE generation = 1",
            RunStore.individuals,
            "`recipe` must be a mapping, got [1]",
        ),
    ],
)
def test_a_damaged_field_is_named_with_its_path(finished_run, sql, read, message):
    db = sqlite3.connect(finished_run / DB_NAME)
    assert db.execute(sql).rowcount > 0
    db.commit()
    db.close()
    with RunStore.open(finished_run) as store, pytest.raises(RunStoreError) as caught:
        read(store)
    assert str(caught.value).startswith(f"run store {finished_run}: ")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_store_from_a_newer_version_is_refused(finished_run):
    db = sqlite3.connect(finished_run / DB_NAME)
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(RunStoreError, match="newer evo-compress"):
        RunStore.open(finished_run)


def schema_of(path):
    db = sqlite3.connect(path)
    rows = db.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
    db.close()
    return rows


def test_an_older_store_is_upgraded_to_the_tables_a_new_one_has(finished_run, tmp_path):
    fresh = RunStore.create(tmp_path / "fresh", "a: 1\n", {})
    fresh.close()
    db = sqlite3.connect(finished_run / DB_NAME)
    db.executescript(
        "DROP TABLE llm_calls; DROP TABLE credits;"
        "UPDATE meta SET value = '1' WHERE key = 'schema_version';"
    )
    db.close()
    front = [m.id for m in load_front(RunStore.open(finished_run, read_only=True))]
    with RunStore.open(finished_run) as store:
        assert store.get_meta("schema_version") == SCHEMA_VERSION
        assert store.llm_calls() == [] and store.credits() == []
        assert [m.id for m in load_front(store)] == front
    assert schema_of(finished_run / DB_NAME) == schema_of(tmp_path / "fresh" / DB_NAME)


def test_status_counts_generations_and_evaluations(finished_run):
    with RunStore.open(finished_run) as store:
        info = run_status(store)
    assert info["generations_done"] == 4 == info["generations_target"]
    assert info["evaluations"] == 1 + 8 * 4  # the baseline reference, then 4 generations
    assert info["state"] == "finished"
    assert [h["generation"] for h in info["history"]] == [0, 1, 2, 3]


def test_status_sums_where_the_evaluations_time_went(finished_run):
    with RunStore.open(finished_run) as store:
        assert run_status(store)["seconds_split"] is None  # the synthetic back end has none
    db = sqlite3.connect(finished_run / DB_NAME)
    rows = db.execute("SELECT individual_id, metadata FROM evaluations LIMIT 3").fetchall()
    splits = [{"server_start": 40.0, "latency": 2.0}, {"server_start": 30.5, "accuracy": 3.0}]
    for (ident, metadata), split in zip(rows, splits, strict=False):
        db.execute(
            "UPDATE evaluations SET metadata = ? WHERE individual_id = ?",
            (json.dumps({**json.loads(metadata), "seconds_split": split}), ident),
        )
    # A result taken from the cache cost this run nothing: its split is not counted.
    ident, metadata = rows[2]
    db.execute(
        "UPDATE evaluations SET metadata = ?, source = 'cache' WHERE individual_id = ?",
        (json.dumps({**json.loads(metadata), "seconds_split": {"server_start": 99.0}}), ident),
    )
    db.commit()
    db.close()
    with RunStore.open(finished_run) as store:
        split = run_status(store)["seconds_split"]
    assert split == {
        "evaluations": 2,
        "phases": {"server_start": 70.5, "latency": 2.0, "accuracy": 3.0},
    }
    shown = subprocess.run(
        [sys.executable, "-m", "evo_compress", "status", str(finished_run)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert shown.returncode == 0, shown.stderr
    assert "time by phase over 2 evaluations: server start 70 s (93%)" in shown.stdout
