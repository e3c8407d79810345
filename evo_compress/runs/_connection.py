"""SQLite connections to a run store, and what an SQLite error means for the user.

A writer's connection (WAL, ``synchronous=NORMAL``), a reader's that never changes the store
(even in a directory it may not write), and the one-line errors for a full disk or a file
that is not a readable store.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
from pathlib import Path

from evo_compress.exceptions import RunStoreError

# How long a write waits for another connection's lock.
BUSY_TIMEOUT_S = 30.0
# Free space below which an I/O error while writing is taken for a full disk.
_NEARLY_FULL = 1 << 20


def connect(path: Path) -> sqlite3.Connection:
    """A connection that may write the store at ``path``."""
    try:
        db = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a committed row survives a process crash (kill -9); only a power
        # loss can drop the last commits, which then re-run from the checkpoint.
        db.execute("PRAGMA synchronous=NORMAL")
        return db
    except sqlite3.DatabaseError as exc:
        raise database_error(
            path,
            exc,
            "opening",
            f"`evo-compress resume {path.parent}`",
            f"{path} is not a readable SQLite run store ({exc})",
        ) from None


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A connection that never changes the store. Where the directory may be written, an
    ordinary one made query-only: SQLite still tidies the WAL files up when it closes. Else
    read-only; and where the WAL's index (``-shm``) can then be neither created nor used,
    immutable: what the file holds, without the log (every finished generation is in the
    file, see ``RunStore.checkpoint_wal``)."""
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
        uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
    )
    try:
        db.execute("SELECT COUNT(*) FROM sqlite_master").fetchall()  # opening is lazy
    except sqlite3.DatabaseError:
        db.close()
        raise
    return db


def database_error(
    path: Path, exc: BaseException, doing: str, advice: str, otherwise: str
) -> RunStoreError:
    """One line for ``exc``, met while ``doing`` the store at ``path``: a full disk with
    ``advice`` for after space is freed, anything else as ``otherwise`` says."""
    if disk_full(path, exc):
        return RunStoreError(
            f"disk full while {doing} the run store at {path}; free space and {advice}"
        )
    return RunStoreError(otherwise)


def disk_full(path: Path, exc: BaseException) -> bool:
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
