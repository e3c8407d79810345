"""The variation-operator extension point (pymoo's ``Operator.do/_do``, Optuna's crossover).

The public ``do`` does the shared work: check the parent count, hand the hook plain copies
(parents are never modified), and repair the hook's proposal to the nearest valid canonical
recipe. Subclasses write only ``_do``. The RNG is always passed in, never global.

*Informed* operators (the rule-based expert, the LLM agents) also read what was measured:
the engine calls ``make_child`` with the parents' objectives and a ``VariationContext``
(front, constraints, baseline, hardware). Every operator has ``vary`` (for the classic ones
``do`` on the parents' recipes) and ``make_child``, which the search loop calls: a finished
``Proposal``, or from a *remote* operator (the LLM agents) a ``Pending`` child that the loop
runs concurrently with the generation's other pending children, each with its own RNG, so
the children do not depend on which reply arrives first. Whatever a remote operator needs
(the LLM session) is passed in when it is built, by ``evo_compress.app``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from evo_compress.exceptions import OperatorError
from evo_compress.genomes import Recipe, SearchSpace
from evo_compress.registry import Registry

if TYPE_CHECKING:
    from evo_compress.agents.session import AgentSession


@dataclass(frozen=True)
class Measured:
    """A recipe of this run with what its evaluation found: what informed operators read.

    Attributes:
        id: The individual's id in the run store.
        recipe: Its recipe.
        status: ``"ok"``, ``"failed"`` or ``"infeasible"``.
        objectives: The five objectives when ok; None otherwise.
        violations: Active constraint name -> relative violation (> 0: violated, <= 0:
            slack).
        reason: Why it failed or is infeasible; None when ok.
    """

    id: int
    recipe: Recipe
    status: str  # ok | failed | infeasible
    objectives: Mapping[str, float] | None = None
    # Active constraint name -> relative violation (> 0: violated, <= 0: slack).
    violations: Mapping[str, float] = field(default_factory=dict)
    reason: str | None = None

    @property
    def feasible(self) -> bool:
        """Whether it was evaluated ok and violates no active constraint."""
        return self.status == "ok" and all(v <= 0 for v in self.violations.values())


@dataclass(frozen=True)
class VariationContext:
    """The state of the search an informed operator may use to propose a child.

    Attributes:
        space: The run's search space.
        generation: The generation the child is made for.
        slot: The child's slot in that generation.
        constraints: The active limits, by config key (``max_latency``, ...).
        reference: The uncompressed baseline's objectives; None when not measured.
        reference_tasks: The baseline's score of each task it recorded (what
            ``max_task_drop`` is measured against); None when not recorded.
        front: The current front, as measured.
        model: The model's id.
        hardware: The ``hardware`` section, as plain data.
        seen: Hashes of the recipes this run has evaluated already or made earlier in
            this generation.
        candidates: How many children a remote operator may propose for this slot: more
            than one while surrogate screening chooses which children to evaluate.
    """

    space: SearchSpace
    generation: int = 0
    slot: int = 0
    constraints: Mapping[str, float] = field(default_factory=dict)  # active limits, by key
    reference: Mapping[str, float] | None = None  # the uncompressed baseline's objectives
    # The baseline's score of each task it recorded (what `max_task_drop` is measured against).
    reference_tasks: Mapping[str, float] | None = None
    front: tuple[Measured, ...] = ()
    model: str = ""
    hardware: Mapping[str, Any] = field(default_factory=dict)
    # Recipe hashes this run has evaluated already or made earlier in this generation.
    seen: frozenset[str] = frozenset()
    # Children a remote operator may propose for the slot (> 1: the surrogate chooses).
    candidates: int = 1


@dataclass(frozen=True)
class Proposal:
    """A child and the operators that made it (a fallback adds ``fallback:<name>``).
    ``fell_back``: a remote operator's stand-in made it, so the operator earns no credit.

    Attributes:
        recipe: The child: a valid, canonical recipe.
        operators: The labels of the operators that made it, in order.
        fell_back: Whether a remote operator's stand-in made it.
    """

    recipe: Recipe
    operators: tuple[str, ...]
    fell_back: bool = False


class Pending(ABC):
    """A child a remote operator is making. The loop calls ``run`` on any thread, at once
    with the generation's other pending children (when ``asks``: it has requests to make),
    then ``finish`` on the main thread in slot order."""

    @property
    @abstractmethod
    def asks(self) -> bool:
        """Whether ``run`` has anything to do (no budget, no key: it falls back at once).

        Returns:
            False when ``finish`` can give the stand-in's child without ``run``.
        """

    @abstractmethod
    def run(self) -> None:
        """The slow part (requests); thread-safe, called on any thread.

        A request the service fails is no error: ``finish`` then gives the stand-in's child.
        """

    @abstractmethod
    def finish(self) -> Proposal:
        """The child, on the main thread, after ``run`` (or without it when not ``asks``).

        Returns:
            The service's child, or the stand-in's (``fell_back``) when it gave none.
        """

    def finish_all(self) -> list[Proposal]:
        """Every child the service proposed (``context.candidates`` at most), or the
        stand-in's; instead of ``finish``, for a slot whose children the surrogate screens.

        Returns:
            At least one proposal; by default ``finish``'s alone.
        """
        return [self.finish()]


class Operator(ABC):
    """Base of every variation operator: parents in, one child out.

    The search loop calls ``make_child``; ``vary`` makes the child now. Classic operators
    subclass ``Crossover`` or ``Mutation`` and write only ``_do``; informed ones (the expert,
    the LLM agents) write ``vary`` and read the parents' measurements. Every randomness
    comes from the ``rng`` passed in; parents are never modified.

    Args:
        space: The search space the recipes belong to.

    Attributes:
        name: The name it is registered under (an operator's ``name`` in the config).
        informed: Whether it reads measured parents and makes the whole child itself.
        remote: Whether it calls a service: its children are made concurrently, each with
            its own RNG, and it is given the run's LLM session.
        space: The search space it was built for.
        label: Its name in records; the engine makes it unique per run.
    """

    name: ClassVar[str] = "operator"
    informed: ClassVar[bool] = False  # reads measured parents: makes the whole child itself
    remote: ClassVar[bool] = False  # calls a service: run concurrently with its own RNG

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self.label = self.name  # the name in records; the engine makes it unique per run

    @abstractmethod
    def vary(
        self, parents: Sequence[Measured], rng: np.random.Generator, context: VariationContext
    ) -> Proposal:
        """A child of ``parents``, made now. Classic operators ignore the measurements.

        Args:
            parents: The parents, with what their evaluations found (never modified).
            rng: The only source of randomness.
            context: The state of the search.

        Returns:
            The child and the operators that made it.

        Raises:
            OperatorError: The operator cannot make a child of these parents.
        """

    def make_child(
        self,
        parents: Sequence[Measured],
        rng: np.random.Generator,
        context: VariationContext,
        defer: bool = True,
    ) -> Proposal | Pending:
        """What the search loop calls: the finished child, or (a remote operator with
        ``defer``) a ``Pending`` one. ``defer=False`` (a re-draw, which never waits on a
        service again) always gives a finished child.

        Args:
            parents: The parents, with what their evaluations found (never modified).
            rng: The only source of randomness.
            context: The state of the search.
            defer: Whether a remote operator may return a ``Pending`` child.

        Returns:
            A ``Proposal``, or a ``Pending`` child; the default is ``vary``'s proposal.
        """
        return self.vary(parents, rng, context)

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state kept in checkpoints (adaptive operators, budgets).

        Returns:
            JSON-ready data that ``load_state_dict`` takes back; empty by default.
        """
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned.

        Args:
            state: A checkpoint's copy of ``state_dict()``.
        """


class Crossover(Operator):
    """A classic crossover: ``n_parents`` recipes in, one child out. Subclasses write ``_do``.

    Attributes:
        n_parents: How many parents it takes.
    """

    n_parents: ClassVar[int] = 2

    def do(self, parents: Sequence[Recipe], rng: np.random.Generator) -> Recipe:
        """A child of ``parents``: ``_do`` on copies of them, repaired.

        Args:
            parents: ``n_parents`` recipes (never modified).
            rng: The only source of randomness.

        Returns:
            The nearest valid canonical recipe to what ``_do`` proposed.

        Raises:
            OperatorError: The number of parents is not ``n_parents``.
            SearchSpaceError: No recipe satisfies the space's forbid rules.
        """
        if len(parents) != self.n_parents:
            raise OperatorError(
                f"crossover `{self.name}` takes {self.n_parents} parents, got {len(parents)}"
            )
        proposal = self._do([_plain(p) for p in parents], rng)
        return self.space.repair(proposal, rng)

    def vary(
        self, parents: Sequence[Measured], rng: np.random.Generator, context: VariationContext
    ) -> Proposal:
        """``do`` on the parents' recipes, labelled with this operator.

        Args:
            parents: The parents (their measurements are not read).
            rng: The only source of randomness.
            context: Not read.

        Returns:
            The child, made by ``label``.

        Raises:
            OperatorError: As ``do``.
        """
        return Proposal(self.do([p.recipe for p in parents], rng), (self.label,))

    @abstractmethod
    def _do(self, parents: list[dict[str, Any]], rng: np.random.Generator) -> dict[str, Any]:
        """The child's gene values: the hook subclasses write.

        Args:
            parents: Plain copies of the parents' gene values, which it may change.
            rng: The only source of randomness.

        Returns:
            The child's gene values; they need not be valid: ``do`` repairs them.
        """


class Mutation(Operator):
    """A classic mutation: one recipe in, one changed child out. Subclasses write ``_do``."""

    def do(self, recipe: Recipe, rng: np.random.Generator) -> Recipe:
        """A mutant of ``recipe``: ``_do`` on a copy of it, repaired.

        Args:
            recipe: The parent (never modified).
            rng: The only source of randomness.

        Returns:
            The nearest valid canonical recipe to what ``_do`` proposed.

        Raises:
            SearchSpaceError: No recipe satisfies the space's forbid rules.
        """
        proposal = self._do(_plain(recipe), rng)
        return self.space.repair(proposal, rng)

    def vary(
        self, parents: Sequence[Measured], rng: np.random.Generator, context: VariationContext
    ) -> Proposal:
        """``do`` on the first parent's recipe, labelled with this operator.

        Args:
            parents: The parents; only the first is read, not its measurements.
            rng: The only source of randomness.
            context: Not read.

        Returns:
            The mutant, made by ``label``.
        """
        return Proposal(self.do(parents[0].recipe, rng), (self.label,))

    @abstractmethod
    def _do(self, values: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """The mutated gene values: the hook subclasses write.

        Args:
            values: A plain copy of the parent's gene values, which it may change.
            rng: The only source of randomness.

        Returns:
            The mutant's gene values; they need not be valid: ``do`` repairs them.
        """


CROSSOVERS: Registry[Crossover] = Registry("crossover operator", group="evo_compress.crossovers")
MUTATIONS: Registry[Mutation] = Registry("mutation operator", group="evo_compress.mutations")
CROSSOVERS.register("uniform", "evo_compress.operators.classic:UniformCrossover")
MUTATIONS.register("gene", "evo_compress.operators.classic:GeneMutation")
MUTATIONS.register("expert", "evo_compress.operators.expert:ExpertMutation")
# Provider SDKs are imported lazily, by the agents' clients, when a request is made.
CROSSOVERS.register("llm", "evo_compress.operators.llm:LLMCrossover")
MUTATIONS.register("llm", "evo_compress.operators.llm:LLMMutation")


def _make(
    registry: Registry[Any],
    name: str,
    space: SearchSpace,
    params: Mapping[str, Any],
    where: str,
    session: AgentSession | None,
) -> Any:
    factory = registry.get(name)
    # A remote operator is given the run's LLM session (None: it falls back at once).
    services = {"session": session} if getattr(factory, "remote", False) else {}
    try:
        return factory(space, **params, **services)
    except TypeError as exc:
        raise OperatorError(f"`{where}.params`: {exc}") from None
    except OperatorError as exc:
        raise OperatorError(f"`{where}.params`: {exc}") from None


def make_crossover(
    name: str,
    space: SearchSpace,
    params: Mapping[str, Any],
    where: str = "crossover",
    session: AgentSession | None = None,
) -> Crossover:
    """The crossover registered as ``name``, built for ``space``.

    Args:
        name: A registered crossover (``uniform``, ``llm``, or a plugin's).
        space: The run's search space.
        params: Its keyword arguments (the operator's ``params`` in the config).
        where: The config path named in errors.
        session: The run's LLM session, given to a remote operator (None: it falls back
            at once).

    Returns:
        The operator.

    Raises:
        RegistryError: ``name`` is unknown, or its plugin fails to load.
        OperatorError: The operator refuses ``params``; the message names ``where``.
    """
    op: Crossover = _make(CROSSOVERS, name, space, params, where, session)
    return op


def make_mutation(
    name: str,
    space: SearchSpace,
    params: Mapping[str, Any],
    where: str = "mutation",
    session: AgentSession | None = None,
) -> Mutation:
    """The mutation registered as ``name``, built for ``space``.

    Args:
        name: A registered mutation (``gene``, ``expert``, ``llm``, or a plugin's).
        space: The run's search space.
        params: Its keyword arguments (the operator's ``params`` in the config).
        where: The config path named in errors.
        session: The run's LLM session, given to a remote operator (None: it falls back
            at once).

    Returns:
        The operator.

    Raises:
        RegistryError: ``name`` is unknown, or its plugin fails to load.
        OperatorError: The operator refuses ``params``; the message names ``where``.
    """
    op: Mutation = _make(MUTATIONS, name, space, params, where, session)
    return op


def operator_labels(crossover: Sequence[Any], mutation: Sequence[Any]) -> list[str]:
    """Record labels for the configured operators (crossovers first): a spec's ``label``, else
    its name, prefixed with its kind when that name is used more than once, numbered when
    still ambiguous.

    Args:
        crossover: The configured crossover specs (``name`` and ``label``).
        mutation: The configured mutation specs.

    Returns:
        One label per spec, crossovers first, all different.

    Raises:
        OperatorError: Two explicit labels are the same.
    """
    specs = [("crossover", s) for s in crossover] + [("mutation", s) for s in mutation]
    names = [s.name for _, s in specs]
    labels = []
    for kind, spec in specs:
        if spec.label is not None:
            labels.append(spec.label)
        elif names.count(spec.name) == 1:
            labels.append(spec.name)
        else:
            labels.append(f"{kind}:{spec.name}")
    for i, label in enumerate(labels):
        if labels.count(label) > 1:
            kind, spec = specs[i]
            if spec.label is not None:
                raise OperatorError(f"operator label `{label}` is used twice; labels must differ")
            labels[i] = f"{label}#{labels[:i].count(label) + 1}"
    return labels


def _plain(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """A plain copy of a recipe's gene values (``dict(recipe)`` reads a recipe gene by gene)."""
    return recipe.to_dict(nested=False) if isinstance(recipe, Recipe) else dict(recipe)
