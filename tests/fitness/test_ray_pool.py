"""The Ray pool on a real two-node Ray cluster on this machine (and on a local Ray started on
the fly): the same results as serial evaluation, a killed worker retried or recorded as a
failed evaluation, early close cancelling what is in flight, and one-line config errors."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from evo_compress.config import RayConfig
from evo_compress.exceptions import ConfigError
from evo_compress.fitness import EvaluationContext, EvaluationResult, Evaluator
from evo_compress.fitness.pool import Task, WorkerPlan
from evo_compress.fitness.ray_pool import RayPool
from evo_compress.fitness.synthetic import SyntheticEvaluator
from evo_compress.genomes import Recipe, SearchSpace
from evo_compress.testing import PidFileEvaluator, samples

SPACE = SearchSpace.builtin("llm-compression")
RAY_PLAN = WorkerPlan("ray", None, (), None, "Ray tasks")
# No token authentication between the test cluster and this process (nothing leaves
# 127.0.0.1's machine), so no token file is written to the home directory either.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module", autouse=True)
def ray_environment() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in RAY_ENV.items():
            patch.setenv(name, value)
        patch.delenv("RAY_ADDRESS", raising=False)
        yield


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_node(args: list[str], temp_dir: str, log: Path) -> subprocess.Popen[bytes]:
    """``ray start ... --block``: it leads a process group of its own and takes the node's
    processes down with it, so teardown stops exactly this node and nothing else."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    command = [
        ray_cli,
        "start",
        *args,
        "--node-ip-address=127.0.0.1",
        "--num-cpus=1",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
        f"--dashboard-agent-listen-port={free_port()}",
        "--block",
    ]
    env = {**os.environ, **RAY_ENV, "OMP_NUM_THREADS": "1"}
    with log.open("wb") as out:
        node = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 60
    while "will now block" not in log.read_text(errors="replace"):
        if node.poll() is not None or time.monotonic() > deadline:
            stop_node(node)
            pytest.fail(f"ray start failed:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    return node


def stop_node(node: subprocess.Popen[bytes]) -> None:
    if node.poll() is None:
        node.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.wait(timeout=20)
    # Whatever is left of this node's own process group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(node.pid, signal.SIGKILL)
    node.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A head and a second node, one CPU each, on 127.0.0.1; yields the address."""
    pytest.importorskip("ray")
    logs = tmp_path_factory.mktemp("ray-logs")
    # Short: Ray's socket paths under it must stay within the 107-byte Unix limit.
    temp_dir = tempfile.mkdtemp(prefix="evo-ray-")
    port = free_port()
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        head_args = ["--head", f"--port={port}", "--include-dashboard=false"]
        nodes.append(start_node(head_args, temp_dir, logs / "head.log"))
        nodes.append(start_node([f"--address=127.0.0.1:{port}"], temp_dir, logs / "node.log"))
        yield f"127.0.0.1:{port}"
    finally:
        for node in reversed(nodes):
            stop_node(node)
        shutil.rmtree(temp_dir, ignore_errors=True)


def make_tasks(recipes: list[Recipe]) -> list[Task]:
    return [Task(i, recipe, SPACE) for i, recipe in enumerate(recipes)]


def run_all(pool: RayPool, tasks: list[Task]) -> dict[int, EvaluationResult]:
    results: dict[int, EvaluationResult] = {}
    for key, result in pool.run(tasks):
        assert key not in results
        results[key] = result
    return results


def serial(evaluator: Evaluator, tasks: list[Task]) -> dict[int, dict[str, float] | None]:
    return {t.key: evaluator.evaluate(t.recipe, t.space).objectives for t in tasks}


def pid_evaluator(pid_dir: Path, hold_s: float) -> PidFileEvaluator:
    evaluator = PidFileEvaluator({}, EvaluationContext())
    evaluator.pid_dir = pid_dir
    evaluator.hold_s = hold_s
    return evaluator


def read_pid(path: Path, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"no pid file {path.name}"
        time.sleep(0.02)
    return int(path.read_text())


def kill_when_started(path: Path, killed: list[int]) -> threading.Thread:
    """SIGKILL the process that evaluates the recipe of ``path`` once it has begun."""

    def kill() -> None:
        pid = read_pid(path)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_without_ray_the_pool_is_a_one_line_config_error(monkeypatch: Any) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    pool = RayPool(SyntheticEvaluator({}, EvaluationContext()), RAY_PLAN, RayConfig())
    with pytest.raises(ConfigError) as info:
        next(iter(pool.run(make_tasks(samples(SPACE, 1)))))
    message = str(info.value)
    assert "\n" not in message
    assert "`evaluation.backend: ray`" in message and "evo-compress[ray]" in message
    pool.close()
    pool.close()


@pytest.mark.slow
def test_an_address_nothing_answers_at_is_a_config_error() -> None:
    ray = pytest.importorskip("ray")
    evaluator = SyntheticEvaluator({}, EvaluationContext())
    address = f"127.0.0.1:{free_port()}"
    pool = RayPool(evaluator, RAY_PLAN, RayConfig(address=address))
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"`evaluation\.ray\.address`: nothing answers at"):
        next(iter(pool.run(make_tasks(samples(SPACE, 1)))))
    assert time.monotonic() - start < 15
    pool.close()
    assert not ray.is_initialized()


@pytest.mark.slow
def test_a_local_ray_started_on_the_fly_gives_the_serial_results() -> None:
    # Before the cluster fixture starts: this process starts (and stops) a Ray of its own.
    ray = pytest.importorskip("ray")
    evaluator = SyntheticEvaluator({}, EvaluationContext())
    tasks = make_tasks(samples(SPACE, 4, seed=1))
    pool = RayPool(evaluator, RAY_PLAN, RayConfig(local_cpus=2))
    try:
        results = run_all(pool, tasks)
        assert ray.is_initialized()
    finally:
        pool.close()
        pool.close()
    assert not ray.is_initialized()
    assert {k: r.objectives for k, r in results.items()} == serial(evaluator, tasks)
    assert all(r.metadata["placement"]["where"].startswith("Ray node") for r in results.values())


@pytest.mark.slow
def test_results_on_a_cluster_equal_the_serial_results(cluster: str) -> None:
    import ray

    evaluator = SyntheticEvaluator({"cost_s": 0.05}, EvaluationContext())
    tasks = make_tasks(samples(SPACE, 6, seed=2))
    with RayPool(evaluator, RAY_PLAN, RayConfig(address=cluster)) as pool:
        results = run_all(pool, tasks)
        node_ids = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    assert not ray.is_initialized()
    assert len(node_ids) == 2
    assert sorted(results) == [t.key for t in tasks]
    assert {k: r.objectives for k, r in results.items()} == serial(evaluator, tasks)
    for result in results.values():
        assert result.ok and result.metadata["ray"]["node_id"] in node_ids
        assert result.metadata["placement"]["where"].startswith("Ray node ")
        assert "env" not in result.metadata["placement"]  # no GPU asked for, none pinned


@pytest.mark.slow
def test_a_worker_killed_mid_evaluation_is_retried(cluster: str, tmp_path: Path) -> None:
    evaluator = pid_evaluator(tmp_path, hold_s=2.0)
    tasks = make_tasks(samples(SPACE, 2, seed=3))
    killed: list[int] = []
    killer = kill_when_started(tmp_path / f"{tasks[0].recipe.short_hash}.pid", killed)
    with RayPool(evaluator, RAY_PLAN, RayConfig(address=cluster, max_retries=1)) as pool:
        results = run_all(pool, tasks)
    killer.join(timeout=5)
    assert len(killed) == 1
    assert all(r.ok for r in results.values()), [r.reason for r in results.values()]
    assert results[0].metadata["ray"]["pid"] != killed[0]  # the retry ran elsewhere
    assert {k: r.objectives for k, r in results.items()} == serial(evaluator, tasks)


@pytest.mark.slow
def test_without_retries_a_killed_worker_is_a_failed_evaluation(
    cluster: str, tmp_path: Path
) -> None:
    evaluator = pid_evaluator(tmp_path, hold_s=2.0)
    tasks = make_tasks(samples(SPACE, 3, seed=4))
    killed: list[int] = []
    killer = kill_when_started(tmp_path / f"{tasks[1].recipe.short_hash}.pid", killed)
    with RayPool(evaluator, RAY_PLAN, RayConfig(address=cluster, max_retries=0)) as pool:
        results = run_all(pool, tasks)
    killer.join(timeout=5)
    assert len(killed) == 1
    failed = results[1]
    assert failed.status == "failed" and failed.objectives is None
    reason = failed.reason or ""
    assert reason.startswith("the Ray worker evaluating it died 1 time(s) (max_retries 0): ")
    assert "WorkerCrashedError" in reason and "\n" not in reason
    assert failed.metadata["ray"]["error"] == "WorkerCrashedError"
    assert results[0].ok and results[2].ok  # the search goes on


@pytest.mark.slow
def test_closing_the_results_early_cancels_what_is_in_flight(cluster: str, tmp_path: Path) -> None:
    evaluator = pid_evaluator(tmp_path, hold_s=120.0)
    tasks = make_tasks(samples(SPACE, 4, seed=5))
    # A recipe whose pid file exists already counts as a retry: it does not pause.
    (tmp_path / f"{tasks[0].recipe.short_hash}.pid").write_text("0")
    plan = WorkerPlan("ray", 2, (), None, "Ray tasks, at most 2")
    start = time.monotonic()
    with RayPool(evaluator, plan, RayConfig(address=cluster)) as pool:
        results = pool.run(tasks)
        key, result = next(results)
        assert key == 0 and result.ok
        held = read_pid(tmp_path / f"{tasks[1].recipe.short_hash}.pid")
        results.close()
        deadline = time.monotonic() + 20
        while not gone(held):
            assert time.monotonic() < deadline, "the cancelled evaluation still runs"
            time.sleep(0.1)
    assert time.monotonic() - start < 60
    # At most two ran at once: the fourth never started.
    assert not (tmp_path / f"{tasks[3].recipe.short_hash}.pid").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("resources", "asked"),
    [({"gpus_per_task": 1}, "1 GPU(s)"), ({"cpus_per_task": 2}, "2 CPU(s)")],
)
def test_a_task_no_node_can_hold_is_a_config_error(
    cluster: str, resources: dict[str, float], asked: str
) -> None:
    import ray

    evaluator = SyntheticEvaluator({}, EvaluationContext())
    pool = RayPool(evaluator, RAY_PLAN, RayConfig(address=cluster, **resources))
    try:
        with pytest.raises(ConfigError) as info:
            next(iter(pool.run(make_tasks(samples(SPACE, 1)))))
    finally:
        pool.close()
    message = str(info.value)
    assert "\n" not in message and asked in message and "`evaluation.ray" in message
    assert not ray.is_initialized()


class _NeedsAFolder(SyntheticEvaluator):
    """Reads a model folder by path, like the real back ends."""

    folder = Path("/nonexistent/evo-compress-model")

    def shared_paths(self) -> list[Path]:
        return [self.folder]


@pytest.mark.slow
def test_a_model_folder_missing_on_a_node_stops_the_search_with_the_fix(cluster: str) -> None:
    from ray import cloudpickle

    # Ray's workers cannot import this test module: send the class by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    evaluator = _NeedsAFolder({}, EvaluationContext())
    pool = RayPool(evaluator, RAY_PLAN, RayConfig(address=cluster))
    with pool, pytest.raises(ConfigError) as info:
        run_all(pool, make_tasks(samples(SPACE, 2, seed=6)))
    message = str(info.value)
    assert "/nonexistent/evo-compress-model is not on Ray node" in message
    assert "same path" in message and "\n" not in message
