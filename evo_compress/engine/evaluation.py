"""The known-result chain: a recipe's result comes from this run's store, an equal recipe
earlier in the run, or the fitness cache, and only otherwise from the evaluation pool; every
fresh result is committed to the store and the cache the moment it arrives. With racing, the
front as a generation starts decides which recipes stop after the quick stage."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pymoo.core.population import Population

from evo_compress.config import FidelityConfig
from evo_compress.engine.archive import Archive
from evo_compress.engine.problem import Constraints, objectives_of, set_fitness
from evo_compress.exceptions import EvaluationError, RunStoreError
from evo_compress.fitness import EvaluationResult, Evaluator, FitnessCache
from evo_compress.fitness._base import with_failure_class
from evo_compress.fitness.noise import STDERR_KEY
from evo_compress.fitness.pool import EvaluationPool, Task
from evo_compress.fitness.racing import QUICK, RaceMember, RaceRule, stage_of
from evo_compress.genomes import Recipe, SearchSpace, render_recipe
from evo_compress.objectives import TASK_DROP_KEY, TASKS_KEY, task_scores, to_minimization
from evo_compress.progress import ProgressListener
from evo_compress.runs.store import RunStore


class EvaluationChain:
    """Results for the search: known ones first, the rest evaluated in ``pool``."""

    def __init__(
        self,
        store: RunStore,
        evaluator: Evaluator,
        cache: FitnessCache | None,
        pool: EvaluationPool,
        fidelity: FidelityConfig,
        constraints: Constraints,
        listener: ProgressListener,
        retry_failed: bool = False,
    ) -> None:
        self.store = store
        self.cache = cache
        self.pool = pool
        self.fidelity = fidelity
        self.constraints = constraints
        self.listener = listener
        self.retry_failed = retry_failed
        self.fingerprint = evaluator.cache_fingerprint()
        # Racing: quick results are cached under a key of their own, never served as full ones.
        self.quick_fingerprint = (
            evaluator.quick_fingerprint(fidelity.quick_limit) if fidelity.racing else None
        )
        # Left out of the fingerprint; a cached failure they may have caused is kept with them.
        self.limits = evaluator.limits()
        # Results of this run by recipe hash: a repeated recipe (the baseline reference in
        # generation 0, say) re-uses its result instead of a store query per evaluation.
        self.results: dict[str, EvaluationResult] = {}

    def reference(self, base_space: SearchSpace, needed: bool) -> EvaluationResult:
        """Evaluate (or load) the uncompressed baseline of the base space: the reference for
        `max_accuracy_drop` and `max_task_drop` (``needed``: a failure is an error, and so is
        a record without the score of a task of `max_task_drop`) and for the hypervolume's
        scale. Stored as generation -1."""
        base = base_space.baseline()
        row = self.store.individual_at(-1, 0)
        if row is None:
            [ident] = self.store.add_individuals([individual_row(-1, 0, base, (), ("reference",))])
        else:
            ident = row.id
        result, _ = self.evaluate(ident, base, base_space, stored=row is not None)
        if not needed:
            return result
        fields = [
            f"`constraints.{name}`"
            for name in ("max_accuracy_drop", TASK_DROP_KEY)
            if any(key.split(".", 1)[0] == name for key in self.constraints.names)
        ]
        if not result.ok:
            raise EvaluationError(
                f"the baseline recipe failed ({result.reason}); "
                f"{' and '.join(fields)} {'is' if len(fields) == 1 else 'are'} measured "
                "against it"
            )
        scores = task_scores(result.metadata)
        missing = [task for task in self.constraints.tasks if task not in scores]
        if missing:
            recorded = ", ".join(scores) or "none"
            raise EvaluationError(
                f"`constraints.{TASK_DROP_KEY}.{missing[0]}`: the baseline's record has no "
                f"score of task `{missing[0]}` (metadata.{TASKS_KEY}: {recorded}); the "
                f"{result.metadata.get('evaluator', 'configured')} evaluator may not record "
                "per-task scores"
            )
        return result

    def evaluate_offspring(
        self,
        generation: int,
        offspring: Population,
        space: SearchSpace,
        race: RaceRule | None,
        seen: set[str],
    ) -> dict[str, int]:
        """Record, evaluate and score a generation's ``offspring`` (their ``iid``, F, G);
        add their hashes to ``seen``. Returns the counts by where results came from."""
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
                    individual_row(
                        generation, slot, recipe, ind.get("parent_ids"), ind.get("operators")
                    )
                )
        new_ids = iter(self.store.add_individuals(rows)) if rows else iter(())
        idents = [row.id if row is not None else next(new_ids) for row in existing]
        # A screened generation's LLM child may sit in another slot than its request's.
        moved = [
            (ident, ind.get("request_slot"))
            for slot, (ident, ind) in enumerate(zip(idents, offspring, strict=True))
            if ind.get("request_slot") is not None and ind.get("request_slot") != slot
        ]
        self.store.set_request_slots(moved)
        recipes: list[Recipe] = [ind.get("recipe") for ind in offspring]
        counts = {"evaluated": 0, "cache": 0, "run": 0, "failed": 0, "quick": 0}
        results: list[EvaluationResult | None] = [None] * len(offspring)

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
            known = self.known_result(idents[slot], recipe, stored=row is not None, race=race)
            if known is not None:
                done(slot, *known)
            elif recipe.hash in waiting:
                waiting[recipe.hash].append(slot)
            else:
                waiting[recipe.hash] = [slot]
                tasks.append(Task(slot, recipe, space, race))
        # The back end's order (a vLLM server shared by neighbours), results still by slot.
        order = self.pool.evaluator.plan_batch([t.recipe for t in tasks], space)
        for slot, fresh in self.pool.run([tasks[i] for i in order]):
            self.commit(idents[slot], recipes[slot], fresh)
            done(slot, fresh, "evaluated")
            for repeat in waiting[recipes[slot].hash][1:]:
                self.store.add_evaluation(idents[repeat], fresh, "run")
                done(repeat, fresh, "run")

        # Selection sees the results in offspring order, whichever finished first.
        F, G = [], []
        for ind, ident, recipe, result in zip(offspring, idents, recipes, results, strict=True):
            if result is None:
                raise EvaluationError(f"no result came back for {render_recipe(recipe)}")
            ind.set("iid", ident)
            seen.add(recipe.hash)
            F.append(objectives_of(result))
            G.append(self.constraints.of(result))
        set_fitness(offspring, np.array(F), np.array(G))
        return counts

    def evaluate(
        self, ident: int, recipe: Recipe, space: SearchSpace, stored: bool
    ) -> tuple[EvaluationResult, str]:
        """One evaluation (the reference): a known result, else one task in the pool."""
        known = self.known_result(ident, recipe, stored)
        if known is not None:
            return known
        [(_, result)] = list(self.pool.run([Task(ident, recipe, space)]))
        self.commit(ident, recipe, result)
        return result, "evaluated"

    def race_rule(self, archive: Archive, reference: EvaluationResult | None) -> RaceRule | None:
        """The racing rule of the next evaluations (None without racing): the run's front and
        the baseline reference when it is feasible, each with its accuracy's stderr."""
        if not self.fidelity.racing:
            return None
        members = []
        for ident in archive.ids():
            row = self.store.evaluation(ident)
            meta = row.result.metadata if row is not None else {}
            members.append(RaceMember(tuple(map(float, archive.front[ident])), _stderr(meta)))
        ref = reference
        feasible = ref is not None and np.all(self.constraints.of(ref) <= 0)
        if ref is not None and ref.objectives is not None and feasible:
            F = tuple(map(float, to_minimization(ref.objectives)))
            members.append(RaceMember(F, _stderr(ref.metadata)))
        return RaceRule(self.fidelity.quick_limit, self.fidelity.z, tuple(members))

    def known_result(
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
                self.results.setdefault(recipe.hash, row.result)
                return row.result, "run"
        earlier = self.results.get(recipe.hash)
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
                self.results[recipe.hash] = result
                return result, "cache"
        return None

    def commit(self, ident: int, recipe: Recipe, result: EvaluationResult) -> None:
        """A fresh result into the run store and the cache, the moment it arrives (a
        failure with its class, whoever made it: the back end or the worker)."""
        result = with_failure_class(result)
        self.store.add_evaluation(ident, result, "evaluated")
        if self.cache is not None:
            quick = stage_of(result.metadata) == QUICK and self.quick_fingerprint is not None
            key = self.quick_fingerprint if quick else self.fingerprint
            self.cache.put(recipe, key or self.fingerprint, result, self.limits)
        self.results[recipe.hash] = result


def individual_row(
    generation: int, slot: int, recipe: Recipe, parents: Any, operators: Any
) -> dict[str, Any]:
    return {
        "generation": generation,
        "slot": slot,
        "hash": recipe.hash,
        "recipe": recipe.canonical_json(),
        "parents": [int(p) for p in parents],
        "operators": list(operators),
    }


def _stderr(metadata: dict[str, Any]) -> float:
    value = metadata.get(STDERR_KEY)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return max(0.0, float(value))
    return 0.0
