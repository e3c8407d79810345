"""The run store: one SQLite database (WAL) per run directory, plain rows readable by sqlite3/jq.

Every individual, every evaluation (committed the moment it finishes) and one checkpoint per
completed generation. Nothing is pickled: a later version of the tool must read these rows.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evo_compress.exceptions import RunStoreError
from evo_compress.fitness._base import EvaluationResult
from evo_compress.objectives import OBJECTIVE_NAMES

# 2: the llm_calls and credits tables (added to a version-1 store when it is opened).
SCHEMA_VERSION = 2
DB_NAME = "run.sqlite"
CONFIG_NAME = "config.yaml"
LOCK_NAME = ".lock"
# How long a write waits for another connection's lock, and a WAL checkpoint for readers.
_BUSY_TIMEOUT_S = 30.0
_CHECKPOINT_WAIT_MS = 200
# Free space below which an I/O error while writing is taken for a full disk.
_NEARLY_FULL = 1 << 20

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
CREATE TABLE IF NOT EXISTS llm_calls (
    id INTEGER PRIMARY KEY,
    generation INTEGER NOT NULL,          -- the generation the child is for (0 for seeding)
    slot INTEGER NOT NULL,                -- the offspring slot (-1 for seeding)
    operator TEXT NOT NULL,               -- the operator's label
    attempt INTEGER NOT NULL,             -- 0, then 1, 2 for re-asks after an invalid reply
    role TEXT NOT NULL,                   -- mutation | crossover | seed
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt_hash TEXT NOT NULL,            -- SHA-256 of the system prompt, prompt and schema
    prompt TEXT NOT NULL,                 -- JSON {system, user}
    reply TEXT,                           -- the reply text (null when the provider failed)
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost REAL,                            -- USD, where a price is configured
    latency_s REAL NOT NULL,
    transport_attempts INTEGER NOT NULL,  -- HTTP attempts (retries on 429, 5xx, timeouts)
    outcome TEXT NOT NULL,                -- valid | invalid (re-asked) | fallback
    error TEXT,                           -- the validation or provider error
    rationale TEXT,
    confidence REAL,
    created_at REAL NOT NULL,
    UNIQUE (generation, slot, operator, attempt)
);
CREATE TABLE IF NOT EXISTS credits (
    individual_id INTEGER PRIMARY KEY REFERENCES individuals (id),
    generation INTEGER NOT NULL,
    operators TEXT NOT NULL,              -- JSON list of the operators drawn for the child
    feasible INTEGER NOT NULL,
    dominated_parent INTEGER NOT NULL,    -- it dominates (constrained) at least one parent
    entered_front INTEGER NOT NULL,       -- it is on the run's front after its generation
    hv_contribution REAL,                 -- hypervolume the front loses without it (null:
                                          -- not worked out, no selector had a choice)
    reward REAL NOT NULL                  -- what adaptive operator selection was credited
);
"""

LLM_CALL_COLUMNS = (
    "generation",
    "slot",
    "operator",
    "attempt",
    "role",
    "provider",
    "model",
    "prompt_hash",
    "prompt",
    "reply",
    "input_tokens",
    "output_tokens",
    "cost",
    "latency_s",
    "transport_attempts",
    "outcome",
    "error",
    "rationale",
    "confidence",
)
CREDIT_COLUMNS = (
    "individual_id",
    "generation",
    "operators",
    "feasible",
    "dominated_parent",
    "entered_front",
    "hv_contribution",
    "reward",
)


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
class LLMCallRow:
    """One request to an LLM provider, as recorded (``LLM_CALL_COLUMNS``)."""

    generation: int
    slot: int
    operator: str
    attempt: int
    role: str
    provider: str
    model: str
    prompt_hash: str
    prompt: str
    reply: str | None
    input_tokens: int
    output_tokens: int
    cost: float | None
    latency_s: float
    transport_attempts: int
    outcome: str
    error: str | None
    rationale: str | None
    confidence: float | None


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
        self._snapshot = False
        # What to do once a write that failed (a full disk) can succeed again.
        self._advice = f"`evo-compress resume {run_dir}`"
        # LLM operators record their calls from worker threads: one connection, serialised.
        self._mutex = threading.RLock()

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(
        cls,
        run_dir: str | Path,
        config_yaml: str,
        meta: dict[str, Any],
        note: Callable[[str], None] | None = None,
    ) -> RunStore:
        """A new store, locked for writing. It appears whole or not at all: it is built in a
        scratch file, synced and renamed into place, so a crash (kill -9, a full disk) leaves
        either no store or a complete one. An unfinished store an older version left behind
        after such a crash is replaced, with a ``note``."""
        run_dir = Path(run_dir)
        path = run_dir / DB_NAME
        if path.exists() and not is_unfinished_store(path):
            raise _holds_a_run(run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunStoreError(f"cannot create run directory {run_dir}: {exc.strerror}") from None
        lock_fd = _take_lock(run_dir)  # two `run`s into one directory: one wins, one is told
        try:
            if path.exists():  # again, now that no other process can be creating it
                if not is_unfinished_store(path):
                    raise _holds_a_run(run_dir)
                if note is not None:
                    note(f"replacing the unfinished run store a killed run left in {run_dir}")
                _remove_db(path)
            _write_atomically(run_dir / CONFIG_NAME, config_yaml)
            _build(
                cls,
                path,
                {
                    "schema_version": SCHEMA_VERSION,
                    "config": config_yaml,
                    "created_at": time.time(),
                    **meta,
                },
            )
            store = cls(run_dir, _connect(path))
        except BaseException:
            os.close(lock_fd)
            raise
        store._lock_fd = lock_fd
        return store

    @classmethod
    def open(cls, run_dir: str | Path, read_only: bool = False) -> RunStore:
        """An existing store. ``read_only``: for commands that only read (status, front,
        ...): nothing is written, not even the WAL's index where the directory forbids it,
        so a run directory one may not write (another user's, a read-only mount) can be
        read."""
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise RunStoreError(f"run directory {run_dir} does not exist")
        if not is_run_dir(run_dir):
            raise RunStoreError(f"{run_dir} is not a run directory (no {DB_NAME} in it)")
        path = run_dir / DB_NAME
        store = cls(run_dir, _connect_read_only(path) if read_only else _connect(path))
        try:
            version = int(store.get_meta("schema_version"))
        except (RunStoreError, TypeError, ValueError):
            store._db.close()
            if is_unfinished_store(run_dir / DB_NAME):
                raise RunStoreError(
                    f"{run_dir} holds an unfinished run store (the `evo-compress run` that made "
                    f"it was interrupted); start the run again with `evo-compress run --run-dir "
                    f"{run_dir}`"
                ) from None
            raise RunStoreError(f"{run_dir / DB_NAME} is not an evo-compress run store") from None
        if version > SCHEMA_VERSION:
            store._db.close()
            raise RunStoreError(
                f"{run_dir} was written by a newer evo-compress (store schema {version}, "
                f"this version reads up to {SCHEMA_VERSION}); upgrade evo-compress"
            )
        if version < SCHEMA_VERSION:
            if read_only:
                store._stand_in_for_new_tables()
            else:
                store._migrate()
        return store

    def _stand_in_for_new_tables(self) -> None:
        """A store of an older schema, read without writing, lacks the tables added since:
        empty temporary ones (in this connection only) stand in for them."""
        present = {r[0] for r in self._query("SELECT name FROM sqlite_master WHERE type='table'")}
        for statement in SCHEMA.split(";"):
            words = statement.split()
            if words[:5] == ["CREATE", "TABLE", "IF", "NOT", "EXISTS"] and words[5] not in present:
                with self._mutex:
                    # A query-only connection refuses even temporary tables, for a moment.
                    query_only = self._db.execute("PRAGMA query_only").fetchone()[0]
                    self._db.execute("PRAGMA query_only = OFF")
                    try:
                        self._db.execute(statement.replace("CREATE TABLE", "CREATE TEMP TABLE", 1))
                    finally:
                        self._db.execute(f"PRAGMA query_only = {int(query_only)}")

    def _migrate(self) -> None:
        """Older stores lack only tables added since; adding them loses nothing."""
        try:
            with self._mutex:
                self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise RunStoreError(f"cannot upgrade run store {self.run_dir}: {exc}") from None
        self.set_meta({"schema_version": SCHEMA_VERSION})

    def lock(self) -> None:
        """Take the run's writer lock; a second process gets a clear error, never a mixed run.

        ``flock`` is released by the kernel when the process dies, even by ``kill -9``.
        A store from ``create`` holds it already.
        """
        if self._lock_fd is None:
            self._lock_fd = _take_lock(self.run_dir)

    def close(self) -> None:
        if self._lock_fd is not None:  # the writer
            self.checkpoint_wal()
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
        try:
            return _loads(row[0], "value")
        except _Damage as exc:
            raise _damaged(self.run_dir, f"meta `{key}`", exc) from None

    def config_data(self) -> dict[str, Any]:
        """The run's config as the mapping its YAML holds (meta `config`)."""
        import yaml

        text = self.get_meta("config")
        try:
            data = yaml.safe_load(text) if isinstance(text, str) else text
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise _damaged(self.run_dir, "meta `config`", f"not valid YAML ({first})") from None
        if not isinstance(data, dict):
            raise _damaged(
                self.run_dir, "meta `config`", f"must be a YAML mapping, got {_show(data)}"
            )
        return data

    def target_generations(self) -> int:
        """How many generations the run is to have in all (meta `generations_target`)."""
        value = self.get_meta("generations_target")
        if not _is_int(value) or value < 1:
            raise _damaged(
                self.run_dir,
                "meta `generations_target`",
                f"must be an integer >= 1, got {_show(value)}",
            )
        return int(value)

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
        return _individual(self.run_dir, row) if row else None

    def individuals(self, generation: int | None = None) -> list[IndividualRow]:
        sql = "SELECT id, generation, slot, hash, recipe, parents, operators FROM individuals"
        args: tuple[Any, ...] = ()
        if generation is not None:
            sql += " WHERE generation = ?"
            args = (generation,)
        return [_individual(self.run_dir, r) for r in self._query(sql + " ORDER BY id", args)]

    def individual(self, individual_id: int) -> IndividualRow:
        row = self._query(
            "SELECT id, generation, slot, hash, recipe, parents, operators FROM individuals "
            "WHERE id = ?",
            (individual_id,),
        ).fetchone()
        if row is None:
            raise RunStoreError(f"run {self.run_dir} has no individual {individual_id}")
        return _individual(self.run_dir, row)

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
        return _evaluation(self.run_dir, row) if row else None

    def evaluated_individuals(
        self, generation: int
    ) -> list[tuple[IndividualRow, EvaluationRow | None]]:
        """Each individual of ``generation`` by id, with its evaluation (None when it has
        none): ``individuals`` and ``evaluation`` in one query instead of one per individual."""
        rows = self._query(
            "SELECT i.id, i.generation, i.slot, i.hash, i.recipe, i.parents, i.operators, "
            "e.individual_id, e.status, e.objectives, e.reason, e.source, e.duration_s, "
            "e.metadata FROM individuals i LEFT JOIN evaluations e ON e.individual_id = i.id "
            "WHERE i.generation = ? ORDER BY i.id",
            (generation,),
        )
        return [
            (
                _individual(self.run_dir, row[:7]),
                None if row[7] is None else _evaluation(self.run_dir, row[7:]),
            )
            for row in rows
        ]

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
        return {r[0]: _evaluation(self.run_dir, r) for r in rows}

    def evaluated_objectives(self) -> list[tuple[int, int, dict[str, float]]]:
        """``(id, generation, objectives)`` of every searched individual (generation >= 0)
        evaluated with objectives, by id: the points a report draws behind the front. Reads
        no metadata, so a long run's ten thousand rows load quickly."""
        rows = self._query(
            "SELECT e.individual_id, i.generation, e.objectives FROM evaluations e "
            "JOIN individuals i ON i.id = e.individual_id "
            "WHERE e.objectives IS NOT NULL AND i.generation >= 0 ORDER BY e.individual_id"
        )
        points = []
        for ident, generation, text in rows:
            try:
                objectives = _objectives(_loads(text, "objectives"))
            except _Damage as exc:
                raise _damaged(self.run_dir, f"evaluation of individual {ident}", exc) from None
            points.append((int(ident), int(generation), objectives))
        return points

    # ------------------------------------------------------------------ LLM calls
    def add_llm_call(self, row: LLMCallRow) -> None:
        """Record one provider call the moment it ends (safe from worker threads)."""
        values = tuple(getattr(row, c) for c in LLM_CALL_COLUMNS)
        with self._transaction():
            self._db.execute(
                f"INSERT OR REPLACE INTO llm_calls ({', '.join(LLM_CALL_COLUMNS)}, created_at) "
                f"VALUES ({', '.join('?' * len(LLM_CALL_COLUMNS))}, ?)",
                (*values, time.time()),
            )

    def llm_call(
        self, generation: int, slot: int, operator: str, attempt: int
    ) -> LLMCallRow | None:
        row = self._query(
            f"SELECT {', '.join(LLM_CALL_COLUMNS)} FROM llm_calls WHERE generation = ? "
            "AND slot = ? AND operator = ? AND attempt = ?",
            (generation, slot, operator, attempt),
        ).fetchone()
        return LLMCallRow(*row) if row else None

    def llm_calls(self, generation: int | None = None) -> list[LLMCallRow]:
        sql = f"SELECT {', '.join(LLM_CALL_COLUMNS)} FROM llm_calls"
        args: tuple[Any, ...] = ()
        if generation is not None:
            sql += " WHERE generation = ?"
            args = (generation,)
        return [LLMCallRow(*r) for r in self._query(sql + " ORDER BY id", args)]

    # ------------------------------------------------------------------ operator credit
    def add_credits(self, rows: Sequence[dict[str, Any]]) -> None:
        with self._transaction():
            self._db.executemany(
                f"INSERT OR REPLACE INTO credits ({', '.join(CREDIT_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(CREDIT_COLUMNS))})",
                [
                    tuple(json.dumps(r[c]) if c == "operators" else r[c] for c in CREDIT_COLUMNS)
                    for r in rows
                ],
            )

    def credits(self) -> list[dict[str, Any]]:
        rows = self._query(
            f"SELECT {', '.join(CREDIT_COLUMNS)} FROM credits ORDER BY individual_id"
        )
        out = []
        for r in rows:
            item = dict(zip(CREDIT_COLUMNS, r, strict=True))
            try:
                item["operators"] = _strings(_loads(item["operators"], "operators"), "operators")
            except _Damage as exc:
                raise _damaged(
                    self.run_dir, f"credit of individual {item['individual_id']}", exc
                ) from None
            out.append(item)
        return out

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
        self.checkpoint_wal()

    def checkpoint_wal(self) -> None:
        """Copy the write-ahead log into the store file and empty it, so that every finished
        generation lives in ``run.sqlite`` itself: a run whose ``-wal`` file is lost after a
        kill (copied without it, deleted by hand) loses at most the generation it was in.

        A reader holding an older snapshot (``status`` at that moment) can keep part of the
        log from being copied; the writer does not wait long for it, and the next
        generation's checkpoint copies the rest."""
        with self._mutex:
            try:
                self._db.execute(f"PRAGMA busy_timeout = {_CHECKPOINT_WAIT_MS}")
                try:
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                finally:
                    self._db.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
            except sqlite3.DatabaseError:
                # The rows are committed in the log either way; a checkpoint that cannot be
                # done now (a full disk) is done by the next one or when SQLite next opens it.
                pass

    def checkpoints(self) -> list[Checkpoint]:
        rows = self._query(
            "SELECT generation, population, algorithm_state, operator_state, stats "
            "FROM checkpoints ORDER BY generation"
        )
        return [_checkpoint(self.run_dir, r) for r in rows]

    def last_checkpoint(self, on_damage: Callable[[str], None] | None = None) -> Checkpoint | None:
        """The newest checkpoint. A damaged one raises, unless ``on_damage`` is given: it is
        told, and the one before is tried (a generation is then done again, re-using what the
        store holds of it); the oldest one damaged still raises."""
        sql = (
            "SELECT generation, population, algorithm_state, operator_state, stats "
            "FROM checkpoints ORDER BY generation DESC"
        )
        rows = self._query(sql + ("" if on_damage is not None else " LIMIT 1"))
        for number, row in enumerate(rows):
            try:
                return _checkpoint(self.run_dir, row)
            except RunStoreError as exc:
                if on_damage is None or number == len(rows) - 1:
                    raise
                on_damage(f"{exc}; going back to generation {rows[number + 1][0]}")
        return None

    # ------------------------------------------------------------------ reading
    @contextmanager
    def snapshot(self) -> Iterator[RunStore]:
        """Every read inside sees the store as of one moment (a WAL read transaction), even
        while a search writes it: a front, its lineage and the history agree. Re-entrant;
        this connection must not write meanwhile."""
        with self._mutex:
            if self._snapshot:
                yield self
                return
            try:
                self._db.execute("BEGIN")
                # The snapshot starts at the first read, not at BEGIN.
                self._db.execute("SELECT COUNT(*) FROM sqlite_master").fetchall()
            except sqlite3.DatabaseError as exc:
                self._rollback()
                raise RunStoreError(
                    f"run store {self.run_dir / DB_NAME} cannot be read ({exc})"
                ) from None
            self._snapshot = True
            try:
                yield self
            finally:
                self._snapshot = False
                self._rollback()  # nothing was written: ending the read is all it does

    # ------------------------------------------------------------------ helpers
    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._mutex:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield
                    self._db.execute("COMMIT")
                except BaseException:
                    self._rollback()
                    raise
            except sqlite3.DatabaseError as exc:
                path = self.run_dir / DB_NAME
                raise _database_error(
                    path, exc, "writing", self._advice, f"run store {path}: {exc}"
                ) from None

    def _rollback(self) -> None:
        """Undo the open transaction, if SQLite has not already (it may after SQLITE_FULL or
        an I/O error); the original error is the one worth reporting."""
        if self._db.in_transaction:
            with suppress(sqlite3.DatabaseError):
                self._db.execute("ROLLBACK")

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> _Rows:
        try:
            with self._mutex:
                # Fetched under the lock: a cursor must not be read while another thread
                # uses the connection.
                return _Rows(self._db.execute(sql, args).fetchall())
        except sqlite3.DatabaseError as exc:
            path = self.run_dir / DB_NAME
            raise _database_error(
                path,
                exc,
                "reading",
                "try again",
                f"run store {path} cannot be read ({exc}); "
                "it may be corrupted or not an evo-compress run",
            ) from None


class _Rows(list[Any]):
    """Query rows already fetched, with the cursor's ``fetchone``."""

    def fetchone(self) -> Any:
        return self[0] if self else None


def _connect(path: Path) -> sqlite3.Connection:
    try:
        db = sqlite3.connect(
            path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a committed row survives a process crash (kill -9); only a power
        # loss can drop the last commits, which then re-run from the checkpoint.
        db.execute("PRAGMA synchronous=NORMAL")
        return db
    except sqlite3.DatabaseError as exc:
        raise _database_error(
            path,
            exc,
            "opening",
            f"`evo-compress resume {path.parent}`",
            f"{path} is not a readable SQLite run store ({exc})",
        ) from None


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """A connection that never changes the store. Where the directory may be written, an
    ordinary one made query-only: SQLite still tidies the WAL files up when it closes. Else
    read-only; and where the WAL's index (``-shm``) can then be neither created nor used,
    immutable: what the file holds, without the log (every finished generation is in the
    file, see ``checkpoint_wal``)."""
    uri = path.resolve().as_uri()
    try:
        if os.access(path.parent, os.W_OK) and os.access(path, os.W_OK):
            db = _open_uri(f"{uri}?mode=rw")
            db.execute("PRAGMA query_only = ON")
            return db
        try:
            return _open_uri(f"{uri}?mode=ro")
        except sqlite3.OperationalError:
            return _open_uri(f"{uri}?immutable=1")
    except sqlite3.DatabaseError as exc:
        raise RunStoreError(f"{path} is not a readable SQLite run store ({exc})") from None


def _open_uri(uri: str) -> sqlite3.Connection:
    db = sqlite3.connect(
        uri, uri=True, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
    )
    try:
        db.execute("SELECT COUNT(*) FROM sqlite_master").fetchall()  # opening is lazy
    except sqlite3.DatabaseError:
        db.close()
        raise
    return db


def _database_error(
    path: Path, exc: BaseException, doing: str, advice: str, otherwise: str
) -> RunStoreError:
    """One line for ``exc``, met while ``doing`` the store at ``path``: a full disk with
    ``advice`` for after space is freed, anything else as ``otherwise`` says."""
    if _disk_full(path, exc):
        return RunStoreError(
            f"disk full while {doing} the run store at {path}; free space and {advice}"
        )
    return RunStoreError(otherwise)


def _disk_full(path: Path, exc: BaseException) -> bool:
    """Whether ``exc`` (from writing near ``path``) means the disk is full. SQLite says so
    (SQLITE_FULL) for most writes, but a full disk can also surface as an I/O error."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return "disk is full" in str(exc)
    if code & 0xFF == sqlite3.SQLITE_FULL:
        return True
    if code & 0xFF == sqlite3.SQLITE_IOERR:
        try:
            return shutil.disk_usage(path.parent).free < _NEARLY_FULL
        except OSError:
            return False
    return False


def _holds_a_run(run_dir: Path) -> RunStoreError:
    return RunStoreError(
        f"{run_dir} already holds a run; continue it with `evo-compress resume {run_dir}`"
    )


def _take_lock(run_dir: Path) -> int:
    """The run's writer lock (``flock`` on ``.lock``, holding our pid): its descriptor."""
    path = run_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RunStoreError(f"cannot lock the run in {run_dir}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunStoreError(
            f"{run_dir} is in use by another evo-compress process (pid {holder}); "
            "wait for it to finish or stop it first"
        ) from None
    with suppress(OSError):  # the pid only names the holder to others; a full disk may refuse
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    return fd


_TABLES = frozenset(("meta", "individuals", "evaluations", "checkpoints", "llm_calls", "credits"))
_SIDE_FILES = ("-wal", "-shm", "-journal")


def is_unfinished_store(path: Path) -> bool:
    """Whether ``path`` is a store whose creation never finished (left by a crash of a
    version that built it in place): no tables but ours, no `schema_version`, no rows. Such
    a store holds nothing; anything else (a store, a foreign database) is never replaced."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return False
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables <= _TABLES:
            return False
        if (
            "meta" in tables
            and db.execute("SELECT 1 FROM meta WHERE key = 'schema_version'").fetchone()
        ):
            return False
        return not any(db.execute(f"SELECT 1 FROM {t} LIMIT 1").fetchone() for t in tables)
    except sqlite3.Error:
        return False
    finally:
        db.close()


def _remove_db(path: Path) -> None:
    for name in (path.name, *(path.name + suffix for suffix in _SIDE_FILES)):
        (path.parent / name).unlink(missing_ok=True)


def _write_atomically(path: Path, text: str) -> None:
    scratch = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(scratch, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(scratch, path)
    except OSError as exc:
        scratch.unlink(missing_ok=True)
        raise _creation_error(path, exc) from None


def _build(cls: type[RunStore], path: Path, meta: dict[str, Any]) -> None:
    """Write a complete store (schema and meta) to ``path``: built in a scratch file in the
    same directory, synced, then renamed over ``path`` in one step."""
    scratch = path.with_name(f".{path.name}.creating")
    _remove_db(scratch)  # left by a crash during an earlier creation
    try:
        # A rollback journal while building: a WAL would stay behind under the scratch name.
        db = sqlite3.connect(scratch, isolation_level=None)
        try:
            db.executescript(SCHEMA)
            scratch_store = cls(path.parent, db)
            scratch_store._advice = "start the run again"  # there is nothing to resume yet
            scratch_store.set_meta(meta)
            db.execute("PRAGMA journal_mode=WAL")  # recorded in the file's header
        finally:
            db.close()
        fd = os.open(scratch, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(scratch, path)
        fd = os.open(path.parent, os.O_RDONLY)  # the rename itself survives a power loss
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except (OSError, sqlite3.Error) as exc:
        _remove_db(scratch)
        raise _creation_error(path, exc) from None
    except BaseException:
        _remove_db(scratch)
        raise


def _creation_error(path: Path, exc: OSError | sqlite3.Error) -> RunStoreError:
    if _disk_full(path, exc):
        return RunStoreError(
            f"disk full while creating the run in {path.parent}; free space and start the run "
            "again"
        )
    why = exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
    return RunStoreError(f"cannot create {path}: {why}")


class _Damage(Exception):
    """What is wrong with one stored value, worded for the user."""


def _damaged(run_dir: Path, what: str, detail: object) -> RunStoreError:
    return RunStoreError(f"run store {run_dir}: {what} is damaged: {detail}")


def _show(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    if isinstance(value, str):  # inf and nan are stored as text (JSON has neither)
        try:
            float(value)
        except ValueError:
            return False
        return True
    return isinstance(value, int | float) and not isinstance(value, bool)


def _loads(text: Any, field: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        raise _Damage(f"`{field}` is not valid JSON") from None


def _mapping(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Damage(f"`{field}` must be a mapping, got {_show(value)}")
    return value


def _ids(value: Any, field: str) -> list[int]:
    if not isinstance(value, list) or not all(_is_int(v) for v in value):
        raise _Damage(f"`{field}` must be a list of individual ids, got {_show(value)}")
    return value


def _strings(value: Any, field: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Damage(f"`{field}` must be a list of names, got {_show(value)}")
    return value


def _individual(run_dir: Path, row: tuple[Any, ...]) -> IndividualRow:
    try:
        return IndividualRow(
            id=row[0],
            generation=row[1],
            slot=row[2],
            hash=row[3],
            recipe=_mapping(_loads(row[4], "recipe"), "recipe"),
            parents=_ids(_loads(row[5], "parents"), "parents"),
            operators=_strings(_loads(row[6], "operators"), "operators"),
        )
    except _Damage as exc:
        raise _damaged(run_dir, f"individual {row[0]}", exc) from None


STATUSES = ("ok", "failed", "infeasible")


def _objectives(value: Any) -> dict[str, float]:
    objectives = _mapping(value, "objectives")
    for name in OBJECTIVE_NAMES:
        if name not in objectives:
            raise _Damage(f"`objectives` lacks `{name}`")
        number = objectives[name]
        if not _is_number(number) or not math.isfinite(float(number)):
            raise _Damage(f"`objectives.{name}` must be a finite number, got {_show(number)}")
    return objectives


def _evaluation(run_dir: Path, row: tuple[Any, ...]) -> EvaluationRow:
    try:
        status = row[1]
        if status not in STATUSES:
            raise _Damage(f"`status` must be ok, failed or infeasible, got {_show(status)}")
        objectives = None if row[2] is None else _objectives(_loads(row[2], "objectives"))
        if status == "ok" and objectives is None:
            raise _Damage("`objectives` is missing from a successful evaluation")
        result = EvaluationResult(
            status=status,
            objectives=objectives,
            reason=row[3],
            metadata=_mapping(_loads(row[6], "metadata"), "metadata"),
            duration_s=row[5],
        )
    except _Damage as exc:
        raise _damaged(run_dir, f"evaluation of individual {row[0]}", exc) from None
    return EvaluationRow(individual_id=row[0], result=result, source=row[4])


def _population(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _Damage(f"`population` must be a list, got {_show(value)}")
    if not value:
        raise _Damage("`population` is empty")
    for index, entry in enumerate(value):
        where = f"population[{index}]"
        _mapping(entry, where)
        for key, check, kind in (("id", _is_int, "an integer"), ("cv", _is_number, "a number")):
            if key not in entry:
                raise _Damage(f"`{where}` lacks `{key}`")
            if not check(entry[key]):
                raise _Damage(f"`{where}.{key}` must be {kind}, got {_show(entry[key])}")
    return value


def _algorithm_state(value: Any) -> dict[str, Any]:
    state = _mapping(value, "algorithm_state")
    for key in ("n_iter", "rng"):
        if key not in state:
            raise _Damage(f"`algorithm_state` lacks `{key}`")
    if not _is_int(state["n_iter"]):
        raise _Damage(f"`algorithm_state.n_iter` must be an integer, got {_show(state['n_iter'])}")
    _mapping(state["rng"], "algorithm_state.rng")
    if "archive" in state:
        _ids(state["archive"], "algorithm_state.archive")
    if state.get("survival") is not None:
        _mapping(state["survival"], "algorithm_state.survival")
    return state


def _checkpoint(run_dir: Path, row: tuple[Any, ...]) -> Checkpoint:
    try:
        return Checkpoint(
            generation=row[0],
            population=_population(_loads(row[1], "population")),
            algorithm_state=_algorithm_state(_loads(row[2], "algorithm_state")),
            operator_state=_mapping(_loads(row[3], "operator_state"), "operator_state"),
            stats=_mapping(_loads(row[4], "stats"), "stats"),
        )
    except _Damage as exc:
        raise _damaged(run_dir, f"checkpoint of generation {row[0]}", exc) from None
