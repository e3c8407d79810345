"""Progress events of a search, kept free of heavy imports so the CLI can subclass them cheaply.

A bottom layer (see ``[tool.importlinter]``): the search and its results are passed in as
objects this module does not import (``evo_compress.engine.Search``,
``evo_compress.fitness.EvaluationResult``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GenerationStats:
    generation: int
    offspring: int
    evaluated: int
    cache_hits: int
    reused: int
    failed: int
    front_size: int
    hypervolume: float
    evaluations_total: int
    seconds: float
    # Evaluations that stopped after racing's quick stage (``fidelity.racing``).
    quick: int = 0


class ProgressListener:
    """Receives the search's progress; the CLI shows it with rich. Every hook is optional."""

    def search_started(self, search: Any) -> None: ...

    def generation_started(self, generation: int, n_offspring: int) -> None: ...

    def evaluation_finished(self, generation: int, result: Any, source: str) -> None: ...

    def generation_finished(self, stats: GenerationStats) -> None: ...

    def message(self, text: str) -> None: ...

    def debug(self, text: str) -> None:
        """A detail for whoever debugs a run (the CLI shows it with ``--debug``), such as a
        seed recipe the back end cannot apply."""
