"""The search loop: pymoo's NSGA-II / NSGA-III driven through ask/tell.

pymoo owns ranking, crowding / reference-direction survival and tournament selection. The
loop runs the generations with collaborators it is given (built by ``evo_compress.app``):
seeding (``seeding.py``), breeding (``mating.py``), the known-result chain
(``evaluation.py``), the front and its hypervolume box (``archive.py``), operator credit
(``credit.py``) and a plain-data checkpoint after every generation (``codec.py``) from which
``resume`` continues bit for bit.

Only pymoo is used, not DEAP: pymoo ships NSGA-III's reference directions and normalisation,
moocore's fast hypervolume, and an ask/tell interface whose state (population attributes,
one numpy Generator, NSGA-III's ideal/nadir points) can be saved as plain data.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2, binary_tournament
from pymoo.algorithms.moo.nsga3 import NSGA3, comp_by_cv_then_random
from pymoo.core.duplicate import NoDuplicateElimination
from pymoo.core.population import Population
from pymoo.core.termination import NoTermination
from pymoo.operators.selection.tournament import TournamentSelection
from pymoo.util.ref_dirs import get_reference_directions

from evo_compress.config import PopulationConfig
from evo_compress.engine import codec
from evo_compress.engine.archive import Archive
from evo_compress.engine.credit import credit
from evo_compress.engine.evaluation import EvaluationChain
from evo_compress.engine.mating import Mating
from evo_compress.engine.problem import Constraints, RecipeProblem, objectives_of, set_fitness
from evo_compress.engine.seeding import Seeding
from evo_compress.exceptions import RunStoreError
from evo_compress.fitness import EvaluationResult, Evaluator, FitnessCache
from evo_compress.fitness.pool import EvaluationPool, WorkerPlan
from evo_compress.genomes import Recipe, SearchSpace
from evo_compress.objectives import OBJECTIVES, task_scores
from evo_compress.operators import (
    AdaptiveSelector,
    Crossover,
    Measured,
    Mutation,
    VariationContext,
)
from evo_compress.progress import GenerationStats, ProgressListener
from evo_compress.runs.store import Checkpoint, RunStore
from evo_compress.surrogate import History, Screening

if TYPE_CHECKING:
    from evo_compress.agents.session import AgentSession
    from evo_compress.operators.llm import LLMSeeder


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
        self.constraints = Constraints(config.constraints)
        self.archive = Archive(config.hypervolume)
        self.evaluations = EvaluationChain(
            store,
            evaluator,
            cache,
            pool,
            config.fidelity,
            self.constraints,
            listener,
            retry_failed,
        )
        self.reference: EvaluationResult | None = None
        self._measured: dict[int, Measured] = {}
        self._seen: set[str] = set()
        self._generation = 0
        self.completed_generations = 0
        # Surrogate pre-screening; a remote (LLM) operator's request proposes several
        # candidates then, so screening costs no extra request per candidate (mating.py).
        surrogate = config.search.surrogate
        self.screening: Screening | None = (
            Screening(space, surrogate.exploration) if surrogate.enabled else None
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
        problem = RecipeProblem(len(self.constraints))
        algorithm = self._algorithm()
        algorithm.setup(problem, seed=self.config.search.seed, termination=NoTermination())
        self.listener.search_started(self)
        if self.plan.backend != "local" or (self.plan.workers or 1) > 1:
            self.listener.message(f"evaluating in parallel: {self.plan.note}")
        self.evaluator.prepare()
        base_space = SearchSpace.from_data(self.store.get_meta("base_space"))
        self.reference = self.evaluations.reference(base_space, self.constraints.needs_reference)
        self.constraints.reference = self.reference

        checkpoint = self.store.last_checkpoint(on_damage=self.listener.message)
        generation = 0
        if checkpoint is not None:
            self._restore(algorithm, checkpoint)
            generation = checkpoint.generation + 1
        self.archive.update_box(self.reference)
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
            # The front as this generation starts: every racing decision of the generation
            # uses it, whatever order evaluations finish in, so a resumed run decides the same.
            race = self.evaluations.race_rule(self.archive, self.reference)
            counts = self.evaluations.evaluate_offspring(
                generation, offspring, self.space, race, self._seen
            )
            algorithm.tell(infills=offspring)
            stats = self._checkpoint(algorithm, generation, counts, started)
            history.append(stats)
            self.listener.generation_finished(stats)
            generation += 1
            self.completed_generations = generation
        return history

    def hypervolume(self, F: np.ndarray) -> float:
        """Hypervolume of minimisation-space points in the box of the last completed
        generation (``runs.hypervolume.Box``: normalised to [0, 1], reference point 1.1)."""
        return self.archive.hypervolume(F)

    def _algorithm(self) -> NSGA2 | NSGA3:
        search = self.config.search
        common: dict[str, Any] = {
            "pop_size": search.population_size,
            "n_offsprings": search.offspring_size or search.population_size,
            "sampling": Seeding(
                search,
                self.space,
                self.store,
                self.seeder,
                self.variation_context,
                self.listener,
            ),
            "eliminate_duplicates": NoDuplicateElimination(),
            "output": None,
        }
        if search.algorithm == "nsga3":
            selection = TournamentSelection(func_comp=comp_by_cv_then_random)
            return NSGA3(
                ref_dirs=_reference_directions(search.population_size, search.nsga3_partitions),
                mating=self._mating(selection),
                **common,
            )
        selection = TournamentSelection(func_comp=binary_tournament)
        return NSGA2(mating=self._mating(selection), **common)

    def _mating(self, selection: TournamentSelection) -> Mating:
        return Mating(
            selection,
            self.config,
            self.space,
            self.crossovers,
            self.mutations,
            self.selectors,
            self,
            self.listener,
            self.session,
            self.screening,
        )

    # ------------------------------------------------------------------ what breeding reads
    @property
    def generation(self) -> int:
        return self._generation

    @property
    def seen(self) -> set[str]:
        """Recipe hashes this run has evaluated."""
        return self._seen

    def variation_context(self, generation: int) -> VariationContext:
        reference = self.reference.objectives if self.reference is not None else None
        scores = task_scores(self.reference.metadata) if self.reference is not None else {}
        return VariationContext(
            space=self.space,
            generation=generation,
            constraints=dict(self.config.constraints.active()),
            reference=dict(reference) if reference else None,
            reference_tasks=scores or None,
            front=tuple(self._measure_id(i) for i in self.archive.ids()),
            model=self.config.model.id,
            hardware=self.config.hardware.model_dump(mode="json"),
            seen=frozenset(self._seen),
        )

    def measure(self, ind: Any) -> Measured:
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
        g = self.constraints.of(result)
        violations = (
            {name: float(g[i]) for i, name in enumerate(self.constraints.names, start=1)}
            if result.ok
            else {}
        )
        measured = Measured(
            ident, recipe, result.status, result.objectives, violations, result.reason
        )
        self._measured[ident] = measured
        return measured

    def screening_history(self) -> History:
        """Every distinct recipe this run evaluated before this generation (the baseline
        reference included), in the order they were recorded. A generation cut short by a
        crash is left out, so a resumed run breeds from the history the uninterrupted run had
        and makes the same choice. Read from the store once per generation, kept in memory."""
        rows = self._history
        for generation in range(self._history_next, self._generation):
            for row, evaluation in self.store.evaluated_individuals(generation):
                if evaluation is None or row.hash in rows:
                    continue
                result = evaluation.result
                rows[row.hash] = (
                    Recipe(row.recipe),
                    objectives_of(result),
                    self.constraints.of(result)[1:],
                    not result.ok or result.objectives is None,
                )
        self._history_next = max(self._history_next, self._generation)
        values = list(rows.values())
        return History(
            [v[0] for v in values],
            np.array([v[1] for v in values]).reshape(len(values), len(OBJECTIVES)),
            np.array([v[2] for v in values]).reshape(len(values), len(self.constraints.names)),
            np.array([v[3] for v in values], dtype=bool),
        )

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(
        self, algorithm: Any, generation: int, counts: dict[str, int], started: float
    ) -> GenerationStats:
        self.archive.update(algorithm.off)
        self.archive.update_box(self.reference)
        stats = GenerationStats(
            generation=generation,
            offspring=len(algorithm.off) if algorithm.off is not None else 0,
            evaluated=counts.get("evaluated", 0),
            cache_hits=counts.get("cache", 0),
            reused=counts.get("run", 0),
            failed=counts.get("failed", 0),
            quick=counts.get("quick", 0),
            front_size=len(self.archive),
            hypervolume=self.archive.hypervolume(),
            evaluations_total=self.store.count_evaluations(min_generation=0),
            seconds=0.0,
        )
        rows = credit(
            algorithm.off,
            generation,
            stats.hypervolume,
            self.archive,
            self.selectors,
            {"crossover": self.crossovers, "mutation": self.mutations},
        )
        if rows:
            self.store.add_credits(rows)
        state = {
            "rng": codec.rng_state_to_data(algorithm.random_state),
            "n_iter": int(algorithm.n_iter),
            "survival": codec.survival_state(algorithm),
            "archive": self.archive.ids(),
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
                codec.encode_population(algorithm.pop),
                state,
                operator_state,
                asdict(stats) | {"hv_box": self.archive.box.to_data()},
            )
        )
        return stats

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
                result, _ = self.evaluations.evaluate(ident, recipe, self.space, stored=True)
            recipes.append(recipe)
            self.evaluations.results.setdefault(recipe.hash, result)
            F.append(objectives_of(result))
            G.append(self.constraints.of(result))
        pop = Population.new("X", np.array([[r.hash] for r in recipes], dtype=object))
        set_fitness(pop, np.array(F), np.array(G))
        for ind, recipe, entry in zip(pop, recipes, checkpoint.population, strict=True):
            ind.set("recipe", recipe)
            ind.set("iid", entry["id"])
        codec.decode_attributes(pop, checkpoint.population)
        state = checkpoint.algorithm_state
        algorithm.pop = pop
        algorithm.is_initialized = True
        algorithm.n_iter = state["n_iter"]
        try:
            algorithm.random_state.bit_generator.state = codec.rng_state_from_data(state["rng"])
            codec.restore_survival_state(algorithm, state.get("survival") or {})
            if codec.ranking_is_stale(pop, checkpoint.population):
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
        self.archive.restore(state.get("archive", []), self.store, checkpoint.generation)


def _reference_directions(pop_size: int, partitions: int | None) -> np.ndarray:
    if partitions is None:
        partitions = 1
        while math.comb(partitions + 1 + len(OBJECTIVES) - 1, len(OBJECTIVES) - 1) <= pop_size:
            partitions += 1
    return get_reference_directions("das-dennis", len(OBJECTIVES), n_partitions=partitions)
