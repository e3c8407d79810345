"""The run store: one SQLite database (WAL) per run directory, plain rows readable by sqlite3/jq.

Every individual, every evaluation (committed the moment it finishes) and one checkpoint per
completed generation. Nothing is pickled: a later version of the tool must read these rows.

``RunStore`` reads and writes them; the pieces it is made of live beside it: the tables and
their migrations (``_schema``), the writer lock (``_lock``), connections and what SQLite's
errors mean (``_connection``), atomic creation (``_create``) and the typed, checked rows
(``_rows``). The names other modules use are importable from here.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from evo_compress.exceptions import RunStoreError
from evo_compress.fitness import EvaluationResult
from evo_compress.numeric import is_int
from evo_compress.runs._connection import (
    BUSY_TIMEOUT_S,
    connect,
    connect_read_only,
    database_error,
)
from evo_compress.runs._create import (
    build_store,
    is_unfinished_store,
    remove_store,
    write_atomically,
)
from evo_compress.runs._lock import LOCK_NAME, release_lock, take_lock
from evo_compress.runs._rows import (
    STATUSES,
    Checkpoint,
    EvaluationRow,
    IndividualRow,
    LLMCallRow,
    checkpoint_row,
    credit_operators,
    damaged,
    evaluation_row,
    individual_row,
    meta_value,
    show,
    stored_objectives,
)
from evo_compress.runs._schema import (
    CREDIT_COLUMNS,
    LLM_CALL_COLUMNS,
    SCHEMA,
    SCHEMA_VERSION,
    TABLES,
    statements_after,
    temporary,
)

__all__ = [
    "CONFIG_NAME",
    "CREDIT_COLUMNS",
    "DB_NAME",
    "LLM_CALL_COLUMNS",
    "LOCK_NAME",
    "SCHEMA",
    "SCHEMA_VERSION",
    "STATUSES",
    "Checkpoint",
    "EvaluationRow",
    "IndividualRow",
    "LLMCallRow",
    "RunStore",
    "is_run_dir",
    "is_unfinished_store",
]

DB_NAME = "run.sqlite"
CONFIG_NAME = "config.yaml"
# How long a WAL checkpoint waits for readers.
_CHECKPOINT_WAIT_MS = 200


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a run directory.

    Args:
        path: Any path.

    Returns:
        True when ``path`` holds a run store (``run.sqlite``).
    """
    return (path / DB_NAME).is_file()


class RunStore:
    """Read and write one run directory. Use ``create`` or ``open``, then ``lock`` to write.

    Every method that reads or writes raises ``RunStoreError`` with one line when SQLite
    cannot (a full disk says so, with what to do once space is freed), and every row read
    back is checked: a damaged one raises ``RunStoreError`` naming the row and the field.
    One store may be shared by threads (the LLM operators record their calls from workers).

    Attributes:
        run_dir: The run directory the store is in.
    """

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
        after such a crash is replaced, with a ``note``.

        Args:
            run_dir: The run directory, made (with its parents) when missing.
            config_yaml: The run's config as YAML, written to ``config.yaml`` and to meta
                ``config``.
            meta: More meta values (plain JSON data), besides ``schema_version``, ``config``
                and ``created_at``.
            note: Told, in one line, when an unfinished store is replaced.

        Returns:
            The new store, holding the writer lock.

        Raises:
            RunStoreError: ``run_dir`` holds a run already, cannot be made, or is locked by
                another process; or the store cannot be written (a full disk).
        """
        run_dir = Path(run_dir)
        path = run_dir / DB_NAME
        if path.exists() and not is_unfinished_store(path):
            raise _holds_a_run(run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunStoreError(f"cannot create run directory {run_dir}: {exc.strerror}") from None
        lock_fd = take_lock(run_dir)  # two `run`s into one directory: one wins, one is told
        try:
            if path.exists():  # again, now that no other process can be creating it
                if not is_unfinished_store(path):
                    raise _holds_a_run(run_dir)
                if note is not None:
                    note(f"replacing the unfinished run store a killed run left in {run_dir}")
                remove_store(path)
            write_atomically(run_dir / CONFIG_NAME, config_yaml)
            meta = {
                "schema_version": SCHEMA_VERSION,
                "config": config_yaml,
                "created_at": time.time(),
                **meta,
            }
            build_store(path, lambda db: cls._fill(run_dir, db, meta))
            store = cls(run_dir, connect(path))
        except BaseException:
            release_lock(lock_fd)
            raise
        store._lock_fd = lock_fd
        return store

    @classmethod
    def open(cls, run_dir: str | Path, read_only: bool = False) -> RunStore:
        """An existing store. ``read_only``: for commands that only read (status, front,
        ...): nothing is written, not even the WAL's index where the directory forbids it,
        so a run directory one may not write (another user's, a read-only mount) can be
        read. A store of an older schema is upgraded (read-only: empty stand-ins for the
        newer tables, in this connection only).

        Args:
            run_dir: The run directory.
            read_only: Open it for reading only.

        Returns:
            The store, without the writer lock (``lock`` takes it).

        Raises:
            RunStoreError: ``run_dir`` does not exist, holds no run store, holds an
                unfinished or foreign one, was written by a newer evo-compress, or cannot
                be opened or upgraded.
        """
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise RunStoreError(f"run directory {run_dir} does not exist")
        if not is_run_dir(run_dir):
            raise RunStoreError(f"{run_dir} is not a run directory (no {DB_NAME} in it)")
        path = run_dir / DB_NAME
        store = cls(run_dir, connect_read_only(path) if read_only else connect(path))
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
                store._migrate(version)
        return store

    @classmethod
    def _fill(cls, run_dir: Path, db: sqlite3.Connection, meta: dict[str, Any]) -> None:
        """Write ``meta`` into the new store being built through ``db``."""
        scratch_store = cls(run_dir, db)
        scratch_store._advice = "start the run again"  # there is nothing to resume yet
        scratch_store.set_meta(meta)

    def _stand_in_for_new_tables(self) -> None:
        """A store of an older schema, read without writing, lacks the tables added since:
        empty temporary ones (in this connection only) stand in for them."""
        present = {r[0] for r in self._query("SELECT name FROM sqlite_master WHERE type='table'")}
        for name, statement in TABLES.items():
            if name in present:
                continue
            with self._mutex:
                # A query-only connection refuses even temporary tables, for a moment.
                query_only = self._db.execute("PRAGMA query_only").fetchone()[0]
                self._db.execute("PRAGMA query_only = OFF")
                try:
                    self._db.execute(temporary(statement))
                finally:
                    self._db.execute(f"PRAGMA query_only = {int(query_only)}")

    def _migrate(self, version: int) -> None:
        """Upgrade a store of schema ``version``: apply the newer migrations and record the
        new version in one transaction, so an interrupted upgrade leaves the store as it was.
        Older stores lack only tables added since; adding them loses nothing."""
        try:
            with self._mutex:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in statements_after(version):
                        self._db.execute(statement)
                    self._db.execute(
                        "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                        ("schema_version", json.dumps(SCHEMA_VERSION)),
                    )
                    self._db.execute("COMMIT")
                except BaseException:
                    self._rollback()
                    raise
        except sqlite3.DatabaseError as exc:
            raise RunStoreError(f"cannot upgrade run store {self.run_dir}: {exc}") from None

    def lock(self) -> None:
        """Take the run's writer lock; a second process gets a clear error, never a mixed run.

        ``flock`` is released by the kernel when the process dies, even by ``kill -9``.
        A store from ``create`` holds it already; taking it again does nothing.

        Raises:
            RunStoreError: Another process holds the lock (its pid is named), or the lock
                file cannot be made.
        """
        if self._lock_fd is None:
            self._lock_fd = take_lock(self.run_dir)

    def close(self) -> None:
        """Close the store. A writer first copies the write-ahead log into the store file
        (``checkpoint_wal``), then releases its lock."""
        if self._lock_fd is not None:  # the writer
            self.checkpoint_wal()
        self._db.close()
        if self._lock_fd is not None:
            release_lock(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ meta
    def set_meta(self, values: dict[str, Any]) -> None:
        """Write meta values, in one transaction, replacing those of the same keys.

        Args:
            values: Values by key, each plain JSON data.

        Raises:
            RunStoreError: The store cannot be written (a full disk, no lock on a read-only
                store).
        """
        with self._transaction():
            self._db.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [(k, json.dumps(v)) for k, v in values.items()],
            )

    def get_meta(self, key: str, default: Any = ...) -> Any:
        """A meta value.

        Args:
            key: Its key (``schema_version``, ``config``, ``generations_target``, ...).
            default: Returned when the store lacks ``key``; left out, a missing key raises.

        Returns:
            The value, decoded from its JSON.

        Raises:
            RunStoreError: The store lacks ``key`` and no ``default`` is given, the value is
                not valid JSON, or the store cannot be read.
        """
        row = self._query("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            if default is ...:
                raise RunStoreError(f"run store {self.run_dir} lacks `{key}`")
            return default
        return meta_value(self.run_dir, key, row[0])

    def config_data(self) -> dict[str, Any]:
        """The run's config as the mapping its YAML holds (meta `config`).

        Returns:
            The config's YAML, parsed (not validated as a config).

        Raises:
            RunStoreError: Meta `config` is missing, not valid YAML or not a mapping.
        """
        import yaml

        text = self.get_meta("config")
        try:
            data = yaml.safe_load(text) if isinstance(text, str) else text
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise damaged(self.run_dir, "meta `config`", f"not valid YAML ({first})") from None
        if not isinstance(data, dict):
            raise damaged(
                self.run_dir, "meta `config`", f"must be a YAML mapping, got {show(data)}"
            )
        return data

    def target_generations(self) -> int:
        """How many generations the run is to have in all (meta `generations_target`).

        Returns:
            The number, >= 1.

        Raises:
            RunStoreError: Meta `generations_target` is missing or not an integer >= 1.
        """
        value = self.get_meta("generations_target")
        if not is_int(value) or value < 1:
            raise damaged(
                self.run_dir,
                "meta `generations_target`",
                f"must be an integer >= 1, got {show(value)}",
            )
        return int(value)

    # ------------------------------------------------------------------ individuals
    def add_individuals(self, rows: Sequence[dict[str, Any]]) -> list[int]:
        """Insert one generation's individuals in one transaction.

        Args:
            rows: One mapping per individual with ``generation``, ``slot``, ``hash``,
                ``recipe`` (its canonical JSON text), ``parents`` (ids) and ``operators``
                (names).

        Returns:
            Their ids, in the order of ``rows``.

        Raises:
            RunStoreError: The store cannot be written (a full disk, or an individual
                already at that generation and slot); nothing is inserted.
        """
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
        """The individual at ``slot`` of ``generation``.

        Args:
            generation: The generation (-1: the baseline reference).
            slot: Its place in the generation.

        Returns:
            The individual, or None when there is none there.

        Raises:
            RunStoreError: Its row is damaged, or the store cannot be read.
        """
        row = self._query(
            "SELECT id, generation, slot, hash, recipe, parents, operators FROM individuals "
            "WHERE generation = ? AND slot = ?",
            (generation, slot),
        ).fetchone()
        return individual_row(self.run_dir, row) if row else None

    def individuals(self, generation: int | None = None) -> list[IndividualRow]:
        """The stored individuals, by id.

        Args:
            generation: Only those of this generation; None: all.

        Returns:
            The individuals, oldest first.

        Raises:
            RunStoreError: A row is damaged, or the store cannot be read.
        """
        sql = "SELECT id, generation, slot, hash, recipe, parents, operators FROM individuals"
        args: tuple[Any, ...] = ()
        if generation is not None:
            sql += " WHERE generation = ?"
            args = (generation,)
        return [individual_row(self.run_dir, r) for r in self._query(sql + " ORDER BY id", args)]

    def individual(self, individual_id: int) -> IndividualRow:
        """The individual ``individual_id``.

        Args:
            individual_id: Its id.

        Returns:
            The individual.

        Raises:
            RunStoreError: The run has no such individual, its row is damaged, or the store
                cannot be read.
        """
        row = self._query(
            "SELECT id, generation, slot, hash, recipe, parents, operators FROM individuals "
            "WHERE id = ?",
            (individual_id,),
        ).fetchone()
        if row is None:
            raise RunStoreError(f"run {self.run_dir} has no individual {individual_id}")
        return individual_row(self.run_dir, row)

    def hashes_up_to(self, generation: int) -> set[str]:
        """The recipe hashes of the searched individuals of generations 0 to ``generation``.

        Args:
            generation: The last generation included.

        Returns:
            The hashes (for duplicate elimination).

        Raises:
            RunStoreError: The store cannot be read.
        """
        rows = self._query(
            "SELECT hash FROM individuals WHERE generation >= 0 AND generation <= ?", (generation,)
        )
        return {r[0] for r in rows}

    # ------------------------------------------------------------------ evaluations
    def add_evaluation(self, individual_id: int, result: EvaluationResult, source: str) -> None:
        """Record an individual's evaluation, committed at once; it replaces an earlier one.

        Args:
            individual_id: The individual evaluated.
            result: What the evaluation produced (its metadata stored as JSON; values JSON
                cannot hold are stored as text).
            source: Where the result came from: ``"evaluated"`` (a fresh evaluation),
                ``"cache"`` (the fitness cache) or ``"run"`` (an equal recipe of this run).

        Raises:
            RunStoreError: The store cannot be written (a full disk).
        """
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
        """The evaluation of individual ``individual_id``.

        Args:
            individual_id: The individual's id.

        Returns:
            Its evaluation, or None when it has none yet.

        Raises:
            RunStoreError: The row is damaged, or the store cannot be read.
        """
        row = self._query(
            "SELECT individual_id, status, objectives, reason, source, duration_s, metadata "
            "FROM evaluations WHERE individual_id = ?",
            (individual_id,),
        ).fetchone()
        return evaluation_row(self.run_dir, row) if row else None

    def evaluated_individuals(
        self, generation: int
    ) -> list[tuple[IndividualRow, EvaluationRow | None]]:
        """Each individual of ``generation`` by id, with its evaluation: ``individuals`` and
        ``evaluation`` in one query instead of one per individual.

        Args:
            generation: The generation to read.

        Returns:
            ``(individual, evaluation)`` pairs in id order; the evaluation is None when the
            individual has none yet.

        Raises:
            RunStoreError: A row is damaged, or the store cannot be read.
        """
        rows = self._query(
            "SELECT i.id, i.generation, i.slot, i.hash, i.recipe, i.parents, i.operators, "
            "e.individual_id, e.status, e.objectives, e.reason, e.source, e.duration_s, "
            "e.metadata FROM individuals i LEFT JOIN evaluations e ON e.individual_id = i.id "
            "WHERE i.generation = ? ORDER BY i.id",
            (generation,),
        )
        return [
            (
                individual_row(self.run_dir, row[:7]),
                None if row[7] is None else evaluation_row(self.run_dir, row[7:]),
            )
            for row in rows
        ]

    def failed_hashes(self) -> set[str]:
        """The recipe hashes of every individual whose evaluation failed.

        Returns:
            The hashes.

        Raises:
            RunStoreError: The store cannot be read.
        """
        rows = self._query(
            "SELECT i.hash FROM evaluations e JOIN individuals i ON i.id = e.individual_id "
            "WHERE e.status = 'failed'"
        )
        return {r[0] for r in rows}

    def count_evaluations(self, min_generation: int | None = None) -> int:
        """How many evaluations the store holds.

        Args:
            min_generation: Only those of individuals of this generation or later; None:
                all.

        Returns:
            The count.

        Raises:
            RunStoreError: The store cannot be read.
        """
        if min_generation is None:
            return int(self._query("SELECT COUNT(*) FROM evaluations").fetchone()[0])
        row = self._query(
            "SELECT COUNT(*) FROM evaluations e JOIN individuals i ON i.id = e.individual_id "
            "WHERE i.generation >= ?",
            (min_generation,),
        ).fetchone()
        return int(row[0])

    def evaluations(self) -> dict[int, EvaluationRow]:
        """Every evaluation.

        Returns:
            The evaluations by individual id, in id order.

        Raises:
            RunStoreError: A row is damaged, or the store cannot be read.
        """
        rows = self._query(
            "SELECT individual_id, status, objectives, reason, source, duration_s, metadata "
            "FROM evaluations ORDER BY individual_id"
        )
        return {r[0]: evaluation_row(self.run_dir, r) for r in rows}

    def evaluated_objectives(self) -> list[tuple[int, int, dict[str, float]]]:
        """``(id, generation, objectives)`` of every searched individual (generation >= 0)
        evaluated with objectives, by id: the points a report draws behind the front. Reads
        no metadata, so a long run's ten thousand rows load quickly.

        Returns:
            One ``(individual id, generation, objectives)`` tuple per such evaluation.

        Raises:
            RunStoreError: Stored objectives are damaged, or the store cannot be read.
        """
        rows = self._query(
            "SELECT e.individual_id, i.generation, e.objectives FROM evaluations e "
            "JOIN individuals i ON i.id = e.individual_id "
            "WHERE e.objectives IS NOT NULL AND i.generation >= 0 ORDER BY e.individual_id"
        )
        return [
            (int(ident), int(generation), stored_objectives(self.run_dir, ident, text))
            for ident, generation, text in rows
        ]

    # ------------------------------------------------------------------ LLM calls
    def add_llm_call(self, row: LLMCallRow) -> None:
        """Record one provider call the moment it ends (safe from worker threads); it
        replaces an earlier record of the same generation, slot, operator and attempt.

        Args:
            row: The call.

        Raises:
            RunStoreError: The store cannot be written (a full disk).
        """
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
        """The recorded provider call of one attempt, for replaying it on resume.

        Args:
            generation: The generation of the child it was for.
            slot: The child's slot.
            operator: The operator's name.
            attempt: Which attempt, counting from 0.

        Returns:
            The call, or None when none was recorded.

        Raises:
            RunStoreError: The store cannot be read.
        """
        row = self._query(
            f"SELECT {', '.join(LLM_CALL_COLUMNS)} FROM llm_calls WHERE generation = ? "
            "AND slot = ? AND operator = ? AND attempt = ?",
            (generation, slot, operator, attempt),
        ).fetchone()
        return LLMCallRow(*row) if row else None

    def llm_calls(self, generation: int | None = None) -> list[LLMCallRow]:
        """The recorded provider calls, in the order they were recorded.

        Args:
            generation: Only those of this generation; None: all.

        Returns:
            The calls.

        Raises:
            RunStoreError: The store cannot be read.
        """
        sql = f"SELECT {', '.join(LLM_CALL_COLUMNS)} FROM llm_calls"
        args: tuple[Any, ...] = ()
        if generation is not None:
            sql += " WHERE generation = ?"
            args = (generation,)
        return [LLMCallRow(*r) for r in self._query(sql + " ORDER BY id", args)]

    def set_request_slots(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Record, for children of LLM requests that are not in their request's slot, the
        slot their request was recorded under (``llm_calls.slot``): in a screened generation
        one request proposes several candidates, and the chosen ones move to other slots.

        Args:
            pairs: ``(individual_id, request_slot)`` pairs; a pair already recorded is
                replaced (a resumed generation records its children again).

        Raises:
            RunStoreError: The store cannot be written (a full disk).
        """
        if not pairs:
            return
        with self._transaction():
            self._db.executemany(
                "INSERT OR REPLACE INTO llm_children (individual_id, request_slot) VALUES (?, ?)",
                [(int(i), int(s)) for i, s in pairs],
            )

    def request_slots(self) -> dict[int, int]:
        """The request slot of each child recorded by ``set_request_slots``.

        Returns:
            ``individual_id -> request_slot``; children in their request's own slot are not
            listed.

        Raises:
            RunStoreError: The store cannot be read.
        """
        rows = self._query("SELECT individual_id, request_slot FROM llm_children")
        return {int(i): int(s) for i, s in rows}

    # ------------------------------------------------------------------ operator credit
    def add_credits(self, rows: Sequence[dict[str, Any]]) -> None:
        """Record operator credit, in one transaction, replacing rows of the same individual.

        Args:
            rows: One mapping per individual with the ``CREDIT_COLUMNS`` (``operators`` a
                list of names).

        Raises:
            RunStoreError: The store cannot be written (a full disk).
        """
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
        """The recorded operator credit.

        Returns:
            One mapping of the ``CREDIT_COLUMNS`` per individual, by id.

        Raises:
            RunStoreError: A row's operators are damaged, or the store cannot be read.
        """
        rows = self._query(
            f"SELECT {', '.join(CREDIT_COLUMNS)} FROM credits ORDER BY individual_id"
        )
        out = []
        for r in rows:
            item = dict(zip(CREDIT_COLUMNS, r, strict=True))
            item["operators"] = credit_operators(
                self.run_dir, item["individual_id"], item["operators"]
            )
            out.append(item)
        return out

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Record a completed generation's checkpoint, replacing one of the same generation,
        then copy the write-ahead log into the store file (``checkpoint_wal``).

        Args:
            checkpoint: The checkpoint (its parts plain JSON data).

        Raises:
            RunStoreError: The store cannot be written (a full disk).
        """
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
        generation's checkpoint copies the rest. A checkpoint SQLite cannot do now (a full
        disk) is skipped without an error: the rows are committed in the log either way.
        """
        with self._mutex:
            try:
                self._db.execute(f"PRAGMA busy_timeout = {_CHECKPOINT_WAIT_MS}")
                try:
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                finally:
                    self._db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            except sqlite3.DatabaseError:
                # The rows are committed in the log either way; a checkpoint that cannot be
                # done now (a full disk) is done by the next one or when SQLite next opens it.
                pass

    def checkpoints(self) -> list[Checkpoint]:
        """Every checkpoint.

        Returns:
            The checkpoints, oldest generation first.

        Raises:
            RunStoreError: A checkpoint is damaged, or the store cannot be read.
        """
        rows = self._query(
            "SELECT generation, population, algorithm_state, operator_state, stats "
            "FROM checkpoints ORDER BY generation"
        )
        return [checkpoint_row(self.run_dir, r) for r in rows]

    def last_checkpoint(self, on_damage: Callable[[str], None] | None = None) -> Checkpoint | None:
        """The newest checkpoint. A damaged one raises, unless ``on_damage`` is given: it is
        told, and the one before is tried (a generation is then done again, re-using what the
        store holds of it); the oldest one damaged still raises.

        Args:
            on_damage: Told, in one line, of each damaged checkpoint passed over.

        Returns:
            The newest (readable) checkpoint, or None when there is none.

        Raises:
            RunStoreError: The newest checkpoint is damaged and no ``on_damage`` is given,
                every checkpoint is damaged, or the store cannot be read.
        """
        sql = (
            "SELECT generation, population, algorithm_state, operator_state, stats "
            "FROM checkpoints ORDER BY generation DESC"
        )
        rows = self._query(sql + ("" if on_damage is not None else " LIMIT 1"))
        for number, row in enumerate(rows):
            try:
                return checkpoint_row(self.run_dir, row)
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
        this connection must not write meanwhile.

        Yields:
            This store.

        Raises:
            RunStoreError: The store cannot be read.
        """
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
                raise database_error(
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
            raise database_error(
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


def _holds_a_run(run_dir: Path) -> RunStoreError:
    return RunStoreError(
        f"{run_dir} already holds a run; continue it with `evo-compress resume {run_dir}`"
    )
