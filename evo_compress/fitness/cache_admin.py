"""What ``evo-compress cache`` does: list, count and forget fitness cache entries
(``fitness.cache``), and prune the vLLM back end's folder of built checkpoints.

Listing and counting open the file read-only: a missing file is not created and an older
one is not upgraded. Forgetting opens it for writing only once its layout checked out. A file
that is not a fitness cache is an error (``RunStoreError``) and is left exactly as it is.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from evo_compress.exceptions import EvoCompressError, RunStoreError
from evo_compress.fitness._base import FAILURE_CLASS_KEY, FAILURE_CLASSES
from evo_compress.fitness.cache import ADDED_COLUMNS, COLUMNS, LAYOUT

# ``fitness.vllm.checkpoint.MARKER`` (not imported: that module pulls in the back end).
CHECKPOINT_MARKER = "evo_checkpoint.json"
UNCLASSED = "environment"  # a failure cached before classes existed is never served
_DAY = 86400.0


@dataclass(frozen=True)
class Entry:
    """One cache row as read, every column decoded leniently (a damaged row still lists)."""

    recipe_hash: str
    fingerprint: str
    status: str
    failure_class: str | None  # failed entries only
    created_at: float | None
    hits: int | None  # None: a cache from before hits were counted
    recipe: Any
    objectives: Any
    reason: str | None
    duration_s: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "recipe_hash": self.recipe_hash,
            "fingerprint": self.fingerprint,
            "status": self.status,
            "failure_class": self.failure_class,
            "created_at": utc(self.created_at),
            "hits": self.hits,
            "recipe": self.recipe,
            "objectives": self.objectives,
            "reason": self.reason,
            "duration_s": self.duration_s,
        }


@dataclass(frozen=True)
class EntryFilter:
    """Which entries ``forget`` (and ``ls``) take; every given condition must hold."""

    failed: bool = False
    failure_class: str | None = None
    recipe_prefix: str | None = None
    older_than_days: float | None = None

    @property
    def empty(self) -> bool:
        return (
            not self.failed
            and self.failure_class is None
            and not self.recipe_prefix
            and self.older_than_days is None
        )

    def matches(self, entry: Entry, now: float) -> bool:
        if (self.failed or self.failure_class is not None) and entry.status != "failed":
            return False
        if self.failure_class is not None and entry.failure_class != self.failure_class:
            return False
        if self.recipe_prefix and not entry.recipe_hash.startswith(self.recipe_prefix.lower()):
            return False
        if self.older_than_days is not None:
            cutoff = now - self.older_than_days * _DAY
            if entry.created_at is None or entry.created_at >= cutoff:
                return False
        return True


def utc(timestamp: float | None) -> str | None:
    """``2026-12-07T22:56:42Z``, or None."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def failure_class(status: str, metadata: Any) -> str | None:
    """The class ``FitnessCache.get`` goes by: a failure's recorded class, or ``environment``
    for one recorded without (never served); None for any other status."""
    if status != "failed":
        return None
    cls = metadata.get(FAILURE_CLASS_KEY) if isinstance(metadata, Mapping) else None
    return str(cls) if cls in FAILURE_CLASSES else UNCLASSED


# ---------------------------------------------------------------------- the file
def _unusable(path: Path, why: str) -> RunStoreError:
    return RunStoreError(f"fitness cache {path} cannot be read ({why}); it is left as it is")


@contextmanager
def _connect(path: Path, write: bool) -> Iterator[tuple[sqlite3.Connection, set[str]]]:
    """The cache's connection (never creating the file) and its column names."""
    if not path.exists():
        raise RunStoreError(f"no fitness cache at {path} (choose one with --cache PATH)")
    if not path.is_file():
        raise RunStoreError(f"fitness cache {path} is not a file")
    uri = f"{path.resolve().as_uri()}?mode={'rw' if write else 'ro'}"
    try:
        db = sqlite3.connect(uri, uri=True, timeout=30.0, isolation_level=None)
    except sqlite3.Error as exc:
        raise _unusable(path, str(exc)) from None
    try:
        db.text_factory = bytes
        try:
            names = {_str(row[1]) for row in db.execute("PRAGMA table_info(entries)")}
        except sqlite3.Error as exc:
            raise _unusable(path, str(exc)) from None
        required = set(COLUMNS) - set(ADDED_COLUMNS)
        if not names:
            raise _unusable(path, "not a fitness cache: it has no `entries` table")
        if not required <= names or names - set(LAYOUT):
            raise _unusable(
                path, f"not a fitness cache: its `entries` table has the columns {sorted(names)}"
            )
        yield db, names
    finally:
        db.close()


def _str(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return "" if value is None else str(value)


def _loads(value: Any) -> Any:
    if value is None:
        return None
    try:
        return json.loads(_str(value))
    except ValueError:
        return None


def _recipe(value: Any) -> Any:
    """The stored (flat) recipe, nested by gene group as commands print recipes."""
    data = _loads(value)
    if isinstance(data, dict) and all(isinstance(k, str) for k in data):
        from evo_compress.genomes import nest

        try:
            return nest(data)
        except (AttributeError, TypeError):  # a damaged row: as stored
            return data
    return data


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _read(db: sqlite3.Connection, names: set[str]) -> list[Entry]:
    hits = "hits" if "hits" in names else "NULL"
    rows = db.execute(
        "SELECT recipe_hash, fingerprint, recipe, status, objectives, reason, metadata, "
        f"duration_s, created_at, {hits} FROM entries ORDER BY created_at, recipe_hash"
    ).fetchall()
    entries = []
    for key, fp, recipe, status, objectives, reason, metadata, duration, created, count in rows:
        status_text = _str(status)
        entries.append(
            Entry(
                recipe_hash=_str(key),
                fingerprint=_str(fp),
                status=status_text,
                failure_class=failure_class(status_text, _loads(metadata)),
                created_at=_number(created),
                hits=None if count is None else int(count),
                recipe=_recipe(recipe),
                objectives=_loads(objectives),
                reason=None if reason is None else _str(reason),
                duration_s=_number(duration),
            )
        )
    return entries


def list_entries(path: Path, where: EntryFilter | None = None) -> list[Entry]:
    """The entries of the cache at ``path`` (oldest first), those ``where`` takes."""
    now = time.time()
    try:
        with _connect(Path(path), write=False) as (db, names):
            entries = _read(db, names)
    except sqlite3.Error as exc:
        raise _unusable(Path(path), str(exc)) from None
    return [e for e in entries if where is None or where.matches(e, now)]


def cache_stats(path: Path) -> dict[str, Any]:
    """Entries, file size, counts by status and failure class, fingerprints, oldest and
    newest entry, and hits (None for a cache from before hits were counted)."""
    path = Path(path)
    entries = list_entries(path)
    created = [e.created_at for e in entries if e.created_at is not None]
    counted = [e.hits for e in entries if e.hits is not None]
    sidecars = [path.with_name(path.name + s) for s in ("-wal", "-shm")]
    return {
        "path": path,
        "entries": len(entries),
        "file_bytes": path.stat().st_size + sum(p.stat().st_size for p in sidecars if p.is_file()),
        "by_status": dict(sorted(Counter(e.status for e in entries).items())),
        "by_failure_class": dict(
            sorted(Counter(e.failure_class for e in entries if e.failure_class).items())
        ),
        "fingerprints": len({e.fingerprint for e in entries}),
        "oldest": utc(min(created)) if created else None,
        "newest": utc(max(created)) if created else None,
        "hits": sum(counted) if len(counted) == len(entries) and entries else None,
        "entries_hit": sum(1 for h in counted if h > 0) if counted else None,
    }


def forget_entries(path: Path, where: EntryFilter, dry_run: bool = False) -> int:
    """Delete the entries ``where`` takes (every one for an empty filter); how many."""
    path = Path(path)
    now = time.time()
    try:
        with _connect(path, write=not dry_run) as (db, names):
            if not dry_run:
                db.execute("BEGIN IMMEDIATE")  # what is read is what is deleted
            try:
                doomed = [e for e in _read(db, names) if where.matches(e, now)]
                if not dry_run:
                    db.executemany(
                        "DELETE FROM entries WHERE recipe_hash = ? AND fingerprint = ?",
                        [(e.recipe_hash, e.fingerprint) for e in doomed],
                    )
                    db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
    except sqlite3.Error as exc:
        raise RunStoreError(f"fitness cache {path}: cannot forget entries ({exc})") from None
    return len(doomed)


# ---------------------------------------------------------------------- checkpoints
def default_checkpoint_dir() -> Path:
    """The vLLM back end's ``checkpoint_dir`` default."""
    from evo_compress.reference import default_cache_dir

    return default_cache_dir() / "vllm-checkpoints"


def prune_checkpoints(
    folder: Path, older_than_days: float | None = None, dry_run: bool = False
) -> dict[str, Any]:
    """Remove the checkpoints in ``folder``: its subfolders holding ``evo_checkpoint.json``
    (a folder being built has none yet; links are not followed), those last modified more
    than ``older_than_days`` ago when given. Nothing outside ``folder`` is touched."""
    folder = Path(folder)
    removed: list[str] = []
    freed = kept = skipped = 0
    cutoff = None if older_than_days is None else time.time() - older_than_days * _DAY
    children = sorted(folder.iterdir()) if folder.is_dir() else []
    for child in children:
        if child.is_symlink() or not child.is_dir() or not (child / CHECKPOINT_MARKER).is_file():
            skipped += 1
            continue
        if cutoff is not None and child.stat().st_mtime >= cutoff:
            kept += 1
            continue
        size = _tree_bytes(child)
        if not dry_run:
            try:
                shutil.rmtree(child)
            except OSError as exc:
                raise EvoCompressError(f"cannot remove checkpoint {child}: {exc}") from None
        removed.append(child.name)
        freed += size
    return {
        "folder": folder,
        "exists": folder.is_dir(),
        "removed": len(removed),
        "bytes_freed": freed,
        "kept": kept,
        "skipped": skipped,
        "checkpoints": removed,
    }


def _tree_bytes(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):  # does not follow links
        for name in files:
            with suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total
