"""Progress events of a search, kept free of heavy imports so the CLI can subclass them cheaply."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from evo_compress.engine import Search
    from evo_compress.fitness import EvaluationResult


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

    def search_started(self, search: Search) -> None: ...

    def generation_started(self, generation: int, n_offspring: int) -> None: ...

    def evaluation_finished(
        self, generation: int, result: EvaluationResult, source: str
    ) -> None: ...

    def generation_finished(self, stats: GenerationStats) -> None: ...

    def message(self, text: str) -> None: ...
