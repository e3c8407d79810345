"""The first generation as a pymoo ``Sampling``: the seed portfolio (or an LLM's recipes,
``search.recipes: llm``), then random draws until the population is full."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from pymoo.core.sampling import Sampling

from evo_compress.config import LLM_SEEDS, SearchConfig
from evo_compress.exceptions import EvoCompressError
from evo_compress.genomes import Recipe, SearchSpace, builtin_portfolios
from evo_compress.operators import VariationContext
from evo_compress.progress import ProgressListener
from evo_compress.runs.store import RunStore

if TYPE_CHECKING:
    from evo_compress.operators.llm import LLMSeeder

SEED_LABEL = "llm-seed"


class Seeding(Sampling):
    """The first generation. ``context`` gives the search state an LLM seeder is shown."""

    def __init__(
        self,
        search: SearchConfig,
        space: SearchSpace,
        store: RunStore,
        seeder: LLMSeeder | None,
        context: Callable[[int], VariationContext],
        listener: ProgressListener,
    ) -> None:
        super().__init__()
        self.search = search
        self.space = space
        self.store = store
        self.seeder = seeder
        self.context = context
        self.listener = listener
        self._last: list[tuple[Recipe, str]] = []

    def _do(
        self, problem: Any, n_samples: int, *args: Any, random_state: Any = None, **kwargs: Any
    ) -> Any:
        chosen = self.initial_recipes(random_state)
        self._last = chosen
        return np.array([[recipe.hash] for recipe, _ in chosen], dtype=object)

    def do(
        self, problem: Any, n_samples: int, *args: Any, random_state: Any = None, **kwargs: Any
    ) -> Any:
        pop = super().do(problem, n_samples, *args, random_state=random_state, **kwargs)
        for ind, (recipe, label) in zip(pop, self._last, strict=True):
            ind.set("recipe", recipe)
            ind.set("parent_ids", ())
            ind.set("operators", (label,))
        return pop

    def initial_recipes(self, rng: np.random.Generator) -> list[tuple[Recipe, str]]:
        """The seed portfolio, then random draws until the population is full."""
        size = self.search.population_size
        name = self.search.recipes
        label = f"portfolio:{name}" if name in builtin_portfolios() else "file"
        chosen: list[tuple[Recipe, str]] = []
        hashes: set[str] = set()
        stored = self.store.get_meta("seed_recipes")
        if stored == LLM_SEEDS:
            seeds = self._llm_seeds(size)
        else:  # stored canonical, so no re-validation against a file
            seeds = [(Recipe(data), label) for data in stored[:size]]
        for recipe, seed_label in seeds:
            if recipe.hash not in hashes:
                chosen.append((recipe, seed_label))
                hashes.add(recipe.hash)
        attempts = 0
        while len(chosen) < size and attempts < size * self.search.max_redraws:
            attempts += 1
            recipe = self.space.sample(rng)
            if recipe.hash not in hashes:
                chosen.append((recipe, "random"))
                hashes.add(recipe.hash)
        return chosen

    def _llm_seeds(self, size: int) -> list[tuple[Recipe, str]]:
        """The first generation asked of an LLM; the built-in portfolios when it cannot."""
        if self.seeder is not None:
            self.listener.message(
                f"asking {self.seeder.agent.settings.model} for {size} first-generation recipes"
            )
            reply = self.seeder.seed(size, self.context(0))
            if reply is not None:
                for problem in reply.rejected:
                    self.listener.message(f"LLM seed recipe dropped: {problem}")
                return [(r, SEED_LABEL) for r in reply.recipes]
        self.listener.message(
            "no LLM seed recipes; the first generation starts from the conservative and "
            "aggressive portfolios instead"
        )
        seeds = []
        portfolios = builtin_portfolios()
        for name in ("conservative", "aggressive"):
            for data in portfolios[name]:
                try:
                    seeds.append((self.space.recipe(data), f"portfolio:{name}"))
                except EvoCompressError:  # a gene this back end cannot apply
                    continue
        return seeds[:size]
