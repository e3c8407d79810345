"""Breeding a generation as a pymoo ``InfillCriterion`` (pymoo's own ``Mating`` is one):
tournament selection from pymoo, variation by the configured operators, a fresh pair for a
child the run has already seen, the children of remote (LLM) operators asked for
concurrently, and surrogate screening of a larger brood."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from pymoo.core.infill import InfillCriterion
from pymoo.core.population import Population
from pymoo.operators.selection.tournament import TournamentSelection

from evo_compress.config import PopulationConfig
from evo_compress.engine.problem import fitness
from evo_compress.genomes import Recipe, SearchSpace
from evo_compress.operators import (
    AdaptiveSelector,
    Crossover,
    Measured,
    Mutation,
    VariationContext,
)
from evo_compress.operators._base import Operator, Pending
from evo_compress.progress import ProgressListener
from evo_compress.surrogate import History, Screening

if TYPE_CHECKING:
    from evo_compress.agents.session import AgentSession


class SearchState(Protocol):
    """What breeding reads of the search (``Search`` provides it)."""

    @property
    def generation(self) -> int: ...

    @property
    def seen(self) -> set[str]: ...

    def variation_context(self, generation: int) -> VariationContext: ...

    def measure(self, ind: Any) -> Measured: ...

    def screening_history(self) -> History: ...


@dataclass(frozen=True)
class Child:
    """An offspring: its recipe, parents (ids), operators as recorded, the selector draws to
    credit (kind, index, fell back) and the parents' (F, CV) to compare it with."""

    recipe: Recipe
    parents: tuple[int, ...]
    operators: tuple[str, ...]
    credited: tuple[tuple[str, int, bool], ...]
    parent_fitness: tuple[tuple[np.ndarray, float], ...]
    request_slot: int | None = None
    """The slot its LLM request was recorded under (``llm_calls.slot``); None: its own."""


@dataclass(frozen=True)
class _Deferred:
    """A slot whose child a remote operator is making (``pending.finish`` gives it)."""

    pending: Pending
    parents: tuple[int, ...]
    kind: str
    index: int
    parent_fitness: tuple[tuple[np.ndarray, float], ...]


@dataclass(frozen=True)
class _Parent:
    ind: Any
    recipe: Recipe
    iid: int
    fitness: tuple[np.ndarray, float]


class Mating(InfillCriterion):
    """Replaces pymoo's ``Mating``: tournament ``selection`` from pymoo, variation by our
    operators, re-draws instead of pymoo's duplicate elimination (one round: the children
    it could make, fewer than asked only when re-draws keep failing)."""

    def __init__(
        self,
        selection: TournamentSelection,
        config: PopulationConfig,
        space: SearchSpace,
        crossovers: Sequence[Crossover],
        mutations: Sequence[Mutation],
        selectors: Mapping[str, AdaptiveSelector],
        state: SearchState,
        listener: ProgressListener,
        session: AgentSession | None = None,
        screening: Screening | None = None,
    ) -> None:
        super().__init__(n_max_iterations=1)
        self.selection = selection
        self.config = config
        self.space = space
        self.crossovers = crossovers
        self.mutations = mutations
        self.selectors = selectors
        self.state = state
        self.listener = listener
        self.session = session
        self.screening = screening
        self._parents: dict[int, _Parent] = {}

    def _do(
        self,
        problem: Any,
        pop: Population,
        n_offsprings: int,
        random_state: Any = None,
        algorithm: Any = None,
        **kwargs: Any,
    ) -> Population:
        children = self.breed(pop, n_offsprings, algorithm)
        off = Population.new(
            "X", np.array([[c.recipe.hash] for c in children], dtype=object).reshape(-1, 1)
        )
        for ind, child in zip(off, children, strict=True):
            ind.set("recipe", child.recipe)
            ind.set("parent_ids", child.parents)
            ind.set("operators", child.operators)
            ind.set("credited", child.credited)
            ind.set("parent_fitness", child.parent_fitness)
            ind.set("request_slot", child.request_slot)
        return off

    def breed(self, pop: Population, n: int, algorithm: Any) -> list[Child]:
        """``n`` children to evaluate. With surrogate screening (once the run has
        ``min_evaluations`` successful results), ``pool`` x ``n`` candidates are bred and the
        ``n`` the model rates best are kept, in the order they were bred. An LLM operator's
        request then proposes ``llm_candidates`` (default ``pool``) of them at once."""
        surrogate = self.config.search.surrogate
        history = self.state.screening_history() if self.screening is not None else None
        if (
            self.screening is None
            or history is None
            or int((~history.failed).sum()) < surrogate.min_evaluations
        ):
            return self.make_offspring(pop, n, algorithm)
        per_request = surrogate.llm_candidates or surrogate.pool
        candidates = self.make_offspring(pop, n * surrogate.pool, algorithm, per_request)
        chosen = self.screening.choose([c.recipe for c in candidates], history, n)
        return [candidates[i] for i in chosen]

    def make_offspring(
        self, pop: Population, n: int, algorithm: Any, per_request: int = 1
    ) -> list[Child]:
        """Select parents by tournament, vary them, and re-draw any child whose recipe the run
        has already seen. Returns fewer than ``n`` only when re-draws keep failing or a remote
        operator's candidates are dropped.

        Children of remote (LLM) operators are asked for concurrently after the other slots are
        drawn, and checked for duplicates in slot order afterwards; a re-draw never asks an LLM
        again (its fallback stands in), so a slot makes at most one LLM request series. With
        ``per_request`` > 1 (screening) such a slot asks for that many candidates, which take
        the places of as many children (the slots after it are not drawn); the ones that are
        new all stay, and when none is, the slot is re-drawn as any other."""
        rng: np.random.Generator = algorithm.random_state
        max_redraws = self.config.search.max_redraws
        self._parents = {}  # what _vary reads of each member of ``pop``, read once
        generation = self.state.generation
        taken = set(self.state.seen)
        # The front and measurements only matter to informed operators: skip the queries
        # when no operator reads them.
        informed = any(op.informed for op in (*self.crossovers, *self.mutations))
        context = (
            self.state.variation_context(generation)
            if informed
            else VariationContext(space=self.space, generation=generation)
        )
        made: dict[tuple[int, int], Child] = {}  # (slot, candidate of the slot)
        pending: list[tuple[int, _Deferred]] = []

        def select(count: int) -> np.ndarray:
            return self.selection.do(
                algorithm.problem,
                pop,
                count,
                2,
                to_pop=False,
                algorithm=algorithm,
                random_state=rng,
            )

        def context_at(slot: int, candidates: int = 1) -> VariationContext:
            if not informed:  # no operator reads it: skip a copy per child
                return context
            # Informed operators steer clear of the children of this generation too: without
            # them, most of their re-draws are two slots proposing the same child.
            return replace(context, slot=slot, seen=frozenset(taken), candidates=candidates)

        def redraw(slot: int, first_attempt: int) -> bool:
            for _ in range(first_attempt, max_redraws):
                pair = select(1)[0]
                child = self._vary(pop, pair, rng, context_at(slot), remote=False)
                assert isinstance(child, Child)
                if child.recipe.hash not in taken:
                    taken.add(child.recipe.hash)
                    made[slot, 0] = child
                    return True
            return False

        # One tournament round for the whole generation (as pymoo's own mating does); a slot
        # whose child is a duplicate draws a fresh pair.
        pairs = select(n)
        slot, places = 0, 0
        while places < n:
            wanted = min(per_request, n - places)
            child = self._vary(pop, pairs[slot], rng, context_at(slot, wanted), remote=True)
            if isinstance(child, _Deferred):
                pending.append((slot, child))
                places += wanted
            else:
                places += 1
                if child.recipe.hash not in taken:
                    taken.add(child.recipe.hash)
                    made[slot, 0] = child
                elif not redraw(slot, 1):
                    break
            slot += 1
        if pending:
            self._run_remote([p for _, p in pending], generation)
            for slot, job in pending:  # slot order: deterministic whatever finished first
                proposals = job.pending.finish_all() if per_request > 1 else [job.pending.finish()]
                new = 0
                for j, proposal in enumerate(proposals):
                    child = Child(
                        proposal.recipe,
                        job.parents,
                        proposal.operators,
                        ((job.kind, job.index, proposal.fell_back),),
                        job.parent_fitness,
                        request_slot=slot,
                    )
                    if child.recipe.hash not in taken:
                        taken.add(child.recipe.hash)
                        made[slot, j] = child
                        new += 1
                if not new:
                    redraw(slot, 1)
            if self.session is not None:  # one line per LLM operator: valid, fell back, why
                self.session.report(generation)
        return [made[slot] for slot in sorted(made)]

    def _vary(
        self,
        pop: Population,
        pair: np.ndarray,
        rng: np.random.Generator,
        context: VariationContext,
        remote: bool,
    ) -> Child | _Deferred:
        """One child of a tournament pair: crossover with ``crossover_prob``, then mutation
        with ``mutation_prob``, each drawn from its (adaptive) selector. An informed operator
        (expert, LLM) reads the measured parents and makes the whole child, so the other
        draw of the slot is not applied. A remote one's child is deferred (``remote``) or its
        stand-in's (``remote=False``)."""
        ops = self.config.search.operators
        mother, father = self._parent(pop, int(pair[0])), self._parent(pop, int(pair[1]))
        first, second = mother.ind, father.ind
        recipe: Recipe = mother.recipe
        parents: tuple[int, ...] = (mother.iid,)
        names: tuple[str, ...] = ()
        credited: list[tuple[str, int, bool]] = []
        drawn: list[tuple[str, int, Operator, Sequence[Any]]] = []
        if rng.random() < ops.crossover_prob:
            i = self.selectors["crossover"].pick(rng)
            op: Crossover = self.crossovers[i]
            if op.informed:
                drawn.append(("crossover", i, op, (first, second)))
            else:
                recipe = op.do([mother.recipe, father.recipe], rng)
                parents += (father.iid,)
                names += (op.label,)
                credited.append(("crossover", i, False))
        if not drawn and rng.random() < ops.mutation_prob:
            j = self.selectors["mutation"].pick(rng)
            mut: Mutation = self.mutations[j]
            if mut.informed:
                drawn.append(("mutation", j, mut, (first,)))
            else:
                recipe = mut.do(recipe, rng)
                names += (mut.label,)
                credited.append(("mutation", j, False))
        if not drawn:
            parent_fitness = tuple(p.fitness for p in (mother, father)[: len(parents)])
            return Child(recipe, parents, names, tuple(credited), parent_fitness)
        kind, index, informed, inds = drawn[0]
        measured = [self.state.measure(ind) for ind in inds]
        ids = tuple(m.id for m in measured)
        parent_fitness = tuple(fitness(ind) for ind in inds)
        proposal = informed.make_child(measured, rng, context, defer=remote)
        if isinstance(proposal, Pending):
            return _Deferred(proposal, ids, kind, index, parent_fitness)
        return Child(
            proposal.recipe,
            ids,
            proposal.operators,
            ((kind, index, proposal.fell_back),),
            parent_fitness,
        )

    def _parent(self, pop: Population, index: int) -> _Parent:
        """``pop[index]``'s recipe, id and fitness, read once per ``make_offspring``: a
        screened generation breeds several children of each member."""
        parent = self._parents.get(index)
        if parent is None:
            ind = pop[index]
            parent = _Parent(ind, ind.get("recipe"), int(ind.get("iid")), fitness(ind))
            self._parents[index] = parent
        return parent

    def _run_remote(self, jobs: list[_Deferred], generation: int) -> None:
        """The LLM requests of one generation, at most ``llm.concurrency`` at a time."""
        asking = [j.pending for j in jobs if j.pending.asks]
        if not asking:
            return
        self.listener.message(
            f"generation {generation}: asking LLM operators for {len(asking)} children"
        )
        run_concurrently([p.run for p in asking], self.config.llm.concurrency)


def run_concurrently(tasks: Sequence[Any], limit: int) -> None:
    """Run ``tasks`` on at most ``limit`` threads and wait for all of them; then raise the
    first error. Requests in flight when one fails still finish and are recorded, so resume
    does not pay for them again. Daemon threads: Ctrl-C is not held up by a slow provider."""
    errors: list[BaseException] = []
    slots = threading.Semaphore(limit)

    def work(task: Any) -> None:
        try:
            task()
        except BaseException as exc:
            errors.append(exc)
        finally:
            slots.release()

    threads = []
    for task in tasks:
        slots.acquire()
        thread = threading.Thread(target=work, args=(task,), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
