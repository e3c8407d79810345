"""Atomic creation of a run's files: a store appears whole or not at all.

The store is built in a scratch file beside it, synced and renamed into place, so a crash
(kill -9, a full disk) leaves either no store or a complete one. A store an older version
left half-built, by building it in place, is recognised so that it can be replaced.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from evo_compress.exceptions import RunStoreError
from evo_compress.runs._connection import disk_full
from evo_compress.runs._schema import TABLES, statements_after

_SIDE_FILES = ("-wal", "-shm", "-journal")


def build_store(path: Path, fill: Callable[[sqlite3.Connection], None]) -> None:
    """Write a complete store to ``path``: every table, then what ``fill`` writes through the
    connection it is given (the meta rows). Built in a scratch file in the same directory,
    synced, then renamed over ``path`` in one step.

    Raises:
        RunStoreError: the store cannot be written (a full disk, a directory one may not
            write); no scratch file is left behind.
    """
    scratch = path.with_name(f".{path.name}.creating")
    remove_store(scratch)  # left by a crash during an earlier creation
    try:
        # A rollback journal while building: a WAL would stay behind under the scratch name.
        db = sqlite3.connect(scratch, isolation_level=None)
        try:
            for statement in statements_after(0):
                db.execute(statement)
            fill(db)
            db.execute("PRAGMA journal_mode=WAL")  # recorded in the file's header
        finally:
            db.close()
        _fsync(scratch)
        os.replace(scratch, path)
        _fsync(path.parent)  # the rename itself survives a power loss
    except (OSError, sqlite3.Error) as exc:
        remove_store(scratch)
        raise _creation_error(path, exc) from None
    except BaseException:
        remove_store(scratch)
        raise


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a synced scratch file renamed into place.

    Raises:
        RunStoreError: the file cannot be written.
    """
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
        if not tables <= TABLES.keys():
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


def remove_store(path: Path) -> None:
    """Delete the SQLite file ``path`` and its side files (log, index, journal)."""
    for name in (path.name, *(path.name + suffix for suffix in _SIDE_FILES)):
        (path.parent / name).unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _creation_error(path: Path, exc: OSError | sqlite3.Error) -> RunStoreError:
    if disk_full(path, exc):
        return RunStoreError(
            f"disk full while creating the run in {path.parent}; free space and start the run "
            "again"
        )
    why = exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
    return RunStoreError(f"cannot create {path}: {why}")
