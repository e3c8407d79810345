"""Evaluating many recipes at once: worker slots on this machine, or a Ray cluster.

The search hands a pool the evaluations a generation still needs and takes each result back
the moment it finishes. The search alone writes the run store and the fitness cache, one
result at a time, so a crash loses only what was in flight; and it puts results back in
offspring order before selection, so the front does not depend on which evaluation
finished first.

- ``plan_workers`` decides how many evaluations run at once and where: one per visible GPU,
  each pinned with ``CUDA_VISIBLE_DEVICES``; or N on the CPU, the cores' threads divided.
- ``LocalPool`` runs them on this machine. The real back ends already isolate every
  evaluation in a worker process of its own (``fitness.worker``); a slot is the thread that
  starts and waits on one.
- ``RayPool`` (``fitness.ray_pool``) makes each evaluation a Ray task.
"""

from __future__ import annotations

import os
import queue
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING

from evo_compress.exceptions import ConfigError
from evo_compress.fitness._base import EvaluationResult, Evaluator, Placement
from evo_compress.genomes import Recipe, SearchSpace

if TYPE_CHECKING:
    from evo_compress.config import EvaluationConfig
    from evo_compress.fitness.racing import RaceRule

_STOP_WAIT_S = 30.0  # how long a stopping pool waits for its slots' threads


@dataclass(frozen=True)
class Task:
    """One evaluation to run; ``key`` comes back with its result (the offspring slot).
    ``race``: the racing rule of this evaluation (None: measure in full)."""

    key: int
    recipe: Recipe
    space: SearchSpace
    race: RaceRule | None = None


@dataclass(frozen=True)
class WorkerPlan:
    """How a search evaluates: ``workers`` at once (None: as many as Ray places),
    ``gpus`` the ``CUDA_VISIBLE_DEVICES`` entry of each local slot (none: not pinned),
    ``threads`` torch threads per evaluation (None: the evaluator runs no torch)."""

    backend: str = "local"
    workers: int | None = 1
    gpus: tuple[str, ...] = ()
    threads: int | None = None
    note: str = "one evaluation at a time"

    def placements(self) -> list[Placement]:
        if self.gpus:
            return [
                Placement(
                    i, {"CUDA_VISIBLE_DEVICES": gpu}, "cuda", f"local worker {i} (GPU {gpu})"
                )
                for i, gpu in enumerate(self.gpus)
            ]
        return [Placement(i, {}, None, f"local worker {i}") for i in range(self.workers or 1)]


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def visible_gpus(device: str) -> list[str]:
    """The ``CUDA_VISIBLE_DEVICES`` entries an evaluation on ``device`` may be pinned to:
    every GPU this process sees for cuda/auto, the one named for cuda:N."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
    else:
        try:
            import torch

            entries = [str(i) for i in range(torch.cuda.device_count())]
        except ImportError:
            entries = []
    if device.startswith("cuda:"):
        index = int(device[5:])
        return entries[index : index + 1]
    return entries


def plan_workers(evaluation: EvaluationConfig, evaluator: Evaluator) -> WorkerPlan:
    """The plan for ``evaluation.workers`` and ``evaluation.backend`` with this evaluator;
    a ``ConfigError`` names the field when the machine cannot do what it asks."""
    threads = evaluator.threads()
    wanted = evaluation.workers
    if evaluation.backend == "ray":
        cap = None if wanted == "auto" else int(wanted)
        where = "as many at once as the cluster places" if cap is None else f"at most {cap}"
        return WorkerPlan("ray", cap, (), threads, f"Ray tasks, {where}")
    if evaluator.uses_gpu():
        device = evaluator.context.hardware.device
        gpus = visible_gpus("cuda" if device == "auto" else device)
        count = len(gpus) if wanted == "auto" else int(wanted)
        if count > len(gpus):
            raise ConfigError(
                f"`evaluation.workers` is {count} but {len(gpus)} GPU(s) are visible "
                f"({', '.join(gpus) or 'none'}); one worker needs a GPU of its own"
            )
        if count <= 1:  # one worker keeps the configured device as it is
            return WorkerPlan("local", 1, (), threads, "one evaluation at a time")
        gpus = gpus[:count]
        return WorkerPlan(
            "local",
            count,
            tuple(gpus),
            threads,
            f"{count} workers, one per GPU ({', '.join(gpus)})",
        )
    # On a CPU, auto is one worker: latency measured alone, not under contention.
    count = 1 if wanted == "auto" else int(wanted)
    if count == 1:
        return WorkerPlan("local", 1, (), threads, "one evaluation at a time")
    cores = available_cores()
    per = None if threads is None else max(1, min(threads, cores // count))
    shared = f", {per} torch thread(s) each on {cores} cores" if per is not None else ""
    return WorkerPlan("local", count, (), per, f"{count} CPU workers{shared}")


def configure_evaluator(
    evaluation: EvaluationConfig, evaluator: Evaluator
) -> tuple[Evaluator, WorkerPlan]:
    """``evaluator`` adjusted to the plan (threads divided between CPU workers, which the
    fingerprint then records) and the plan itself."""
    plan = plan_workers(evaluation, evaluator)
    if plan.threads is not None and plan.threads != evaluator.threads():
        evaluator = evaluator.with_threads(plan.threads)
    if plan.backend == "local" and not plan.gpus and (plan.workers or 1) > 1:
        evaluator.concurrent = plan.workers or 1
    return evaluator, plan


def _evaluate(evaluator: Evaluator, task: Task, placement: Placement | None) -> EvaluationResult:
    # Without racing, the three-argument call of every version before it.
    if task.race is None:
        return evaluator.evaluate(task.recipe, task.space, placement)
    return evaluator.evaluate(task.recipe, task.space, placement, task.race)


class EvaluationPool(ABC):
    """Runs evaluations and yields ``(task key, result)`` as each finishes."""

    def __init__(self, evaluator: Evaluator, plan: WorkerPlan) -> None:
        self.evaluator = evaluator
        self.plan = plan

    @abstractmethod
    def run(self, tasks: Sequence[Task]) -> Iterator[tuple[int, EvaluationResult]]:
        """Evaluate every task; yield each result as it arrives. Closing the iterator early
        (an interrupt, a crash of the caller) stops what is still in flight."""

    def close(self) -> None:
        """Release workers or the cluster connection. Safe to call twice."""

    def __enter__(self) -> EvaluationPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalPool(EvaluationPool):
    """``plan.workers`` evaluations at once on this machine, each in its own slot
    (``Placement``): its GPU pinned, or its share of the CPU threads."""

    def __init__(self, evaluator: Evaluator, plan: WorkerPlan) -> None:
        super().__init__(evaluator, plan)
        self._placements = plan.placements()
        self._executor: ThreadPoolExecutor | None = None
        evaluator.sequential = len(self._placements) == 1

    def run(self, tasks: Sequence[Task]) -> Iterator[tuple[int, EvaluationResult]]:
        if len(self._placements) == 1 or len(tasks) <= 1:
            placement = self._placements[0] if self.plan.gpus else None
            for task in tasks:
                yield (
                    task.key,
                    _evaluate(self.evaluator, task, placement),
                )
            return
        yield from self._run_parallel(tasks)

    def _run_parallel(self, tasks: Sequence[Task]) -> Iterator[tuple[int, EvaluationResult]]:
        from evo_compress.fitness.worker import allow_workers, kill_live_workers

        if self._executor is None:
            # Probed once here, not by every slot at once (probes may redirect the terminal).
            self.evaluator.capabilities()
            self._executor = ThreadPoolExecutor(
                len(self._placements), thread_name_prefix="evo-compress-eval"
            )
        free: queue.SimpleQueue[Placement] = queue.SimpleQueue()
        for placement in self._placements:
            free.put(placement)

        def evaluate(task: Task) -> EvaluationResult:
            placement = free.get()
            try:
                result = _evaluate(self.evaluator, task, placement)
            finally:
                free.put(placement)
            meta = {**result.metadata, "placement": placement.describe()}
            return EvaluationResult(
                result.status, result.objectives, result.reason, meta, result.duration_s
            )

        futures: dict[Future[EvaluationResult], int] = {
            self._executor.submit(evaluate, task): task.key for task in tasks
        }
        finished = 0
        try:
            for future in as_completed(futures):
                finished += 1
                yield futures[future], future.result()
        finally:
            if finished < len(futures):  # stopped early: nothing keeps running unwatched
                for future in futures:
                    future.cancel()
                kill_live_workers()
                # Let the slots' threads see their workers die (a vLLM server in a slot is
                # stopped by its own guard at exit; do not wait on it for ever).
                wait(futures, timeout=_STOP_WAIT_S)
                allow_workers()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
