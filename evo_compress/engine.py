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

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pymoo.algorithms.moo.nsga2 import NSGA2, binary_tournament
from pymoo.algorithms.moo.nsga3 import NSGA3, comp_by_cv_then_random
from pymoo.core.duplicate import NoDuplicateElimination
from pymoo.core.population import Population
from pymoo.core.problem import Problem
from pymoo.core.sampling import Sampling
from pymoo.core.termination import NoTermination
from pymoo.indicators.hv import HV
from pymoo.operators.selection.tournament import TournamentSelection
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting
from pymoo.util.ref_dirs import get_reference_directions

from evo_compress import __version__
from evo_compress.config import PopulationConfig, build_space, parse_config
from evo_compress.exceptions import EvaluationError, RunStoreError
from evo_compress.fitness import (
    EvaluationContext,
    EvaluationResult,
    Evaluator,
    FitnessCache,
    make_evaluator,
)
from evo_compress.genomes import Recipe, SearchSpace, builtin_portfolios, load_portfolio
from evo_compress.objectives import OBJECTIVE_NAMES, OBJECTIVES, to_minimization
from evo_compress.operators import Crossover, Mutation, make_crossover, make_mutation
from evo_compress.progress import GenerationStats, ProgressListener
from evo_compress.runs.store import Checkpoint, RunStore

# A failed or infeasible evaluation gets this constraint violation (it loses every
# comparison) and placeholder objectives pymoo never reads: survival ranks infeasible
# individuals by violation alone. Neither number is ever reported.
FAILURE_VIOLATION = 1e3
_PLACEHOLDER_F = 1e12
_POP_ATTRIBUTES = ("rank", "crowding", "niche", "dist_to_niche")
HV_SCALE_FACTOR = 10.0  # hypervolume box: up to 10x the baseline's latency, memory, ...


def default_run_dir(config: PopulationConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = config.output.runs_root / f"{stamp}-{config.name}"
    suffix = 2
    while path.exists():  # two runs started in the same second
        path = config.output.runs_root / f"{stamp}-{config.name}-{suffix}"
        suffix += 1
    return path


def default_cache_path(config: PopulationConfig) -> Path:
    return config.output.runs_root / ".cache" / "fitness.sqlite"


class Search:
    """One run of the search over one run directory. Build with ``start`` or ``resume``."""

    def __init__(
        self,
        config: PopulationConfig,
        store: RunStore,
        space: SearchSpace,
        evaluator: Evaluator,
        cache: FitnessCache | None,
        target_generations: int,
        listener: ProgressListener | None = None,
        retry_failed: bool = False,
    ) -> None:
        self.config = config
        self.store = store
        self.space = space
        self.evaluator = evaluator
        self.cache = cache
        self.target_generations = target_generations
        self.retry_failed = retry_failed
        self.listener = listener or ProgressListener()
        self.fingerprint = evaluator.fingerprint()
        ops = config.search.operators
        self.crossovers: list[Crossover] = [
            make_crossover(s.name, space, s.params, f"search.operators.crossover[{i}]")
            for i, s in enumerate(ops.crossover)
        ]
        self.mutations: list[Mutation] = [
            make_mutation(s.name, space, s.params, f"search.operators.mutation[{i}]")
            for i, s in enumerate(ops.mutation)
        ]
        self._crossover_p = _weights([s.weight for s in ops.crossover])
        self._mutation_p = _weights([s.weight for s in ops.mutation])
        self.reference: EvaluationResult | None = None
        self._seen: set[str] = set()
        # Results of this run by recipe hash: a repeated recipe (the baseline reference in
        # generation 0, say) re-uses its result instead of a store query per evaluation.
        self._results: dict[str, EvaluationResult] = {}
        self._archive: dict[int, np.ndarray] = {}  # the run's front: id -> minimisation F
        self._constraint_names = list(config.constraints.active())
        self.completed_generations = 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def start(
        cls,
        config: PopulationConfig,
        run_dir: Path | None = None,
        listener: ProgressListener | None = None,
    ) -> Search:
        full_space = build_space(config)
        evaluator = make_config_evaluator(config)
        # Search only what the back end can apply: no evaluation is spent on a recipe that
        # would come back infeasible.
        space = evaluator.restrict_space(full_space)
        seeds = []
        for recipe in load_portfolio(config.search.recipes, full_space):  # fail before a run dir
            reason = evaluator.infeasible_reason(recipe, full_space)
            if reason is None:
                seeds.append(space.recipe(recipe))
            elif listener is not None:
                listener.message(f"seed recipe {recipe.summary()} skipped: {reason}")
        # A model that cannot be found (or trained) fails here, before a run directory exists.
        evaluator.prepare()
        run_dir = Path(run_dir or config.output.run_dir or default_run_dir(config))
        cache_path = config.cache.path or default_cache_path(config)
        config = config.model_copy(
            update={
                "output": config.output.model_copy(update={"run_dir": run_dir.resolve()}),
                "cache": config.cache.model_copy(update={"path": Path(cache_path).resolve()}),
            }
        )
        store = RunStore.create(
            run_dir,
            config.to_yaml(),
            {
                "name": config.name,
                "tool_version": __version__,
                "space": space.to_data(),
                # The reference baseline's space, stored so resume needs no file the config
                # named (a relative path may not resolve from another directory).
                "base_space": SearchSpace.load(config.search.space.base).to_data(),
                # Likewise the seed recipes, in case a run killed in generation 0 resumes.
                "seed_recipes": [r.to_dict(nested=False) for r in seeds],
                "fingerprint": evaluator.fingerprint(),
                "generations_target": config.search.generations,
            },
        )
        store.lock()
        return cls(
            config,
            store,
            space,
            evaluator,
            _open_cache(config),
            config.search.generations,
            listener,
        )

    @classmethod
    def resume(
        cls,
        run_dir: Path,
        generations: int | None = None,
        cache: Path | bool | None = None,
        listener: ProgressListener | None = None,
        retry_failed: bool = False,
    ) -> Search:
        """Continue a run from its last checkpoint. ``generations`` sets a new total (to
        extend a finished run); ``cache`` is a path, False (no cache) or None (as stored);
        ``retry_failed`` evaluates failed recipes again instead of re-using the failure."""
        store = RunStore.open(run_dir)
        try:
            store.lock()
            config = parse_config(
                yaml.safe_load(store.get_meta("config")), f"{run_dir} config", check=False
            )
            space = SearchSpace.from_data(store.get_meta("space"))
            target = int(generations or store.get_meta("generations_target"))
            done = store.last_checkpoint()
            if done is not None and target < done.generation + 1:
                raise RunStoreError(
                    f"`--generations {target}` is fewer than the {done.generation + 1} "
                    "generations this run has completed"
                )
            if cache is not None:
                cache_cfg = config.cache.model_copy(
                    update={"enabled": cache is not False}
                    | ({"path": Path(cache).resolve()} if isinstance(cache, Path) else {})
                )
                config = config.model_copy(update={"cache": cache_cfg})
            store.set_meta({"generations_target": target})
            evaluator = make_config_evaluator(config)
            if evaluator.fingerprint() != store.get_meta("fingerprint"):
                raise RunStoreError(
                    f"{run_dir}: the evaluator's settings or environment differ from the ones "
                    "this run started with, so its results would not be comparable"
                )
        except BaseException:
            store.close()
            raise
        cache_obj = _open_cache(config)
        if retry_failed and cache_obj is not None:
            cache_obj.forget_failures(evaluator.fingerprint())
        return cls(
            config, store, space, evaluator, cache_obj, target, listener, retry_failed=retry_failed
        )

    def close(self) -> None:
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
        self.evaluator.prepare()
        self.reference = self._reference()
        self._hv_scales = self._hypervolume_scales()

        checkpoint = self.store.last_checkpoint()
        generation = 0
        if checkpoint is not None:
            self._restore(algorithm, checkpoint)
            generation = checkpoint.generation + 1
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
        for data in self.store.get_meta("seed_recipes")[:size]:
            recipe = Recipe(data)  # stored canonical, so no re-validation against a file
            chosen.append((recipe, label))
            hashes.add(recipe.hash)
        attempts = 0
        while len(chosen) < size and attempts < size * self.config.search.max_redraws:
            attempts += 1
            recipe = self.space.sample(rng)
            if recipe.hash not in hashes:
                chosen.append((recipe, "random"))
                hashes.add(recipe.hash)
        return chosen

    def make_offspring(
        self, pop: Population, n: int, selection: TournamentSelection, algorithm: Any
    ) -> list[tuple[Recipe, tuple[int, ...], tuple[str, ...]]]:
        """Select parents by tournament, vary them, and re-draw any child whose recipe the run
        has already seen. Returns fewer than ``n`` only when re-draws keep failing."""
        rng: np.random.Generator = algorithm.random_state
        ops = self.config.search.operators
        taken = set(self._seen)
        out = []

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

        # One tournament round for the whole generation (as pymoo's own mating does); a slot
        # whose child is a duplicate draws a fresh pair.
        pairs = select(n)
        for slot in range(n):
            for attempt in range(self.config.search.max_redraws):
                pair = pairs[slot] if attempt == 0 else select(1)[0]
                first, second = pop[int(pair[0])], pop[int(pair[1])]
                recipe: Recipe = first.get("recipe")
                parents: tuple[int, ...] = (int(first.get("iid")),)
                names: tuple[str, ...] = ()
                if rng.random() < ops.crossover_prob:
                    op = self.crossovers[_pick(rng, self._crossover_p)]
                    recipe = op.do([first.get("recipe"), second.get("recipe")], rng)
                    parents += (int(second.get("iid")),)
                    names += (op.name,)
                if rng.random() < ops.mutation_prob:
                    mut = self.mutations[_pick(rng, self._mutation_p)]
                    recipe = mut.do(recipe, rng)
                    names += (mut.name,)
                if recipe.hash not in taken:
                    taken.add(recipe.hash)
                    out.append((recipe, parents, names))
                    break
            else:
                break
        return out

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
        counts = {"evaluated": 0, "cache": 0, "run": 0, "failed": 0}
        F, G = [], []
        for ind, row in zip(offspring, existing, strict=True):
            ident = row.id if row is not None else next(new_ids)
            recipe = ind.get("recipe")
            result, source = self._evaluate(ident, recipe, self.space, stored=row is not None)
            counts[source] = counts.get(source, 0) + 1
            counts["failed"] += not result.ok
            self.listener.evaluation_finished(generation, result, source)
            ind.set("iid", ident)
            self._seen.add(recipe.hash)
            F.append(self._objectives(result))
            G.append(self._constraints(result))
        _set_fitness(offspring, np.array(F), np.array(G))
        return counts

    def _evaluate(
        self, ident: int, recipe: Recipe, space: SearchSpace, stored: bool
    ) -> tuple[EvaluationResult, str]:
        """Stored evaluation of this individual (``stored``: its row predates this process) >
        same recipe earlier in this run > fitness cache > a real evaluation. Every new row is
        committed at once."""
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
        result: EvaluationResult | None = None
        if self.cache is not None:
            result = self.cache.get(recipe, self.fingerprint)
            if result is not None:
                self.store.add_evaluation(ident, result, "cache")
                self._results[recipe.hash] = result
                return result, "cache"
        result = self.evaluator.evaluate(recipe, space)
        self.store.add_evaluation(ident, result, "evaluated")
        if self.cache is not None:
            self.cache.put(recipe, self.fingerprint, result)
        self._results[recipe.hash] = result
        return result, "evaluated"

    def _objectives(self, result: EvaluationResult) -> np.ndarray:
        if not result.ok or result.objectives is None:
            return np.full(len(OBJECTIVES), _PLACEHOLDER_F)
        return to_minimization(result.objectives)

    def _constraints(self, result: EvaluationResult) -> np.ndarray:
        """<= 0 is satisfied. Limits are relative (violation / limit) so none dominates."""
        g = np.zeros(1 + len(self._constraint_names))
        if not result.ok or result.objectives is None:
            g[0] = FAILURE_VIOLATION
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
        front_F = np.array([self._archive[i] for i in sorted(self._archive)])
        stats = GenerationStats(
            generation=generation,
            offspring=len(algorithm.off) if algorithm.off is not None else 0,
            evaluated=counts.get("evaluated", 0),
            cache_hits=counts.get("cache", 0),
            reused=counts.get("run", 0),
            failed=counts.get("failed", 0),
            front_size=len(self._archive),
            hypervolume=self.hypervolume(front_F) if self._archive else 0.0,
            evaluations_total=self.store.count_evaluations(min_generation=0),
            seconds=0.0,
        )
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
        operator_state = {
            "crossover": [op.state_dict() for op in self.crossovers],
            "mutation": [op.state_dict() for op in self.mutations],
        }
        # The generation's time covers everything but the checkpoint's own commit.
        stats = replace(stats, seconds=round(time.perf_counter() - started, 4))
        self.store.save_checkpoint(
            Checkpoint(generation, population, state, operator_state, asdict(stats))
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
                result, _ = self._evaluate(ident, recipe, self.space, stored=True)
            recipes.append(recipe)
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
        algorithm.random_state.bit_generator.state = _rng_state_from_data(state["rng"])
        _restore_survival_state(algorithm, state.get("survival") or {})
        for ops, saved in (
            (self.crossovers, checkpoint.operator_state.get("crossover", [])),
            (self.mutations, checkpoint.operator_state.get("mutation", [])),
        ):
            for op, op_state in zip(ops, saved, strict=False):
                op.load_state_dict(op_state)
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
    def _hypervolume_scales(self) -> list[float]:
        """Per-objective scale for the hypervolume, fixed for the run: ten times the baseline's
        latency, memory, energy and CO2 (accuracy is already 0..1). Stored so resume and
        reports use the same scale."""
        stored = self.store.get_meta("hv_scales", None)
        if stored is not None:
            return list(stored)
        scales = [1.0] * len(OBJECTIVES)
        if self.reference is not None and self.reference.ok and self.reference.objectives:
            for i, name in enumerate(OBJECTIVE_NAMES[1:], start=1):
                # Ten times, not twice: on a CPU a quantized model is often several times
                # slower than the float baseline, and the box must still hold it.
                scales[i] = HV_SCALE_FACTOR * max(self.reference.objectives[name], 1e-12)
        self.store.set_meta({"hv_scales": scales})
        return scales

    def hypervolume(self, F: np.ndarray) -> float:
        """Hypervolume of minimisation-space points in the unit box: accuracy as 1 - acc,
        the rest divided by their scale, reference point (1, 1, 1, 1, 1)."""
        F = np.atleast_2d(np.asarray(F, dtype=float))
        if F.size == 0:
            return 0.0
        norm = F.copy()
        norm[:, 0] = 1.0 + F[:, 0]  # F holds -accuracy
        norm[:, 1:] = F[:, 1:] / np.array(self._hv_scales[1:])
        inside = np.all(norm < 1.0, axis=1)
        if not inside.any():
            return 0.0
        return float(HV(ref_point=np.ones(F.shape[1]))(norm[inside]))


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
        children = self.search.make_offspring(pop, n_offsprings, self.selection, algorithm)
        off = Population.new(
            "X", np.array([[r.hash] for r, _, _ in children], dtype=object).reshape(-1, 1)
        )
        for ind, (recipe, parents, names) in zip(off, children, strict=True):
            ind.set("recipe", recipe)
            ind.set("parent_ids", parents)
            ind.set("operators", names)
        return off


# ---------------------------------------------------------------------- helpers
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


def _pick(rng: np.random.Generator, p: np.ndarray) -> int:
    """Index drawn with probabilities ``p``; a single choice consumes no randomness."""
    return 0 if len(p) == 1 else int(rng.choice(len(p), p=p))


def _weights(values: Sequence[float]) -> np.ndarray:
    w = np.array(values, dtype=float)
    return w / w.sum()


def _reference_directions(pop_size: int, partitions: int | None) -> np.ndarray:
    if partitions is None:
        partitions = 1
        while math.comb(partitions + 1 + len(OBJECTIVES) - 1, len(OBJECTIVES) - 1) <= pop_size:
            partitions += 1
    return get_reference_directions("das-dennis", len(OBJECTIVES), n_partitions=partitions)


def make_config_evaluator(config: PopulationConfig) -> Evaluator:
    """The evaluator a config names, with its model, hardware and carbon context."""
    context = EvaluationContext(config.model, config.hardware, config.carbon)
    return make_evaluator(config.evaluator.name, config.evaluator.settings, context)


def _open_cache(config: PopulationConfig) -> FitnessCache | None:
    if not config.cache.enabled:
        return None
    return FitnessCache(config.cache.path or default_cache_path(config))


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
