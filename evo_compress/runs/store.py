"""The run store: one SQLite database (WAL) per run directory, plain rows readable by sqlite3/jq.

Every individual, every evaluation (committed the moment it finishes) and one checkpoint per
completed generation. Nothing is pickled: a later version of the tool must read these rows.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evo_compress.exceptions import RunStoreError
from evo_compress.fitness._base import EvaluationResult

SCHEMA_VERSION = 1
DB_NAME = "run.sqlite"
CONFIG_NAME = "config.yaml"
LOCK_NAME = ".lock"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS individuals (
    id INTEGER PRIMARY KEY,
    generation INTEGER NOT NULL,          -- -1: the baseline reference, 0: initial population
    slot INTEGER NOT NULL,                -- position among the generation's offspring
    hash TEXT NOT NULL,                   -- SHA-256 of the canonical recipe JSON
    recipe TEXT NOT NULL,                 -- canonical recipe JSON (dotted gene names)
    parents TEXT NOT NULL,                -- JSON list of individual ids
    operators TEXT NOT NULL,              -- JSON list of operator names that made it
    created_at REAL NOT NULL,
    UNIQUE (generation, slot)
);
CREATE INDEX IF NOT EXISTS individuals_hash ON individuals (hash);
CREATE TABLE IF NOT EXISTS evaluations (
    individual_id INTEGER PRIMARY KEY REFERENCES individuals (id),
    status TEXT NOT NULL,                 -- ok | failed | infeasible
    objectives TEXT,                      -- JSON {accuracy, latency, memory, energy, co2}
    reason TEXT,                          -- why it failed or is infeasible
    source TEXT NOT NULL,                 -- evaluated | cache | run (reused within this run)
    duration_s REAL NOT NULL,             -- of the original evaluation
    finished_at REAL NOT NULL,
    metadata TEXT NOT NULL                -- JSON: how each value was obtained
);
CREATE TABLE IF NOT EXISTS checkpoints (
    generation INTEGER PRIMARY KEY,
    population TEXT NOT NULL,             -- JSON list of {id, rank, crowding, cv, ...}
    algorithm_state TEXT NOT NULL,        -- JSON: RNG state, iteration, survival state
    operator_state TEXT NOT NULL,         -- JSON per operator
    stats TEXT NOT NULL,                  -- JSON: hypervolume, front size, counts
    created_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class IndividualRow:
    id: int
    generation: int
    slot: int
    hash: str
    recipe: dict[str, Any]
    parents: list[int]
    operators: list[str]


@dataclass(frozen=True)
class EvaluationRow:
    individual_id: int
    result: EvaluationResult
    source: str


@dataclass(frozen=True)
class Checkpoint:
    generation: int
    population: list[dict[str, Any]]
    algorithm_state: dict[str, Any]
    operator_state: dict[str, Any]
    stats: dict[str, Any]


def is_run_dir(path: Path) -> bool:
    return (path / DB_NAME).is_file()


class RunStore:
    """Read and write one run directory. Use ``create`` or ``open``, then ``lock`` to write."""

    def __init__(self, run_dir: Path, db: sqlite3.Connection) -> None:
        self.run_dir = run_dir
        self._db = db
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, run_dir: str | Path, config_yaml: str, meta: dict[str, Any]) -> RunStore:
        run_dir = Path(run_dir)
        if is_run_dir(run_dir):
            raise RunStoreError(
                f"{run_dir} already holds a run; continue it with `evo-compress resume {run_dir}`"
            )
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunStoreError(f"cannot create run directory {run_dir}: {exc.strerror}") from None
        (run_dir / CONFIG_NAME).write_text(config_yaml)
        store = cls(run_dir, _connect(run_dir / DB_NAME))
        store._db.executescript(SCHEMA)
        store.set_meta(
            {
                "schema_version": SCHEMA_VERSION,
                "config": config_yaml,
                "created_at": time.time(),
                **meta,
            }
        )
        return store

    @classmethod
    def open(cls, run_dir: str | Path) -> RunStore:
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise RunStoreError(f"run directory {run_dir} does not exist")
        if not is_run_dir(run_dir):
            raise RunStoreError(f"{run_dir} is not a run directory (no {DB_NAME} in it)")
        store = cls(run_dir, _connect(run_dir / DB_NAME))
        try:
            version = int(store.get_meta("schema_version"))
        except (RunStoreError, TypeError, ValueError):
            raise RunStoreError(f"{run_dir / DB_NAME} is not an evo-compress run store") from None
        if version > SCHEMA_VERSION:
            raise RunStoreError(
                f"{run_dir} was written by a newer evo-compress (store schema {version}, "
                f"this version reads up to {SCHEMA_VERSION}); upgrade evo-compress"
            )
        return store

    def lock(self) -> None:
        """Take the run's writer lock; a second process gets a clear error, never a mixed run.

        ``flock`` is released by the kernel when the process dies, even by ``kill -9``.
        """
        path = self.run_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunStoreError(
                f"{self.run_dir} is in use by another evo-compress process (pid {holder}); "
                "wait for it to finish or stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def close(self) -> None:
        self._db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ meta
    def set_meta(self, values: dict[str, Any]) -> None:
        with self._transaction():
            self._db.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [(k, json.dumps(v)) for k, v in values.items()],
            )

    def get_meta(self, key: str, default: Any = ...) -> Any:
        row = self._query("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            if default is ...:
                raise RunStoreError(f"run store {self.run_dir} lacks `{key}`")
            return default
        return _loads(row[0], f"meta `{key}`")

    # ------------------------------------------------------------------ individuals
    def add_individuals(self, rows: Sequence[dict[str, Any]]) -> list[int]:
        """Insert one generation's individuals in one transaction; returns their ids."""
        now = time.time()
        ids = []
        with self._transaction():
            for row in rows:
                cursor = self._db.execute(
                    "INSERT INTO individuals (generation, slot, hash, recipe, parents, operators, "
                    "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        row["generation"],
                        row["slot"],
                        row["hash"],
                        row["recipe"],
                        json.dumps(row["parents"]),
                        json.dumps(row["operators"]),
                        now,
                    ),
                )
                ids.append(int(cursor.lastrowid or 0))
        return ids

    def individual_at(self, generation: int, slot: int) -> IndividualRow | None:
        row = self._query(
            "SELECT id, generation, slot, hash, recipe, parents, operators FROM individuals "
            "WHERE generation = ? AND slot = ?",
            (generation, slot),
        ).fetchone()
        return _individual(row) if row else None

    def individuals(self, generation: int | None = None) -> list[IndividualRow]:
        sql = "SELECT id, generation, slot, hash, recipe, parents, operators FROM individuals"
        args: tuple[Any, ...] = ()
        if generation is not None:
            sql += " WHERE generation = ?"
            args = (generation,)
        return [_individual(r) for r in self._query(sql + " ORDER BY id", args)]

    def individual(self, individual_id: int) -> IndividualRow:
        row = self._query(
            "SELECT id, generation, slot, hash, recipe, parents, operators FROM individuals "
            "WHERE id = ?",
            (individual_id,),
        ).fetchone()
        if row is None:
            raise RunStoreError(f"run {self.run_dir} has no individual {individual_id}")
        return _individual(row)

    def hashes_up_to(self, generation: int) -> set[str]:
        rows = self._query(
            "SELECT hash FROM individuals WHERE generation >= 0 AND generation <= ?", (generation,)
        )
        return {r[0] for r in rows}

    # ------------------------------------------------------------------ evaluations
    def add_evaluation(self, individual_id: int, result: EvaluationResult, source: str) -> None:
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO evaluations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    individual_id,
                    result.status,
                    json.dumps(result.objectives) if result.objectives is not None else None,
                    result.reason,
                    source,
                    result.duration_s,
                    time.time(),
                    json.dumps(result.metadata, default=str),
                ),
            )

    def evaluation(self, individual_id: int) -> EvaluationRow | None:
        row = self._query(
            "SELECT individual_id, status, objectives, reason, source, duration_s, metadata "
            "FROM evaluations WHERE individual_id = ?",
            (individual_id,),
        ).fetchone()
        return _evaluation(row) if row else None

    def failed_hashes(self) -> set[str]:
        rows = self._query(
            "SELECT i.hash FROM evaluations e JOIN individuals i ON i.id = e.individual_id "
            "WHERE e.status = 'failed'"
        )
        return {r[0] for r in rows}

    def count_evaluations(self, min_generation: int | None = None) -> int:
        if min_generation is None:
            return int(self._query("SELECT COUNT(*) FROM evaluations").fetchone()[0])
        row = self._query(
            "SELECT COUNT(*) FROM evaluations e JOIN individuals i ON i.id = e.individual_id "
            "WHERE i.generation >= ?",
            (min_generation,),
        ).fetchone()
        return int(row[0])

    def evaluations(self) -> dict[int, EvaluationRow]:
        rows = self._query(
            "SELECT individual_id, status, objectives, reason, source, duration_s, metadata "
            "FROM evaluations ORDER BY individual_id"
        )
        return {r[0]: _evaluation(r) for r in rows}

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?)",
                (
                    checkpoint.generation,
                    json.dumps(checkpoint.population),
                    json.dumps(checkpoint.algorithm_state),
                    json.dumps(checkpoint.operator_state),
                    json.dumps(checkpoint.stats),
                    time.time(),
                ),
            )

    def checkpoints(self) -> list[Checkpoint]:
        rows = self._query(
            "SELECT generation, population, algorithm_state, operator_state, stats "
            "FROM checkpoints ORDER BY generation"
        )
        return [_checkpoint(r) for r in rows]

    def last_checkpoint(self) -> Checkpoint | None:
        row = self._query(
            "SELECT generation, population, algorithm_state, operator_state, stats "
            "FROM checkpoints ORDER BY generation DESC LIMIT 1"
        ).fetchone()
        return _checkpoint(row) if row else None

    # ------------------------------------------------------------------ helpers
    @contextmanager
    def _transaction(self) -> Iterator[None]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise RunStoreError(f"run store {self.run_dir / DB_NAME}: {exc}") from None

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, args)
        except sqlite3.DatabaseError as exc:
            raise RunStoreError(
                f"run store {self.run_dir / DB_NAME} cannot be read ({exc}); "
                "it may be corrupted or not an evo-compress run"
            ) from None


def _connect(path: Path) -> sqlite3.Connection:
    try:
        db = sqlite3.connect(path, timeout=30.0, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a committed row survives a process crash (kill -9); only a power
        # loss can drop the last commits, which then re-run from the checkpoint.
        db.execute("PRAGMA synchronous=NORMAL")
        return db
    except sqlite3.DatabaseError as exc:
        raise RunStoreError(f"{path} is not a readable SQLite run store ({exc})") from None


def _loads(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        raise RunStoreError(f"run store value {what} is not valid JSON (corrupted?)") from None


def _individual(row: tuple[Any, ...]) -> IndividualRow:
    ident = f"individual {row[0]}"
    return IndividualRow(
        id=row[0],
        generation=row[1],
        slot=row[2],
        hash=row[3],
        recipe=_loads(row[4], f"{ident} recipe"),
        parents=_loads(row[5], f"{ident} parents"),
        operators=_loads(row[6], f"{ident} operators"),
    )


def _evaluation(row: tuple[Any, ...]) -> EvaluationRow:
    ident = f"evaluation of individual {row[0]}"
    result = EvaluationResult(
        status=row[1],
        objectives=_loads(row[2], f"{ident} objectives") if row[2] else None,
        reason=row[3],
        metadata=_loads(row[6], f"{ident} metadata"),
        duration_s=row[5],
    )
    return EvaluationRow(individual_id=row[0], result=result, source=row[4])


def _checkpoint(row: tuple[Any, ...]) -> Checkpoint:
    ident = f"checkpoint {row[0]}"
    return Checkpoint(
        generation=row[0],
        population=_loads(row[1], f"{ident} population"),
        algorithm_state=_loads(row[2], f"{ident} algorithm state"),
        operator_state=_loads(row[3], f"{ident} operator state"),
        stats=_loads(row[4], f"{ident} stats"),
    )
