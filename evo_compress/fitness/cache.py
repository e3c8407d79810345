"""Persistent fitness cache shared across runs: one SQLite file, plain JSON rows.

The key is the recipe's canonical hash plus a fingerprint of everything else that changes
the result (evaluator and its settings, model, hardware, carbon data), so a hit is exactly
the evaluation that would have been run. Failed evaluations are cached as failed, with
their reason, class (``fitness._base.classify_failure``) and the worker limits they ran
under: the recipe's own failures are served again, so the same recipe is not retried
forever; a failure a limit caused (a timeout, out of memory) is served only to equal or
tighter limits; one the environment caused (a missing package, a server that could not
start) is never served, since fixing the environment changes the outcome.

The cache is an optimisation: every row is validated when read (a bad one is a miss,
evaluated again and overwritten), and a file that is not a cache, or a disk that fills up,
costs one warning line and the search goes on without it.
"""

from __future__ import annotations

import json
import math
import sqlite3
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from evo_compress.exceptions import RunStoreError
from evo_compress.fitness._base import FAILURE_CLASS_KEY, EvaluationResult, with_failure_class
from evo_compress.genomes import Recipe
from evo_compress.objectives import check_objectives

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    recipe_hash TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    recipe TEXT NOT NULL,
    status TEXT NOT NULL,                 -- ok | failed | infeasible
    objectives TEXT,                      -- JSON, five finite numbers when ok
    reason TEXT,                          -- why it failed or is infeasible
    metadata TEXT NOT NULL,               -- JSON object
    duration_s REAL NOT NULL,
    created_at REAL NOT NULL,
    limits TEXT,                          -- JSON: the worker limits it ran under
    hits INTEGER NOT NULL DEFAULT 0,      -- times ``get`` served it
    PRIMARY KEY (recipe_hash, fingerprint)
);
"""
COLUMNS = (
    "recipe_hash",
    "fingerprint",
    "recipe",
    "status",
    "objectives",
    "reason",
    "metadata",
    "duration_s",
    "created_at",
    "limits",
)
# Caches written before a column existed get it added when opened.
ADDED_COLUMNS = {"limits": "TEXT", "hits": "INTEGER NOT NULL DEFAULT 0"}
LAYOUT = (*COLUMNS, "hits")  # every column: ``put`` writes COLUMNS, ``get`` counts hits
_STATUSES = ("ok", "failed", "infeasible")
SERVED_FAILURE_CLASSES = ("recipe", "limit")  # ``fitness._base.classify_failure``

Limits = Mapping[str, float | None]
Warn = Callable[[str], None]


class _Unusable(RunStoreError):
    """The file cannot serve as a fitness cache; ``why`` says what is wrong with it."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(
            f"fitness cache {path} cannot be opened ({why}); "
            "choose another with --cache PATH or run with --no-cache"
        )
        self.why = why


class _BadEntry(ValueError):
    """A cache row that does not hold a valid result; ``kind`` groups the warnings."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"`{kind}` {detail}")
        self.kind = kind


def _stderr(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)


class FitnessCache:
    """``get``/``put`` evaluation results by (recipe hash, fingerprint).

    Opening a file that cannot be used raises ``RunStoreError`` (``open_cache`` warns and
    returns None instead). After that nothing raises: a bad row is a miss, and a read or
    write error turns reading or writing off; ``warn`` gets one line for each kind."""

    def __init__(self, path: str | Path, warn: Warn | None = None) -> None:
        self.path = Path(path)
        self.warn: Warn = warn or _stderr
        self._warned: set[str] = set()
        self._readable = True
        self._writable = True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        except (sqlite3.Error, OSError) as exc:
            raise self._unusable(str(exc)) from None
        # Bytes, decoded per row: text that is not UTF-8 is one bad row, not an exception
        # out of fetchone.
        self._db.text_factory = bytes
        try:
            self._check_layout()
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        except _BadEntry as exc:
            self._db.close()
            raise self._unusable(f"not a fitness cache: {exc}") from None
        except (sqlite3.Error, OSError) as exc:
            self._db.close()
            raise self._unusable(str(exc)) from None

    def _unusable(self, why: str) -> _Unusable:
        return _Unusable(self.path, why)

    def _check_layout(self) -> None:
        """Create the table in a new file; add missing columns to an older cache; refuse a
        file whose ``entries`` table is something else. Reading first leaves a file that is
        not a cache exactly as it was."""
        columns = [row[1] for row in self._db.execute("PRAGMA table_info(entries)")]
        names = {c.decode() if isinstance(c, bytes) else str(c) for c in columns}
        if not names:
            self._db.executescript(SCHEMA)
            return
        missing = [c for c in LAYOUT if c not in names]
        if [c for c in missing if c not in ADDED_COLUMNS] or names - set(LAYOUT):
            raise _BadEntry("layout", f"its `entries` table has the columns {sorted(names)}")
        for column in missing:
            try:
                self._db.execute(
                    f"ALTER TABLE entries ADD COLUMN {column} {ADDED_COLUMNS[column]}"
                )
            except sqlite3.OperationalError:
                # Another process sharing the cache may have just added it.
                added = {row[1] for row in self._db.execute("PRAGMA table_info(entries)")}
                if column.encode() not in added and column not in added:
                    raise

    def _warn_once(self, kind: str, text: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            self.warn(f"fitness cache {self.path}: {text}")

    def get(
        self, recipe: Recipe, fingerprint: str, limits: Limits | None = None
    ) -> EvaluationResult | None:
        """The cached result, or None: not cached, unreadable (a warning, once per kind), or
        a failure a worker limit caused under limits other than ``limits``."""
        if not self._readable:
            return None
        try:
            row = self._db.execute(
                "SELECT status, objectives, reason, metadata, duration_s, limits FROM entries "
                "WHERE recipe_hash = ? AND fingerprint = ?",
                (recipe.hash, fingerprint),
            ).fetchone()
        except sqlite3.Error as exc:
            self._readable = False
            self._warn_once(
                "read", f"cannot be read ({exc}); the search goes on without reading it"
            )
            return None
        if row is None:
            return None
        try:
            result, stored_limits = _decode(row)
        except _BadEntry as exc:
            self._warn_once(
                f"entry:{exc.kind}",
                f"an entry is unusable ({exc}); such entries are misses, evaluated again and "
                "overwritten (further ones are not reported)",
            )
            return None
        if result.status == "failed":
            # Only a failure recorded as the recipe's or a limit's is served again: an
            # environment's (or one from before failures were classed) may be gone now.
            cls = result.metadata.get(FAILURE_CLASS_KEY)
            if cls not in SERVED_FAILURE_CLASSES:
                return None
            if cls == "limit" and not _limits_cover(stored_limits, limits or {}):
                return None  # e.g. a 4 s timeout says nothing about a 600 s limit
        self._count_hit(recipe, fingerprint)
        return result

    def _count_hit(self, recipe: Recipe, fingerprint: str) -> None:
        """One more hit for the entry (``evo-compress cache stats``); a write error turns
        writing off, as in ``put``."""
        if not self._writable:
            return
        try:
            self._db.execute(
                "UPDATE entries SET hits = COALESCE(hits, 0) + 1 "
                "WHERE recipe_hash = ? AND fingerprint = ?",
                (recipe.hash, fingerprint),
            )
        except (sqlite3.Error, OSError) as exc:
            self._stop_writing(exc)

    def put(
        self,
        recipe: Recipe,
        fingerprint: str,
        result: EvaluationResult,
        limits: Limits | None = None,
    ) -> None:
        """Store ``result`` (replacing any entry of the key). Never raises: when the disk
        is full or the file cannot be written, caching stops with one warning."""
        if not self._writable:
            return
        result = with_failure_class(result)
        try:
            self._db.execute(
                f"INSERT OR REPLACE INTO entries ({', '.join(COLUMNS)}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    recipe.hash,
                    fingerprint,
                    recipe.canonical_json(),
                    result.status,
                    json.dumps(result.objectives) if result.objectives is not None else None,
                    result.reason,
                    json.dumps(result.metadata, default=str),
                    result.duration_s,
                    time.time(),
                    json.dumps(dict(limits or {}), sort_keys=True),
                ),
            )
        except (sqlite3.Error, OSError) as exc:
            self._stop_writing(exc)

    def _stop_writing(self, exc: BaseException) -> None:
        """A write failed (a full disk, a read-only file): write nothing more, say so once."""
        self._writable = False
        self._warn_once(
            "write",
            f"cannot be written ({exc}); the search goes on without caching new results "
            "(the run itself keeps every result)",
        )

    def forget_failures(self, fingerprint: str) -> int:
        """Drop failed entries of one fingerprint so they are evaluated again."""
        try:
            cursor = self._db.execute(
                "DELETE FROM entries WHERE fingerprint = ? AND status = 'failed'", (fingerprint,)
            )
        except sqlite3.Error as exc:
            # Cached failures could now be served: read nothing rather than those.
            self._readable = self._writable = False
            self._warn_once(
                "forget",
                f"its failures cannot be dropped ({exc}); the search goes on without the cache",
            )
            return 0
        return cursor.rowcount

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def close(self) -> None:
        self._db.close()


def open_cache(path: str | Path, warn: Warn | None = None) -> FitnessCache | None:
    """The cache at ``path``, or None with one warning when the file cannot be used as one
    (it is left as it is): the search then runs without a cache."""
    try:
        return FitnessCache(path, warn)
    except _Unusable as exc:
        (warn or _stderr)(
            f"fitness cache {path} is not usable ({exc.why}); the search goes on without it "
            "and leaves the file as it is (remove it, or choose another with --cache PATH)"
        )
        return None


def _text(value: Any, column: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise _BadEntry(column, "not UTF-8 text") from None
    if isinstance(value, str):
        return value
    raise _BadEntry(column, f"not text but {type(value).__name__}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _json(value: Any, column: str, finite: bool = False) -> Any:
    text = _text(value, column)
    try:
        if finite:
            return json.loads(text, parse_constant=_reject_constant)
        return json.loads(text)
    except ValueError as exc:
        raise _BadEntry(column, f"not valid JSON ({exc})") from None


def _decode(row: tuple[Any, ...]) -> tuple[EvaluationResult, dict[str, Any] | None]:
    """A row as a result and the limits it ran under; ``_BadEntry`` for anything that is not
    what ``put`` writes."""
    raw_status, raw_objectives, raw_reason, raw_metadata, duration, raw_limits = row
    status = _text(raw_status, "status")
    if status not in _STATUSES:
        raise _BadEntry("status", f"{status!r} is none of {list(_STATUSES)}")
    metadata = _json(raw_metadata, "metadata")
    if not isinstance(metadata, dict):
        raise _BadEntry("metadata", f"not a JSON object but {type(metadata).__name__}")
    if (
        isinstance(duration, bool)
        or not isinstance(duration, (int, float))
        or not math.isfinite(duration)
        or duration < 0
    ):
        raise _BadEntry("duration_s", f"not a duration: {duration!r}")
    reason = None if raw_reason is None else _text(raw_reason, "reason")
    limits: dict[str, Any] | None = None
    if raw_limits is not None:
        limits = _json(raw_limits, "limits")
        if not isinstance(limits, dict):
            raise _BadEntry("limits", f"not a JSON object but {type(limits).__name__}")
    if status != "ok":
        if not reason:
            raise _BadEntry("reason", f"a {status} entry without a reason")
        return EvaluationResult(status, None, reason, metadata, float(duration)), limits  # type: ignore[arg-type]
    if raw_objectives is None:
        raise _BadEntry("objectives", "an ok entry without objectives")
    values = _json(raw_objectives, "objectives", finite=True)
    if not isinstance(values, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values()
    ):
        raise _BadEntry("objectives", f"not a mapping of numbers: {values!r}")
    try:
        objectives = check_objectives(values)
    except ValueError as exc:
        raise _BadEntry("objectives", str(exc)) from None
    return EvaluationResult("ok", objectives, reason, metadata, float(duration)), limits


def _limits_cover(stored: Mapping[str, Any] | None, current: Limits) -> bool:
    """Whether a failure a limit caused under ``stored`` limits would recur under
    ``current`` ones: every limit the same or tighter (None: no limit). Unknown stored
    limits (an entry from before they were recorded) cover nothing."""
    if stored is None or set(stored) != set(current):
        return False
    for name, now in current.items():
        then = stored[name]
        if now == then:
            continue
        if now is None or then is None or not isinstance(then, (int, float)):
            return False  # no limit now, or none then: more generous, or unknown
        if now > then:
            return False
    return True
