"""The search loop: pymoo's NSGA-II / NSGA-III driven through ask/tell.

pymoo owns ranking, crowding / reference-direction survival and tournament selection. This
loop owns what pymoo cannot know: typed recipe operators and duplicate re-draws (``_Mating``),
the seed portfolio (``_Seeding``), evaluation with the run store and the fitness cache,
constraint values, lineage, and a plain-data checkpoint after every generation from which
``resume`` continues bit for bit.

Only pymoo is used, not DEAP: pymoo ships NSGA-III's reference directions and normalisation,
moocore's fast hypervolume, and an ask/tell interface whose state (population attributes,
one numpy Generator, NSGA-III's ideal/nadir points) can be saved as plain data.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2, binary_tournament
from pymoo.algorithms.moo.nsga3 import NSGA3, comp_by_cv_then_random
from pymoo.core.duplicate import NoDuplicateElimination
from pymoo.core.population import Population
from pymoo.core.problem import Problem
from pymoo.core.sampling import Sampling
from pymoo.core.termination import NoTermination
from pymoo.operators.selection.tournament import TournamentSelection
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting
from pymoo.util.ref_dirs import get_reference_directions

if TYPE_CHECKING:
    from evo_compress.agents.operators import LLMSeeder
    from evo_compress.agents.session import AgentSession

from evo_compress.config import LLM_SEEDS, PopulationConfig
from evo_compress.exceptions import EvaluationError, EvoCompressError, RunStoreError
from evo_compress.fitness import (
    EvaluationResult,
    Evaluator,
    FitnessCache,
)
from evo_compress.fitness._base import limit_excess
from evo_compress.fitness.noise import STDERR_KEY
from evo_compress.fitness.pool import (
    EvaluationPool,
    Task,
    WorkerPlan,
)
from evo_compress.fitness.racing import QUICK, RaceMember, RaceRule, stage_of
from evo_compress.genomes import Recipe, SearchSpace, builtin_portfolios
from evo_compress.objectives import OBJECTIVES, to_minimization
from evo_compress.operators import (
    AdaptiveSelector,
    Crossover,
    Measured,
    Mutation,
    VariationContext,
)
from evo_compress.operators._base import Operator
from evo_compress.progress import GenerationStats, ProgressListener
from evo_compress.runs.hypervolume import Box, run_box
from evo_compress.runs.store import Checkpoint, RunStore
from evo_compress.surrogate import History, Screening

# A failed or infeasible evaluation gets at least this constraint violation (it loses every
# comparison with a success) and placeholder objectives pymoo never reads: survival ranks
# infeasible individuals by violation alone. Neither number is ever reported.
FAILURE_VIOLATION = 1e3
_PLACEHOLDER_F = 1e12
_POP_ATTRIBUTES = ("rank", "crowding", "niche", "dist_to_niche")
SEED_LABEL = "llm-seed"


def failure_violation(result: EvaluationResult) -> float:
    """The violation of a failed evaluation: ``FAILURE_VIOLATION`` x (1 + how far past its
    limit it went) when the record says (out of memory by 10% -> 1100), so that among
    failures survival leans towards the near misses; ``FAILURE_VIOLATION`` otherwise. A
    function of the stored record only: a resumed run computes the same values."""
    excess = limit_excess(result)
    return FAILURE_VIOLATION if excess is None else FAILURE_VIOLATION * (1.0 + excess)


class Search:
    """One run of the search over one run directory, its collaborators passed in (built by
    ``evo_compress.app.start_search`` / ``resume_search``)."""

    def __init__(
        self,
        config: PopulationConfig,
        *,
        store: RunStore,
        space: SearchSpace,
        evaluator: Evaluator,
        cache: FitnessCache | None,
        pool: EvaluationPool,
        plan: WorkerPlan,
        crossovers: list[Crossover],
        mutations: list[Mutation],
        selectors: dict[str, AdaptiveSelector],
        session: AgentSession | None,
        seeder: LLMSeeder | None,
        target_generations: int,
        listener: ProgressListener,
        retry_failed: bool = False,
    ) -> None:
        self.config = config
        self.store = store
        self.space = space
        self.evaluator = evaluator
        self.cache = cache
        self.pool = pool
        self.plan = plan
        self.crossovers = crossovers
        self.mutations = mutations
        self.selectors = selectors
        self.session = session
        self.seeder = seeder
        self.target_generations = target_generations
        self.retry_failed = retry_failed
        self.listener = listener
        self.fingerprint = evaluator.fingerprint()
        # Racing: quick results are cached under a key of their own, never served as full ones.
        self.fidelity = config.fidelity
        self.quick_fingerprint = (
            evaluator.quick_fingerprint(self.fidelity.quick_limit)
            if self.fidelity.racing
            else None
        )
        # Left out of the fingerprint; a cached failure they may have caused is kept with them.
        self.limits = evaluator.limits()
        self._measured: dict[int, Measured] = {}
        self.reference: EvaluationResult | None = None
        self._seen: set[str] = set()
        # Results of this run by recipe hash: a repeated recipe (the baseline reference in
        # generation 0, say) re-uses its result instead of a store query per evaluation.
        self._results: dict[str, EvaluationResult] = {}
        self._archive: dict[int, np.ndarray] = {}  # the run's front: id -> minimisation F
        # The hypervolume box of the last completed generation: its front and the baseline
        # reference (runs/hypervolume.py); stats and operator credit are measured in it.
        self.box = Box.of([], config.hypervolume)
        self._constraint_names = list(config.constraints.active())
        self.completed_generations = 0
        # Surrogate pre-screening; off with remote (LLM) operators, whose every candidate
        # would cost a request.
        surrogate = config.search.surrogate
        remote = any(op.remote for op in (*self.crossovers, *self.mutations))
        self.screening: Screening | None = (
            Screening(space, surrogate.exploration) if surrogate.enabled and not remote else None
        )
        # What the screening model learns from: recipe hash -> (recipe, F, G, failed), filled
        # a generation at a time (-1 is the baseline reference).
        self._history: dict[str, tuple[Recipe, np.ndarray, np.ndarray, bool]] = {}
        self._history_next = -1

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
        self.pool.close()
        self.evaluator.close()
        if self.cache is not None:
            self.cache.close()
        self.store.close()

    # ------------------------------------------------------------------ the loop
    def run(self) -> list[GenerationStats]:
        """Run (or continue) until ``target_generations`` generations are complete."""
        problem = _RecipeProblem(1 + len(self._constraint_names))
        algorithm = self._algorithm()
        algorithm.setup(problem, seed=self.config.search.seed, termination=NoTermination())
        self.listener.search_started(self)
        if self.plan.backend != "local" or (self.plan.workers or 1) > 1:
            self.listener.message(f"evaluating in parallel: {self.plan.note}")
        self.evaluator.prepare()
        self.reference = self._reference()

        checkpoint = self.store.last_checkpoint(on_damage=self.listener.message)
        generation = 0
        if checkpoint is not None:
            self._restore(algorithm, checkpoint)
            generation = checkpoint.generation + 1
        self._update_box()
        self.completed_generations = generation

        history: list[GenerationStats] = []
        while generation < self.target_generations:
            started = time.perf_counter()
            self._generation = generation
            offspring = algorithm.ask()
            if offspring is None or len(offspring) == 0:
                self.listener.message(
                    "every recipe the operators can reach has been evaluated; stopping early"
                )
                self.store.set_meta({"stopped_early_at": generation})
                break
            self.listener.generation_started(generation, len(offspring))
            counts = self._evaluate_offspring(generation, offspring)
            algorithm.tell(infills=offspring)
            stats = self._checkpoint(algorithm, generation, counts, started)
            history.append(stats)
            self.listener.generation_finished(stats)
            generation += 1
            self.completed_generations = generation
        return history

    # ------------------------------------------------------------------ pymoo wiring
    def _algorithm(self) -> NSGA2 | NSGA3:
        search = self.config.search
        common: dict[str, Any] = {
            "pop_size": search.population_size,
            "n_offsprings": search.offspring_size or search.population_size,
            "sampling": _Seeding(self),
            "eliminate_duplicates": NoDuplicateElimination(),
            "output": None,
        }
        if search.algorithm == "nsga3":
            selection = TournamentSelection(func_comp=comp_by_cv_then_random)
            return NSGA3(
                ref_dirs=_reference_directions(search.population_size, search.nsga3_partitions),
                mating=_Mating(self, selection),
                **common,
            )
        selection = TournamentSelection(func_comp=binary_tournament)
        return NSGA2(mating=_Mating(self, selection), **common)

    def initial_recipes(self, rng: np.random.Generator) -> list[tuple[Recipe, str]]:
        """The seed portfolio, then random draws until the population is full."""
        size = self.config.search.population_size
        name = self.config.search.recipes
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
        while len(chosen) < size and attempts < size * self.config.search.max_redraws:
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
            reply = self.seeder.seed(size, self._variation_context(0))
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

    def make_offspring(
        self, pop: Population, n: int, selection: TournamentSelection, algorithm: Any
    ) -> list[_Child]:
        """Select parents by tournament, vary them, and re-draw any child whose recipe the run
        has already seen. Returns fewer than ``n`` only when re-draws keep failing.

        Children of remote (LLM) operators are asked for concurrently after the other slots are
        drawn, and checked for duplicates in slot order afterwards; a re-draw never asks an LLM
        again (its fallback stands in), so a slot makes at most one LLM request series."""
        rng: np.random.Generator = algorithm.random_state
        max_redraws = self.config.search.max_redraws
        taken = set(self._seen)
        # The front and measurements only matter to informed operators: skip the queries
        # when no operator reads them.
        informed = any(op.informed for op in (*self.crossovers, *self.mutations))
        context = (
            self._variation_context(self._generation)
            if informed
            else VariationContext(space=self.space, generation=self._generation)
        )
        made: dict[int, _Child] = {}
        pending: list[tuple[int, _Pending]] = []

        def select(count: int) -> np.ndarray:
            return selection.do(
                algorithm.problem,
                pop,
                count,
                2,
                to_pop=False,
                algorithm=algorithm,
                random_state=rng,
            )

        def context_at(slot: int) -> VariationContext:
            if not informed:
                return replace(context, slot=slot)
            # Informed operators steer clear of the children of this generation too: without
            # them, most of their re-draws are two slots proposing the same child.
            return replace(context, slot=slot, seen=frozenset(taken))

        def redraw(slot: int, first_attempt: int) -> bool:
            for _ in range(first_attempt, max_redraws):
                pair = select(1)[0]
                child = self._vary(pop, pair, rng, context_at(slot), remote=False)
                assert isinstance(child, _Child)
                if child.recipe.hash not in taken:
                    taken.add(child.recipe.hash)
                    made[slot] = child
                    return True
            return False

        # One tournament round for the whole generation (as pymoo's own mating does); a slot
        # whose child is a duplicate draws a fresh pair.
        pairs = select(n)
        for slot in range(n):
            child = self._vary(pop, pairs[slot], rng, context_at(slot), remote=True)
            if isinstance(child, _Pending):
                pending.append((slot, child))
            elif child.recipe.hash not in taken:
                taken.add(child.recipe.hash)
                made[slot] = child
            elif not redraw(slot, 1):
                break
        if pending:
            self._run_remote([p for _, p in pending])
            for slot, job in pending:  # slot order: deterministic whatever finished first
                proposal = job.op.finish(job.job)  # type: ignore[attr-defined]
                child = _Child(
                    proposal.recipe,
                    job.parents,
                    proposal.operators,
                    ((job.kind, job.index, len(proposal.operators) > 1),),
                    job.parent_fitness,
                )
                if child.recipe.hash not in taken:
                    taken.add(child.recipe.hash)
                    made[slot] = child
                else:
                    redraw(slot, 1)
            if self.session is not None:  # one line per LLM operator: valid, fell back, why
                self.session.report(self._generation)
        return [made[slot] for slot in sorted(made)]

    def breed(
        self, pop: Population, n: int, selection: TournamentSelection, algorithm: Any
    ) -> list[_Child]:
        """``n`` children to evaluate. With surrogate screening (once the run has
        ``min_evaluations`` successful results), ``pool`` x ``n`` candidates are bred and the
        ``n`` the model rates best are kept, in the order they were bred."""
        surrogate = self.config.search.surrogate
        history = self._screening_history() if self.screening is not None else None
        if (
            self.screening is None
            or history is None
            or int((~history.failed).sum()) < surrogate.min_evaluations
        ):
            return self.make_offspring(pop, n, selection, algorithm)
        candidates = self.make_offspring(pop, n * surrogate.pool, selection, algorithm)
        chosen = self.screening.choose([c.recipe for c in candidates], history, n)
        return [candidates[i] for i in chosen]

    def _screening_history(self) -> History:
        """Every distinct recipe this run evaluated before this generation (the baseline
        reference included), in the order they were recorded. A generation cut short by a
        crash is left out, so a resumed run breeds from the history the uninterrupted run had
        and makes the same choice. Read from the store once per generation, kept in memory."""
        rows = self._history
        for generation in range(self._history_next, self._generation):
            for row in self.store.individuals(generation):
                evaluation = self.store.evaluation(row.id)
                if evaluation is None or row.hash in rows:
                    continue
                result = evaluation.result
                rows[row.hash] = (
                    Recipe(row.recipe),
                    self._objectives(result),
                    self._constraints(result)[1:],
                    not result.ok or result.objectives is None,
                )
        self._history_next = max(self._history_next, self._generation)
        values = list(rows.values())
        return History(
            [v[0] for v in values],
            np.array([v[1] for v in values]).reshape(len(values), len(OBJECTIVES)),
            np.array([v[2] for v in values]).reshape(len(values), len(self._constraint_names)),
            np.array([v[3] for v in values], dtype=bool),
        )

    def _vary(
        self,
        pop: Population,
        pair: np.ndarray,
        rng: np.random.Generator,
        context: VariationContext,
        remote: bool,
    ) -> _Child | _Pending:
        """One child of a tournament pair: crossover with ``crossover_prob``, then mutation
        with ``mutation_prob``, each drawn from its (adaptive) selector. An informed operator
        (expert, LLM) reads the measured parents and makes the whole child, so the other
        draw of the slot is not applied. ``remote=False`` puts an LLM's fallback in its place."""
        ops = self.config.search.operators
        first, second = pop[int(pair[0])], pop[int(pair[1])]
        recipe: Recipe = first.get("recipe")
        parents: tuple[int, ...] = (int(first.get("iid")),)
        names: tuple[str, ...] = ()
        credited: list[tuple[str, int, bool]] = []
        drawn: list[tuple[str, int, Operator, Sequence[Any]]] = []
        if rng.random() < ops.crossover_prob:
            i = self.selectors["crossover"].pick(rng)
            op: Crossover = self.crossovers[i]
            if op.informed:
                drawn.append(("crossover", i, op, (first, second)))
            else:
                recipe = op.do([first.get("recipe"), second.get("recipe")], rng)
                parents += (int(second.get("iid")),)
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
            fitness = tuple(_fitness(ind) for ind in (first, second)[: len(parents)])
            return _Child(recipe, parents, names, tuple(credited), fitness)
        kind, index, informed, inds = drawn[0]
        measured = [self._measure(ind) for ind in inds]
        ids = tuple(m.id for m in measured)
        fitness = tuple(_fitness(ind) for ind in inds)
        if informed.remote:
            if remote:
                job_rng = np.random.default_rng(int(rng.integers(2**63)))
                job = informed.start(measured, job_rng, context)  # type: ignore[attr-defined]
                return _Pending(informed, job, ids, kind, index, fitness)
            stand_in: Operator = informed.fallback  # type: ignore[attr-defined]
            proposal = stand_in.vary(measured, rng, context)
            return _Child(
                proposal.recipe,
                ids,
                (informed.label, f"fallback:{stand_in.label}"),
                ((kind, index, True),),
                fitness,
            )
        proposal = informed.vary(measured, rng, context)
        return _Child(proposal.recipe, ids, proposal.operators, ((kind, index, False),), fitness)

    def _run_remote(self, jobs: list[_Pending]) -> None:
        """The LLM requests of one generation, at most ``llm.concurrency`` at a time."""
        asking = [j for j in jobs if j.job.grant.calls > 0]
        if not asking:
            return
        self.listener.message(
            f"generation {self._generation}: asking LLM operators for {len(asking)} children"
        )
        _run_concurrently(
            [functools.partial(j.op.run, j.job) for j in asking],  # type: ignore[attr-defined]
            self.config.llm.concurrency,
        )

    def _variation_context(self, generation: int) -> VariationContext:
        reference = self.reference.objectives if self.reference is not None else None
        return VariationContext(
            space=self.space,
            generation=generation,
            constraints=dict(self.config.constraints.active()),
            reference=dict(reference) if reference else None,
            front=tuple(self._measure_id(i) for i in sorted(self._archive)),
            model=self.config.model.id,
            hardware=self.config.hardware.model_dump(mode="json"),
            seen=frozenset(self._seen),
        )

    def _measure(self, ind: Any) -> Measured:
        return self._measure_id(int(ind.get("iid")), ind.get("recipe"))

    def _measure_id(self, ident: int, recipe: Recipe | None = None) -> Measured:
        """An individual of this run with its evaluation, for informed operators."""
        cached = self._measured.get(ident)
        if cached is not None:
            return cached
        if recipe is None:
            recipe = Recipe(self.store.individual(ident).recipe)
        row = self.store.evaluation(ident)
        if row is None:
            raise RunStoreError(f"{self.store.run_dir}: individual {ident} has no evaluation")
        result = row.result
        g = self._constraints(result)
        violations = (
            {name: float(g[i]) for i, name in enumerate(self._constraint_names, start=1)}
            if result.ok
            else {}
        )
        measured = Measured(
            ident, recipe, result.status, result.objectives, violations, result.reason
        )
        self._measured[ident] = measured
        return measured

    # ------------------------------------------------------------------ evaluation
    def _reference(self) -> EvaluationResult:
        """Evaluate (or load) the uncompressed baseline of the base space: the reference for
        `max_accuracy_drop` and for the hypervolume's scale. Stored as generation -1."""
        self._base_space = SearchSpace.from_data(self.store.get_meta("base_space"))
        base = self._base_space.baseline()
        row = self.store.individual_at(-1, 0)
        if row is None:
            [ident] = self.store.add_individuals(
                [_individual_row(-1, 0, base, (), ("reference",))]
            )
        else:
            ident = row.id
        result, _ = self._evaluate(ident, base, self._base_space, stored=row is not None)
        if not result.ok and self.config.constraints.max_accuracy_drop is not None:
            raise EvaluationError(
                f"the baseline recipe failed ({result.reason}); "
                "`constraints.max_accuracy_drop` is measured against it"
            )
        return result

    def _evaluate_offspring(self, generation: int, offspring: Population) -> dict[str, int]:
        rows = []
        existing = []
        # Rows exist already only when a run killed in this generation is resumed.
        recorded = {row.slot: row for row in self.store.individuals(generation)}
        for slot, ind in enumerate(offspring):
            recipe: Recipe = ind.get("recipe")
            row = recorded.get(slot)
            if row is not None and row.hash != recipe.hash:
                raise RunStoreError(
                    f"{self.store.run_dir}: generation {generation} slot {slot} was recorded "
                    f"as {row.hash[:12]} but the search now draws {recipe.short_hash}; "
                    "the run store does not match this version or config"
                )
            existing.append(row)
            if row is None:
                rows.append(
                    _individual_row(
                        generation, slot, recipe, ind.get("parent_ids"), ind.get("operators")
                    )
                )
        new_ids = iter(self.store.add_individuals(rows)) if rows else iter(())
        idents = [row.id if row is not None else next(new_ids) for row in existing]
        recipes: list[Recipe] = [ind.get("recipe") for ind in offspring]
        counts = {"evaluated": 0, "cache": 0, "run": 0, "failed": 0, "quick": 0}
        results: list[EvaluationResult | None] = [None] * len(offspring)
        # The front as this generation starts: every racing decision of the generation uses
        # it, whatever order evaluations finish in, so a resumed run decides the same.
        race = self._race_rule()

        def done(slot: int, result: EvaluationResult, source: str) -> None:
            results[slot] = result
            counts[source] = counts.get(source, 0) + 1
            counts["failed"] += not result.ok
            counts["quick"] += stage_of(result.metadata) == QUICK
            self.listener.evaluation_finished(generation, result, source)

        # Known results first (this run's store, an equal recipe, the cache), in slot order;
        # the rest go to the pool at once and are committed one by one as they finish.
        waiting: dict[str, list[int]] = {}  # recipe hash -> slots (a repeat waits for it)
        tasks = []
        for slot, (recipe, row) in enumerate(zip(recipes, existing, strict=True)):
            known = self._known_result(idents[slot], recipe, stored=row is not None, race=race)
            if known is not None:
                done(slot, *known)
            elif recipe.hash in waiting:
                waiting[recipe.hash].append(slot)
            else:
                waiting[recipe.hash] = [slot]
                tasks.append(Task(slot, recipe, self.space, race))
        for slot, fresh in self.pool.run(tasks):
            self._commit(idents[slot], recipes[slot], fresh)
            done(slot, fresh, "evaluated")
            for repeat in waiting[recipes[slot].hash][1:]:
                self.store.add_evaluation(idents[repeat], fresh, "run")
                done(repeat, fresh, "run")

        # Selection sees the results in offspring order, whichever finished first.
        F, G = [], []
        for ind, ident, recipe, result in zip(offspring, idents, recipes, results, strict=True):
            if result is None:
                raise EvaluationError(f"no result came back for {recipe.summary()}")
            ind.set("iid", ident)
            self._seen.add(recipe.hash)
            F.append(self._objectives(result))
            G.append(self._constraints(result))
        _set_fitness(offspring, np.array(F), np.array(G))
        return counts

    def _evaluate(
        self, ident: int, recipe: Recipe, space: SearchSpace, stored: bool
    ) -> tuple[EvaluationResult, str]:
        """One evaluation (the reference): a known result, else one task in the pool."""
        known = self._known_result(ident, recipe, stored)
        if known is not None:
            return known
        [(_, result)] = list(self.pool.run([Task(ident, recipe, space)]))
        self._commit(ident, recipe, result)
        return result, "evaluated"

    def _race_rule(self) -> RaceRule | None:
        """The racing rule of the next evaluations (None without racing): the run's front and
        the baseline reference when it is feasible, each with its accuracy's stderr."""
        if not self.fidelity.racing:
            return None
        members = []
        for ident in sorted(self._archive):
            row = self.store.evaluation(ident)
            meta = row.result.metadata if row is not None else {}
            members.append(RaceMember(tuple(map(float, self._archive[ident])), _stderr(meta)))
        ref = self.reference
        if ref is not None and ref.objectives is not None and np.all(self._constraints(ref) <= 0):
            F = tuple(map(float, to_minimization(ref.objectives)))
            members.append(RaceMember(F, _stderr(ref.metadata)))
        return RaceRule(self.fidelity.quick_limit, self.fidelity.z, tuple(members))

    def _known_result(
        self, ident: int, recipe: Recipe, stored: bool, race: RaceRule | None = None
    ) -> tuple[EvaluationResult, str] | None:
        """Stored evaluation of this individual (``stored``: its row predates this process) >
        same recipe earlier in this run > fitness cache; None when it must be evaluated.
        Every new row is committed at once. With racing, a cached quick result serves only
        when ``race`` stops it too (a full one serves either way)."""
        if stored:
            row = self.store.evaluation(ident)
            retry = self.retry_failed and row is not None and row.result.status == "failed"
            if row is not None and not retry:
                self._results.setdefault(recipe.hash, row.result)
                return row.result, "run"
        earlier = self._results.get(recipe.hash)
        if earlier is not None:
            self.store.add_evaluation(ident, earlier, "run")
            return earlier, "run"
        if self.cache is not None:
            result = self.cache.get(recipe, self.fingerprint, self.limits)
            if result is None and race is not None and self.quick_fingerprint is not None:
                quick = self.cache.get(recipe, self.quick_fingerprint, self.limits)
                if (
                    quick is not None
                    and quick.ok
                    and race.stop(quick.objectives or {}, quick.metadata)
                ):
                    result = quick
            if result is not None:
                self.store.add_evaluation(ident, result, "cache")
                self._results[recipe.hash] = result
                return result, "cache"
        return None

    def _commit(self, ident: int, recipe: Recipe, result: EvaluationResult) -> None:
        """A fresh result into the run store and the cache, the moment it arrives."""
        self.store.add_evaluation(ident, result, "evaluated")
        if self.cache is not None:
            quick = stage_of(result.metadata) == QUICK and self.quick_fingerprint is not None
            key = self.quick_fingerprint if quick else self.fingerprint
            self.cache.put(recipe, key or self.fingerprint, result, self.limits)
        self._results[recipe.hash] = result

    def _objectives(self, result: EvaluationResult) -> np.ndarray:
        if not result.ok or result.objectives is None:
            return np.full(len(OBJECTIVES), _PLACEHOLDER_F)
        return to_minimization(result.objectives)

    def _constraints(self, result: EvaluationResult) -> np.ndarray:
        """<= 0 is satisfied. Limits are relative (violation / limit) so none dominates."""
        g = np.zeros(1 + len(self._constraint_names))
        if not result.ok or result.objectives is None:
            g[0] = failure_violation(result)
            return g
        objectives = result.objectives
        limits = self.config.constraints.active()
        for i, name in enumerate(self._constraint_names, start=1):
            limit = limits[name]
            if name == "max_accuracy_drop":
                assert self.reference is not None and self.reference.objectives is not None
                drop = self.reference.objectives["accuracy"] - objectives["accuracy"]
                g[i] = drop - limit
            else:
                objective = name[len("max_") :].rsplit("_", 1)[0]  # max_latency_ms -> latency
                g[i] = (objectives[objective] - limit) / limit
        return g

    # ------------------------------------------------------------------ the front
    def _update_archive(self, offspring: Population | None) -> None:
        """The run's front: feasible recipes no evaluated recipe dominates, over every
        generation (not just the survivors, which truncation may thin out)."""
        candidates = dict(self._archive)
        for ind in offspring if offspring is not None else []:
            if ind.get("CV")[0] <= 0:
                candidates[int(ind.get("iid"))] = np.asarray(ind.get("F"), dtype=float)
        if not candidates:
            self._archive = {}
            return
        ids = sorted(candidates)
        F = np.array([candidates[i] for i in ids])
        first = NonDominatedSorting().do(F, only_non_dominated_front=True)
        self._archive = {ids[int(i)]: F[int(i)] for i in sorted(first)}

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(
        self, algorithm: Any, generation: int, counts: dict[str, int], started: float
    ) -> GenerationStats:
        pop = algorithm.pop
        self._update_archive(algorithm.off)
        self._update_box()
        front_F = np.array([self._archive[i] for i in sorted(self._archive)])
        stats = GenerationStats(
            generation=generation,
            offspring=len(algorithm.off) if algorithm.off is not None else 0,
            evaluated=counts.get("evaluated", 0),
            cache_hits=counts.get("cache", 0),
            reused=counts.get("run", 0),
            failed=counts.get("failed", 0),
            quick=counts.get("quick", 0),
            front_size=len(self._archive),
            hypervolume=self.box.hypervolume(front_F) if self._archive else 0.0,
            evaluations_total=self.store.count_evaluations(min_generation=0),
            seconds=0.0,
        )
        self._credit(algorithm.off, generation, stats.hypervolume)
        population = []
        for ind in pop:
            entry: dict[str, Any] = {"id": int(ind.get("iid")), "cv": _enc(ind.get("CV")[0])}
            for key in _POP_ATTRIBUTES:
                value = ind.get(key)
                if value is not None:
                    entry[key] = _enc(value)
            population.append(entry)
        state = {
            "rng": _rng_state_to_data(algorithm.random_state),
            "n_iter": int(algorithm.n_iter),
            "survival": _survival_state(algorithm),
            "archive": sorted(self._archive),
        }
        operator_state: dict[str, Any] = {
            "crossover": [op.state_dict() for op in self.crossovers],
            "mutation": [op.state_dict() for op in self.mutations],
            "selectors": {kind: sel.state_dict() for kind, sel in self.selectors.items()},
        }
        if self.session is not None:
            operator_state["llm"] = self.session.state_dict()
        # The generation's time covers everything but the checkpoint's own commit.
        stats = replace(stats, seconds=round(time.perf_counter() - started, 4))
        self.store.save_checkpoint(
            Checkpoint(
                generation,
                population,
                state,
                operator_state,
                asdict(stats) | {"hv_box": self.box.to_data()},
            )
        )
        return stats

    def _credit(self, offspring: Population | None, generation: int, hv_total: float) -> None:
        """Credit each child's operators: it dominates a parent, it entered the front, the
        share of the front's hypervolume only it covers. The reward, (dominated + entered) / 2
        + share, feeds adaptive operator selection; an operator that fell back earns 0."""
        rows = []
        # The hypervolume share costs one hypervolume per child on the front; it is worked
        # out only when a selector has a choice to learn (recorded as null otherwise).
        with_share = any(len(s) > 1 and s.method != "fixed" for s in self.selectors.values())
        front_ids = sorted(self._archive)
        # Exclusive contributions in the box of this generation: computed from the front and
        # the reference alone, so a resumed run credits exactly as the uninterrupted one.
        exclusive: dict[int, float] = {}
        if with_share and front_ids and hv_total > 0:
            front_F = np.array([self._archive[i] for i in front_ids])
            exclusive = dict(zip(front_ids, self.box.contributions(front_F).tolist(), strict=True))
        for ind in offspring if offspring is not None else []:
            credited = ind.get("credited")
            if credited is None:  # the first generation: no operator made it
                continue
            ident = int(ind.get("iid"))
            mine = _fitness(ind)
            feasible = mine[1] <= 0
            dominated = feasible and any(_dominates(mine, p) for p in ind.get("parent_fitness"))
            entered = ident in self._archive
            contribution: float | None = None
            share = 0.0
            if with_share:
                contribution = 0.0
                if entered and ident in exclusive:
                    contribution = max(exclusive[ident], 0.0)
                    share = contribution / hv_total
            reward = (float(dominated) + float(entered)) / 2 + share
            for kind, index, fell_back in credited:
                self.selectors[kind].credit(index, 0.0 if fell_back else reward)
            rows.append(
                {
                    "individual_id": ident,
                    "generation": generation,
                    "operators": [
                        ("fallback:" if fell_back else "") + self._operators(kind)[index].label
                        for kind, index, fell_back in credited
                    ],
                    "feasible": int(feasible),
                    "dominated_parent": int(dominated),
                    "entered_front": int(entered),
                    "hv_contribution": contribution,
                    "reward": reward,
                }
            )
        for selector in self.selectors.values():
            selector.update()
        if rows:
            self.store.add_credits(rows)

    def _operators(self, kind: str) -> Sequence[Operator]:
        return self.crossovers if kind == "crossover" else self.mutations

    def _restore(self, algorithm: Any, checkpoint: Checkpoint) -> None:
        ids = [entry["id"] for entry in checkpoint.population]
        recipes, F, G = [], [], []
        for ident in ids:
            row = self.store.individual(ident)
            evaluation = self.store.evaluation(ident)
            if evaluation is None:
                raise RunStoreError(
                    f"{self.store.run_dir}: checkpoint {checkpoint.generation} names individual "
                    f"{ident}, which has no evaluation; the run store is damaged"
                )
            recipe = Recipe(row.recipe)
            result = evaluation.result
            if self.retry_failed and result.status == "failed":
                result, _ = self._evaluate(ident, recipe, self.space, stored=True)
            recipes.append(recipe)
            self._results.setdefault(recipe.hash, result)
            F.append(self._objectives(result))
            G.append(self._constraints(result))
        pop = Population.new("X", np.array([[r.hash] for r in recipes], dtype=object))
        _set_fitness(pop, np.array(F), np.array(G))
        for ind, recipe, entry in zip(pop, recipes, checkpoint.population, strict=True):
            ind.set("recipe", recipe)
            ind.set("iid", entry["id"])
            for key in _POP_ATTRIBUTES:
                if key in entry:
                    ind.set(key, _dec(entry[key]))
        state = checkpoint.algorithm_state
        algorithm.pop = pop
        algorithm.is_initialized = True
        algorithm.n_iter = state["n_iter"]
        try:
            algorithm.random_state.bit_generator.state = _rng_state_from_data(state["rng"])
            _restore_survival_state(algorithm, state.get("survival") or {})
            if _ranking_is_stale(pop, checkpoint.population):
                # A failure evaluated again (--retry-failed, now or in a resume that stopped) is
                # feasible now, but pymoo ranks feasible individuals only: the checkpoint has no
                # rank or crowding for it and the others' are out of date. Rank them again.
                algorithm.pop = algorithm.survival.do(
                    algorithm.problem,
                    pop,
                    n_survive=len(pop),
                    algorithm=algorithm,
                    random_state=algorithm.random_state,
                )
            for ops, saved in (
                (self.crossovers, checkpoint.operator_state.get("crossover", [])),
                (self.mutations, checkpoint.operator_state.get("mutation", [])),
            ):
                for op, op_state in zip(ops, saved, strict=False):
                    op.load_state_dict(op_state)
            for kind, selector_state in checkpoint.operator_state.get("selectors", {}).items():
                if kind in self.selectors:
                    self.selectors[kind].load_state_dict(selector_state)
            if self.session is not None and "llm" in checkpoint.operator_state:
                self.session.load_state_dict(checkpoint.operator_state["llm"])
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
            # The rows are well-formed JSON of the right shape, but what they hold cannot
            # be the state this version saved.
            raise RunStoreError(
                f"run store {self.store.run_dir}: checkpoint of generation "
                f"{checkpoint.generation} is damaged: its algorithm or operator state cannot "
                f"be restored ({type(exc).__name__}: {exc})"
            ) from None
        self._seen = self.store.hashes_up_to(checkpoint.generation)
        if self.retry_failed:
            # Failed recipes outside the population may be drawn (and evaluated) again.
            self._seen -= self.store.failed_hashes()
        self._archive = {}
        for ident in state.get("archive", []):
            evaluation = self.store.evaluation(ident)
            if evaluation is None or evaluation.result.objectives is None:
                raise RunStoreError(
                    f"{self.store.run_dir}: checkpoint {checkpoint.generation}'s front names "
                    f"individual {ident} without a successful evaluation; the store is damaged"
                )
            self._archive[ident] = to_minimization(evaluation.result.objectives)

    # ------------------------------------------------------------------ hypervolume
    def _update_box(self) -> None:
        """The box of this moment: the front's and the baseline reference's ideal and nadir,
        with the corners the config's `hypervolume` section fixes."""
        front = np.array([self._archive[i] for i in sorted(self._archive)]).reshape(
            -1, len(OBJECTIVES)
        )
        reference = None
        if self.reference is not None and self.reference.objectives is not None:
            reference = to_minimization(self.reference.objectives)
        self.box = run_box(front, reference, self.config.hypervolume)

    def hypervolume(self, F: np.ndarray) -> float:
        """Hypervolume of minimisation-space points in the box of the last completed
        generation (``runs.hypervolume.Box``: normalised to [0, 1], reference point 1.1)."""
        return self.box.hypervolume(F)


# ---------------------------------------------------------------------- pymoo adapters
class _RecipeProblem(Problem):
    """Five objectives, constraints; X holds recipe hashes. Evaluation happens outside pymoo."""

    def __init__(self, n_constraints: int) -> None:
        super().__init__(n_var=1, n_obj=len(OBJECTIVES), n_ieq_constr=n_constraints, vtype=object)


class _Seeding(Sampling):
    """The first generation: the seed portfolio plus random draws (see ``initial_recipes``)."""

    def __init__(self, search: Search) -> None:
        super().__init__()
        self.search = search

    def _do(
        self, problem: Any, n_samples: int, *args: Any, random_state: Any = None, **kwargs: Any
    ) -> Any:
        chosen = self.search.initial_recipes(random_state)
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


class _Mating:
    """Replaces pymoo's Mating: tournament selection from pymoo, variation by our operators."""

    def __init__(self, search: Search, selection: TournamentSelection) -> None:
        self.search = search
        self.selection = selection

    def do(
        self,
        problem: Any,
        pop: Population,
        n_offsprings: int,
        algorithm: Any = None,
        **kwargs: Any,
    ) -> Population:
        children = self.search.breed(pop, n_offsprings, self.selection, algorithm)
        off = Population.new(
            "X", np.array([[c.recipe.hash] for c in children], dtype=object).reshape(-1, 1)
        )
        for ind, child in zip(off, children, strict=True):
            ind.set("recipe", child.recipe)
            ind.set("parent_ids", child.parents)
            ind.set("operators", child.operators)
            ind.set("credited", child.credited)
            ind.set("parent_fitness", child.parent_fitness)
        return off


@dataclass(frozen=True)
class _Child:
    """An offspring: its recipe, parents (ids), operators as recorded, the selector draws to
    credit (kind, index, fell back) and the parents' (F, CV) to compare it with."""

    recipe: Recipe
    parents: tuple[int, ...]
    operators: tuple[str, ...]
    credited: tuple[tuple[str, int, bool], ...]
    parent_fitness: tuple[tuple[np.ndarray, float], ...]


@dataclass(frozen=True)
class _Pending:
    """A child a remote (LLM) operator has been asked for; ``finish`` gives it."""

    op: Operator
    job: Any
    parents: tuple[int, ...]
    kind: str
    index: int
    parent_fitness: tuple[tuple[np.ndarray, float], ...]


# ---------------------------------------------------------------------- helpers
def _run_concurrently(tasks: Sequence[Any], limit: int) -> None:
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


def _stderr(metadata: dict[str, Any]) -> float:
    value = metadata.get(STDERR_KEY)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return max(0.0, float(value))
    return 0.0


def _fitness(ind: Any) -> tuple[np.ndarray, float]:
    return np.asarray(ind.get("F"), dtype=float), float(ind.get("CV")[0])


def _dominates(a: tuple[np.ndarray, float], b: tuple[np.ndarray, float]) -> bool:
    """Constrained domination (Deb): feasible beats infeasible, less violation beats more,
    among feasible ones Pareto dominance."""
    (fa, cva), (fb, cvb) = a, b
    if cva > 0 or cvb > 0:
        return cva < cvb
    return bool(np.all(fa <= fb) and np.any(fa < fb))


def _ranking_is_stale(pop: Population, saved: Sequence[dict[str, Any]]) -> bool:
    """Whether a restored population's constraint values differ from its checkpoint's, or a
    feasible member has no rank: its survival ranks no longer describe it."""
    for ind, entry in zip(pop, saved, strict=True):
        cv = float(ind.get("CV")[0])
        if "cv" in entry and cv != _dec(entry["cv"]):
            return True
        if cv <= 0 and ind.get("rank") is None:
            return True
    return False


def _set_fitness(pop: Population, F: np.ndarray, G: np.ndarray) -> None:
    F = F.reshape(len(pop), len(OBJECTIVES))
    G = G.reshape(len(pop), -1)
    cv = np.maximum(G, 0.0).sum(axis=1)
    pop.set("F", F, "G", G, "H", np.zeros((len(pop), 0)), "CV", cv[:, None])
    for ind in pop:
        ind.evaluated = {"F", "G", "H", "CV"}


def _individual_row(
    generation: int, slot: int, recipe: Recipe, parents: Sequence[int], operators: Sequence[str]
) -> dict[str, Any]:
    return {
        "generation": generation,
        "slot": slot,
        "hash": recipe.hash,
        "recipe": recipe.canonical_json(),
        "parents": [int(p) for p in parents],
        "operators": list(operators),
    }


def _reference_directions(pop_size: int, partitions: int | None) -> np.ndarray:
    if partitions is None:
        partitions = 1
        while math.comb(partitions + 1 + len(OBJECTIVES) - 1, len(OBJECTIVES) - 1) <= pop_size:
            partitions += 1
    return get_reference_directions("das-dennis", len(OBJECTIVES), n_partitions=partitions)


def _enc(value: Any) -> Any:
    """JSON has no inf/nan: keep them as strings so checkpoints stay standard JSON."""
    if isinstance(value, (np.integer, int)) and not isinstance(value, bool):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else repr(value)


def _dec(value: Any) -> Any:
    return float(value) if isinstance(value, str) else value


def _rng_state_to_data(rng: np.random.Generator) -> dict[str, Any]:
    # PCG64's 128-bit integers exceed what jq and JavaScript read exactly: keep them as text.
    return _ints_to_text(rng.bit_generator.state)


def _rng_state_from_data(data: dict[str, Any]) -> dict[str, Any]:
    return _text_to_ints(data)


def _ints_to_text(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _ints_to_text(v) for k, v in obj.items()}
    if isinstance(obj, int) and not isinstance(obj, bool):
        return {"int": str(obj)}
    return obj


def _text_to_ints(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"int"}:
            return int(obj["int"])
        return {k: _text_to_ints(v) for k, v in obj.items()}
    return obj


def _survival_state(algorithm: Any) -> dict[str, Any]:
    """NSGA-III's normalisation remembers ideal, worst and extreme points across generations."""
    norm = getattr(algorithm.survival, "norm", None)
    if norm is None:
        return {}
    state = {}
    for key in ("ideal_point", "worst_point", "nadir_point", "extreme_points"):
        value = getattr(norm, key, None)
        state[key] = None if value is None else np.vectorize(_enc, otypes=[object])(value).tolist()
    return state


def _restore_survival_state(algorithm: Any, state: dict[str, Any]) -> None:
    norm = getattr(algorithm.survival, "norm", None)
    if norm is None:
        return
    for key, value in state.items():
        if value is not None:
            setattr(norm, key, np.vectorize(_dec, otypes=[float])(np.array(value, dtype=object)))
