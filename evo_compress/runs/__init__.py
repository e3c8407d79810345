"""Run directories: the SQLite run store, checkpoints, the writer lock and front queries."""

from evo_compress.runs.store import (
    Checkpoint,
    EvaluationRow,
    IndividualRow,
    RunStore,
    is_run_dir,
)

__all__ = ["Checkpoint", "EvaluationRow", "IndividualRow", "RunStore", "is_run_dir"]
