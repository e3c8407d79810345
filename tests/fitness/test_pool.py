"""Parallel evaluation on this machine: the worker plan, GPU pinning, the local pool."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from evo_compress.config import EvaluationConfig
from evo_compress.exceptions import ConfigError
from evo_compress.fitness import EvaluationContext, EvaluationResult, Placement
from evo_compress.fitness.energy import nvml_device_handle
from evo_compress.fitness.pool import (
    LocalPool,
    Task,
    WorkerPlan,
    configure_evaluator,
    plan_workers,
)
from evo_compress.fitness.synthetic import SyntheticEvaluator
from evo_compress.genomes import Recipe, SearchSpace
from evo_compress.testing import samples

SPACE = SearchSpace.builtin("llm-compression")


class _Threaded(SyntheticEvaluator):
    """A synthetic evaluator that claims torch threads (and optionally a GPU), and counts
    how many of its evaluations overlap."""

    name = "test-threaded"
    gpu = False

    def __init__(self, settings: Any, context: EvaluationContext, threads: int = 2) -> None:
        super().__init__(settings, context)
        self._threads = threads
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.placements: list[Placement] = []

    def uses_gpu(self) -> bool:
        return self.gpu

    def threads(self) -> int | None:
        return self._threads

    def with_threads(self, threads: int) -> _Threaded:
        return _Threaded(self.settings, self.context, threads)

    def _evaluate(self, recipe: Recipe, placement: Placement) -> EvaluationResult:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.placements.append(placement)
        try:
            return super()._evaluate(recipe, placement)
        finally:
            with self.lock:
                self.running -= 1


def _evaluator(threads: int = 2, gpu: bool = False, **settings: Any) -> _Threaded:
    evaluator = _Threaded(settings, EvaluationContext(), threads)
    evaluator.gpu = gpu
    return evaluator


def _plan(evaluator: Any, **evaluation: Any) -> WorkerPlan:
    return plan_workers(EvaluationConfig(**evaluation), evaluator)


# ---------------------------------------------------------------------- the plan
def test_auto_on_a_cpu_is_one_worker_so_latency_is_measured_alone():
    plan = _plan(_evaluator(), workers="auto")
    assert plan.workers == 1 and plan.gpus == () and plan.threads == 2


def test_cpu_workers_divide_the_cores_threads(monkeypatch):
    monkeypatch.setattr("evo_compress.fitness.pool.available_cores", lambda: 4)
    assert _plan(_evaluator(threads=2), workers=2).threads == 2
    assert _plan(_evaluator(threads=4), workers=2).threads == 2
    assert _plan(_evaluator(threads=4), workers=8).threads == 1  # never below one
    evaluator, plan = configure_evaluator(EvaluationConfig(workers=2), _evaluator(threads=4))
    assert plan.workers == 2 and evaluator.threads() == 2
    assert evaluator.concurrent == 2  # measured under contention: fingerprinted apart


def test_one_worker_per_visible_gpu_each_pinned(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    plan = _plan(_evaluator(gpu=True), workers="auto")
    assert plan.workers == 2 and plan.gpus == ("3", "5")
    placements = plan.placements()
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in placements] == ["3", "5"]
    assert {p.device for p in placements} == {"cuda"}
    assert _plan(_evaluator(gpu=True), workers=1).gpus == ()  # one worker: left as configured


def test_more_gpu_workers_than_gpus_is_a_config_error(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ConfigError, match=r"`evaluation.workers` is 3 but 2 GPU"):
        _plan(_evaluator(gpu=True), workers=3)


def test_a_named_gpu_allows_one_worker(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    evaluator = _Threaded(
        {},
        EvaluationContext(
            hardware=EvaluationContext().hardware.model_copy(update={"device": "cuda:1"})
        ),
        2,
    )
    evaluator.gpu = True
    assert _plan(evaluator, workers="auto").workers == 1
    with pytest.raises(ConfigError, match="1 GPU"):
        _plan(evaluator, workers=2)


def test_ray_plans_leave_placement_to_ray():
    plan = _plan(_evaluator(), backend="ray", workers="auto")
    assert plan.backend == "ray" and plan.workers is None and plan.threads == 2
    assert _plan(_evaluator(), backend="ray", workers=3).workers == 3


def test_the_evaluation_section_rejects_bad_values():
    from evo_compress.config import parse_config

    with pytest.raises(ConfigError, match=r"`evaluation\.workers` must be auto or a count"):
        parse_config({"evaluation": {"workers": 0}})
    with pytest.raises(ConfigError, match=r"`evaluation\.backend` must be 'local' or 'ray'"):
        parse_config({"evaluation": {"backend": "dask"}})
    with pytest.raises(ConfigError, match=r"unknown key `evaluation\.ray\.adress`"):
        parse_config({"evaluation": {"ray": {"adress": "auto"}}})


# ---------------------------------------------------------------------- NVML mapping
class _FakeNVML:
    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return f"index {index}"

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        return f"uuid {uuid}"


def test_nvml_follows_cuda_visible_devices():
    nvml = _FakeNVML()
    assert nvml_device_handle(nvml, "cuda", {}) == "index 0"
    assert nvml_device_handle(nvml, "cuda:1", {}) == "index 1"
    # A worker pinned to physical GPU 5 calls it cuda:0; NVML must read GPU 5.
    assert nvml_device_handle(nvml, "cuda", {"CUDA_VISIBLE_DEVICES": "5"}) == "index 5"
    assert nvml_device_handle(nvml, "cuda:1", {"CUDA_VISIBLE_DEVICES": "3,5"}) == "index 5"
    env = {"CUDA_VISIBLE_DEVICES": "GPU-8f2a,GPU-77"}
    assert nvml_device_handle(nvml, "cuda:1", env) == "uuid GPU-77"
    with pytest.raises(ValueError, match="not among"):
        nvml_device_handle(nvml, "cuda:2", {"CUDA_VISIBLE_DEVICES": "3,5"})


# ---------------------------------------------------------------------- the local pool
def _tasks(n: int, seed: int = 0) -> list[Task]:
    return [Task(i, recipe, SPACE) for i, recipe in enumerate(samples(SPACE, n, seed))]


def test_local_workers_run_at_once_and_every_result_comes_back():
    evaluator = _evaluator(cost_s=0.05, cost_spread=0.5)  # every pause >= 25 ms
    tasks = _tasks(8)
    plan = plan_workers(EvaluationConfig(workers=3), evaluator)
    with LocalPool(evaluator, plan) as pool:
        results = dict(pool.run(tasks))
    assert sorted(results) == list(range(8))
    assert evaluator.most == 3  # three slots busy at once, never more
    assert {p.slot for p in evaluator.placements} == {0, 1, 2}
    serial = _evaluator()
    for task in tasks:
        expected = serial.evaluate(task.recipe, SPACE)
        assert results[task.key].objectives == expected.objectives
        assert results[task.key].metadata["placement"]["slot"] in (0, 1, 2)


def test_results_arrive_as_they_finish_not_in_task_order():
    tasks = _tasks(5, seed=4)
    # Pauses 50 ms apart, longest first: started together, they finish in reverse.
    pauses = {t.recipe.hash: 0.05 * (len(tasks) - t.key) for t in tasks}

    class _Paused(_Threaded):
        def _evaluate(self, recipe: Recipe, placement: Placement) -> EvaluationResult:
            time.sleep(pauses[recipe.hash])
            return super()._evaluate(recipe, placement)

    evaluator = _Paused({}, EvaluationContext())
    with LocalPool(evaluator, plan_workers(EvaluationConfig(workers=5), evaluator)) as pool:
        order = [key for key, _ in pool.run(tasks)]
    assert order == [4, 3, 2, 1, 0]


def test_one_worker_evaluates_in_the_calling_thread():
    evaluator = _evaluator()
    with LocalPool(evaluator, WorkerPlan()) as pool:
        results = list(pool.run(_tasks(3)))
    assert [key for key, _ in results] == [0, 1, 2]
    assert {p.slot for p in evaluator.placements} == {0}


def test_stopping_early_kills_the_worker_processes_in_flight():
    from evo_compress.fitness.worker import WorkerLimits, run_in_worker

    class _Sleeper(_Threaded):
        def _evaluate(self, recipe: Recipe, placement: Placement) -> EvaluationResult:
            seconds = 0.2 if recipe == tasks[0].recipe else 60
            return run_in_worker(
                "evo_compress.testing:worker_sleep",
                {"seconds": seconds},
                WorkerLimits(timeout_s=120),
                env=placement.env,
            )

    tasks = _tasks(3, seed=7)
    evaluator = _Sleeper({}, EvaluationContext())
    pool = LocalPool(evaluator, plan_workers(EvaluationConfig(workers=3), evaluator))
    started = time.perf_counter()
    results = pool.run(tasks)
    key, first = next(results)
    assert key == 0 and first.ok
    results.close()  # the caller stops (an interrupt, a crash): the 60 s workers die now
    pool.close()
    assert time.perf_counter() - started < 30
    # New workers may start again afterwards.
    assert run_in_worker("evo_compress.testing:worker_echo", {}, WorkerLimits(timeout_s=30)).ok


def test_a_workers_environment_reaches_its_process():
    from evo_compress.fitness.worker import WorkerLimits, run_in_worker

    result = run_in_worker(
        "evo_compress.testing:worker_env",
        {"names": ["CUDA_VISIBLE_DEVICES"]},
        WorkerLimits(timeout_s=30),
        env={"CUDA_VISIBLE_DEVICES": "7"},
    )
    assert result.ok and result.metadata["env"] == {"CUDA_VISIBLE_DEVICES": "7"}
