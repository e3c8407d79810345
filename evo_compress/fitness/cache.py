"""Persistent fitness cache shared across runs: one SQLite file, plain JSON rows.

The key is the recipe's canonical hash plus a fingerprint of everything else that changes
the result (evaluator and its settings, model, hardware, carbon data), so a hit is exactly
the evaluation that would have been run. Failed evaluations are cached as failed, with
their reason, so the same recipe is not retried forever.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from evo_compress.exceptions import RunStoreError
from evo_compress.fitness._base import EvaluationResult
from evo_compress.genomes import Recipe

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    recipe_hash TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    recipe TEXT NOT NULL,
    status TEXT NOT NULL,
    objectives TEXT,
    reason TEXT,
    metadata TEXT NOT NULL,
    duration_s REAL NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (recipe_hash, fingerprint)
);
"""


class FitnessCache:
    """``get``/``put`` evaluation results by (recipe hash, fingerprint)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        except (sqlite3.DatabaseError, OSError) as exc:
            raise RunStoreError(
                f"fitness cache {self.path} cannot be opened ({exc}); "
                "choose another with --cache PATH or run with --no-cache"
            ) from None

    def get(self, recipe: Recipe, fingerprint: str) -> EvaluationResult | None:
        row = self._db.execute(
            "SELECT status, objectives, reason, metadata, duration_s FROM entries "
            "WHERE recipe_hash = ? AND fingerprint = ?",
            (recipe.hash, fingerprint),
        ).fetchone()
        if row is None:
            return None
        status, objectives, reason, metadata, duration = row
        try:
            return EvaluationResult(
                status,
                json.loads(objectives) if objectives else None,
                reason,
                json.loads(metadata),
                duration,
            )
        except (ValueError, TypeError):
            return None  # an unreadable entry is a miss; the fresh result overwrites it

    def put(self, recipe: Recipe, fingerprint: str, result: EvaluationResult) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
            ),
        )

    def forget_failures(self, fingerprint: str) -> int:
        """Drop failed entries of one fingerprint so they are evaluated again."""
        cursor = self._db.execute(
            "DELETE FROM entries WHERE fingerprint = ? AND status = 'failed'", (fingerprint,)
        )
        return cursor.rowcount

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def close(self) -> None:
        self._db.close()
