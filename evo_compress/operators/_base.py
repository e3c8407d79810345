"""The variation-operator extension point (pymoo's ``Operator.do/_do``, Optuna's crossover).

The public ``do`` does the shared work: check the parent count, hand the hook plain copies
(parents are never modified), and repair the hook's proposal to the nearest valid canonical
recipe. Subclasses write only ``_do``. The RNG is always passed in, never global.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from evo_compress.exceptions import OperatorError
from evo_compress.genomes import Recipe, SearchSpace
from evo_compress.registry import Registry


@dataclass(frozen=True)
class Child:
    """A proposed offspring, with the parents (indices into the mating) and operators used."""

    recipe: Recipe
    parents: tuple[int, ...]
    operators: tuple[str, ...]


class Operator(ABC):
    name: ClassVar[str] = "operator"

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state kept in checkpoints (adaptive operators, budgets)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


class Crossover(Operator):
    n_parents: ClassVar[int] = 2

    def do(self, parents: Sequence[Recipe], rng: np.random.Generator) -> Recipe:
        if len(parents) != self.n_parents:
            raise OperatorError(
                f"crossover `{self.name}` takes {self.n_parents} parents, got {len(parents)}"
            )
        proposal = self._do([dict(p) for p in parents], rng)
        return self.space.repair(proposal, rng)

    @abstractmethod
    def _do(self, parents: list[dict[str, Any]], rng: np.random.Generator) -> dict[str, Any]:
        """Return the child's gene values (they need not be valid: ``do`` repairs them)."""


class Mutation(Operator):
    def do(self, recipe: Recipe, rng: np.random.Generator) -> Recipe:
        proposal = self._do(dict(recipe), rng)
        return self.space.repair(proposal, rng)

    @abstractmethod
    def _do(self, values: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """Return the mutated gene values (``do`` repairs them)."""


CROSSOVERS: Registry[Crossover] = Registry("crossover operator")
MUTATIONS: Registry[Mutation] = Registry("mutation operator")
CROSSOVERS.register("uniform", "evo_compress.operators.classic:UniformCrossover")
MUTATIONS.register("gene", "evo_compress.operators.classic:GeneMutation")


def _make(
    registry: Registry[Any], name: str, space: SearchSpace, params: Mapping[str, Any], where: str
) -> Any:
    factory = registry.get(name)
    try:
        return factory(space, **params)
    except TypeError as exc:
        raise OperatorError(f"`{where}.params`: {exc}") from None
    except OperatorError as exc:
        raise OperatorError(f"`{where}.params`: {exc}") from None


def make_crossover(
    name: str, space: SearchSpace, params: Mapping[str, Any], where: str = "crossover"
) -> Crossover:
    op: Crossover = _make(CROSSOVERS, name, space, params, where)
    return op


def make_mutation(
    name: str, space: SearchSpace, params: Mapping[str, Any], where: str = "mutation"
) -> Mutation:
    op: Mutation = _make(MUTATIONS, name, space, params, where)
    return op
