"""Read results back out of a run store: the current Pareto front and the run's status."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from evo_compress.fitness.noise import AccuracyEstimate
from evo_compress.genomes import nest
from evo_compress.objectives import task_entries
from evo_compress.runs.hypervolume import run_history
from evo_compress.runs.store import LOCK_NAME, RunStore


@dataclass(frozen=True)
class FrontMember:
    id: int
    generation: int
    recipe: dict[str, Any]  # nested form
    objectives: dict[str, float]
    feasible: bool
    how: dict[str, Any]  # how each value was obtained (evaluation metadata)

    @property
    def tasks(self) -> dict[str, dict[str, Any]]:
        """Each task's score, stderr, items, metric and weight (``metadata["tasks"]``); empty
        for a back end that scores no named tasks."""
        return task_entries(self.how)

    @property
    def accuracy(self) -> AccuracyEstimate:
        """The accuracy with its standard error and items where the record holds them."""
        return AccuracyEstimate.of(self.objectives, self.how)

    def to_json(self) -> dict[str, Any]:
        accuracy = self.accuracy
        return {
            "id": self.id,
            "recipe": self.recipe,
            "objectives": self.objectives,
            # null where the evaluator recorded none (see `fitness.noise`)
            "accuracy_stderr": accuracy.stderr,
            "accuracy_n": accuracy.n,
            "feasible": self.feasible,
            # which racing stage measured it (``fidelity.racing``); absent without racing
            **({"stage": self.how["stage"]} if "stage" in self.how else {}),
            # each task's score, stderr, n, metric, weight; absent without named tasks
            **({"tasks": tasks} if (tasks := self.tasks) else {}),
        }


def load_front(store: RunStore) -> list[FrontMember]:
    """The run's front as of its last checkpoint: every feasible recipe evaluated so far that
    no other evaluated recipe dominates. When none is feasible, the least-violating members
    of the population instead (flagged ``feasible: false``)."""
    with store.snapshot():  # a search may be writing the run: read one moment of it
        return _load_front(store)


def baseline_recipe(store: RunStore) -> dict[str, Any] | None:
    """The run's baseline reference recipe (generation -1, nested form): what the front table
    shows each recipe's changes from. None before the reference was evaluated."""
    row = store.individual_at(-1, 0)
    return nest(row.recipe) if row is not None else None


def _load_front(store: RunStore) -> list[FrontMember]:
    checkpoint = store.last_checkpoint()
    if checkpoint is None:
        return []
    chosen: list[int] = list(checkpoint.algorithm_state.get("archive", []))
    is_feasible = bool(chosen)
    if not chosen:
        population = checkpoint.population
        least = min(float(e["cv"]) for e in population)
        chosen = [e["id"] for e in population if float(e["cv"]) == least]
    members = []
    for ident in sorted(chosen):
        row = store.individual(ident)
        evaluation = store.evaluation(ident)
        if evaluation is None or evaluation.result.objectives is None:
            continue  # a failed evaluation is never on the front
        members.append(
            FrontMember(
                id=row.id,
                generation=row.generation,
                recipe=nest(row.recipe),
                objectives=evaluation.result.objectives,
                feasible=is_feasible,
                how=evaluation.result.metadata,
            )
        )
    members.sort(key=lambda m: -m.objectives["accuracy"])
    return members


def front_tasks(members: Sequence[FrontMember]) -> list[str]:
    """The task names the front's members record, in the order they first appear."""
    return list(dict.fromkeys(name for m in members for name in m.tasks))


def run_status(store: RunStore) -> dict[str, Any]:
    """A summary of a run for ``evo-compress status``."""
    with store.snapshot():  # a search may be writing the run: read one moment of it
        return _run_status(store)


def _run_status(store: RunStore) -> dict[str, Any]:
    checkpoints = store.checkpoints()
    evaluations = store.evaluations()
    by_status: dict[str, int] = {}
    by_source: dict[str, int] = {}
    for row in evaluations.values():
        by_status[row.result.status] = by_status.get(row.result.status, 0) + 1
        by_source[row.source] = by_source.get(row.source, 0) + 1
    split = _seconds_split(evaluations.values())
    target = store.target_generations()
    done = checkpoints[-1].generation + 1 if checkpoints else 0
    holder = lock_holder(store)
    stopped_early = store.get_meta("stopped_early_at", None)
    if holder is not None:
        state = f"running (pid {holder})"
    elif stopped_early is not None and done >= int(stopped_early):
        state = f"finished early: no new recipe could be drawn for generation {stopped_early}"
    elif done >= target:
        state = "finished"
    else:
        state = "stopped before its last generation (resume it)"
    last = checkpoints[-1].stats if checkpoints else {}
    hv = run_history(store, checkpoints)  # one box for every generation
    calls = store.llm_calls()
    llm: dict[str, Any] | None = None
    if calls:
        outcomes: dict[str, int] = {}
        for call in calls:
            outcomes[call.outcome] = outcomes.get(call.outcome, 0) + 1
        costs = [c.cost for c in calls if c.cost is not None]
        llm = {
            "requests": len(calls),
            "input_tokens": sum(c.input_tokens for c in calls),
            "output_tokens": sum(c.output_tokens for c in calls),
            "cost": round(sum(costs), 6) if costs else None,
            "by_outcome": outcomes,
            "operators": sorted({c.operator for c in calls}),
        }
    return {
        "name": store.get_meta("name"),
        "run_dir": str(store.run_dir),
        "state": state,
        "generations_done": done,
        "generations_target": target,
        "individuals": len(store.individuals()),
        "evaluations": len(evaluations),
        "by_status": by_status,
        "by_source": by_source,
        "llm": llm,
        "seconds_split": split,
        "front_size": last.get("front_size"),
        "hypervolume": hv.last,
        "hv_box": hv.box.to_data() if hv.box is not None else None,
        "history": [
            {k: c.stats.get(k) for k in ("generation", "front_size", "failed")}
            | {"hypervolume": hv.by_generation.get(c.generation)}
            for c in checkpoints
        ],
    }


def _seconds_split(rows: Iterable[Any]) -> dict[str, Any] | None:
    """Where the evaluations' time went: each phase's seconds (checkpoint build steps,
    quantization, server start, latency, accuracy, as the vLLM back end records them in
    ``seconds_split``) summed over the evaluations this run made itself; None when none
    recorded a split (other back ends, or every result from the cache)."""
    phases: dict[str, float] = {}
    count = 0
    for row in rows:
        split = row.result.metadata.get("seconds_split") if row.source == "evaluated" else None
        if not isinstance(split, dict):
            continue
        count += 1
        for phase, seconds in split.items():
            if isinstance(seconds, int | float):
                phases[phase] = phases.get(phase, 0.0) + float(seconds)
    if not count:
        return None
    return {"evaluations": count, "phases": {k: round(v, 3) for k, v in phases.items()}}


def lock_holder(store: RunStore) -> str | None:
    """The pid holding the run's writer lock, or None when no process holds it."""
    path = store.run_dir / LOCK_NAME
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
