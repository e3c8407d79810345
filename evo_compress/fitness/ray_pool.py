"""Evaluations as Ray tasks (``evaluation.backend: ray``): on a local Ray started on the fly,
or on a cluster (``evaluation.ray.address``).

The evaluator is shipped once per pool (``ray.put``); each evaluation is one Ray task that
asks for ``evaluation.ray.cpus_per_task`` / ``gpus_per_task`` and returns its result to the
driver, which alone writes the run store and the fitness cache.

What travels and what does not:

- Recipes, the search space and the evaluator's settings travel with each task. The model
  folder, the task files and compressed checkpoints travel *by path*: on a real cluster the
  model folder, the run's task files and (vLLM) the checkpoint cache must be on storage every
  node mounts at the same path, and evo-compress must be installed on every node (or set
  ``evaluation.ray.runtime_env``: ``env_vars``, ``py_modules``, ``pip``, ...).
- The nodes are assumed alike: the fitness cache is keyed by the driver's hardware, so a
  result measured on another kind of GPU would be cached under the wrong fingerprint. Each
  result's metadata records where it ran (``placement``: node IP and pid; ``ray``: node id).
- A task whose worker or node dies is re-run up to ``evaluation.ray.max_retries`` times;
  after that it is a failed evaluation with the reason, and the search goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from evo_compress.exceptions import ConfigError
from evo_compress.fitness._base import EvaluationResult, Evaluator, Placement
from evo_compress.fitness.pool import EvaluationPool, Task, WorkerPlan
from evo_compress.genomes import Recipe, SearchSpace

if TYPE_CHECKING:
    from evo_compress.config import RayConfig
    from evo_compress.fitness.racing import RaceRule

MISSING_RAY = "`evaluation.backend: ray` needs Ray: pip install 'evo-compress[ray]'"
# ray.wait returns at least this often, so an interrupt is seen while tasks run.
_WAIT_S = 1.0
# ray.init retries an address nothing answers at for many minutes; a plain connect does not.
_PROBE_S = 10.0
# Errors that mean the process (or node) running the task went away, not that it failed.
_DIED = (
    "WorkerCrashedError",
    "NodeDiedError",
    "LocalRayletDiedError",
    "OwnerDiedError",
    "ObjectLostError",
    "ObjectReconstructionFailedError",
    "ObjectFetchTimedOutError",
)
_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def evaluate_in_task(
    evaluator: Evaluator,
    recipe: Recipe,
    space: SearchSpace,
    gpus: bool,
    race: RaceRule | None = None,
) -> EvaluationResult:
    """The body of one Ray task: evaluate ``recipe`` where Ray placed it and say where."""
    import ray

    node_ip = ray.util.get_node_ip_address()
    node_id = ray.get_runtime_context().get_node_id()
    env: dict[str, str] = {}
    device = None
    if gpus:
        # Ray sets CUDA_VISIBLE_DEVICES of the task to the GPU(s) it reserved for it.
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        device = "cuda"
    placement = Placement(0, env, device, f"Ray node {node_ip}, pid {os.getpid()}")
    missing = [str(p) for p in evaluator.shared_paths() if not p.exists()]
    if missing:  # not the recipe's failure: the driver stops the search with this
        return EvaluationResult.failure(
            f"missing on Ray node {node_ip}: {', '.join(missing)}",
            {"ray": {"node_ip": node_ip, "missing_paths": missing}},
        )
    result = evaluator.evaluate(recipe, space, placement, race)
    metadata = {
        **result.metadata,
        "placement": placement.describe(),
        "ray": {"node_id": node_id, "node_ip": node_ip, "pid": os.getpid()},
    }
    return EvaluationResult(
        result.status, result.objectives, result.reason, metadata, result.duration_s
    )


class _HideTokenNotice(logging.Filter):
    """Drops Ray's notice that token authentication is on (the default; nothing to do).
    Its warning that authentication is *off* still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")


def _probe(address: str) -> None:
    """Raise a ``ConfigError`` now when nothing listens at a ``host:port`` address."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", or a form Ray itself will judge
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=_PROBE_S).close()
    except OSError as exc:
        raise ConfigError(
            f"`evaluation.ray.address`: nothing answers at {address!r} ({exc}); start the "
            "cluster (`ray start --head`) or fix the address"
        ) from None


def _raise_if_missing_paths(result: EvaluationResult) -> None:
    """A node without the model folder fails every evaluation placed there: stop the
    search (results so far are committed; resume once the files are shared) instead of
    recording each recipe as failed."""
    missing = result.metadata.get("ray", {}).get("missing_paths") if not result.ok else None
    if missing:
        node = result.metadata["ray"].get("node_ip")
        raise ConfigError(
            f"`evaluation.backend: ray`: {', '.join(missing)} is not on Ray node {node}; "
            "the model folder and task files travel by path: put them on storage every node "
            "mounts at the same path (docs/config.md#evaluation), then resume"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


class RayPool(EvaluationPool):
    """Each evaluation a Ray task; at most ``plan.workers`` in flight (None: all at once)."""

    def __init__(self, evaluator: Evaluator, plan: WorkerPlan, config: RayConfig) -> None:
        super().__init__(evaluator, plan)
        evaluator.sequential = False  # each evaluation a Ray task: nothing shared between them
        self.config = config
        self._ray: Any = None
        self._owns = False  # this pool called ray.init, so close() shuts Ray down
        self._auth_mode: str | None = None
        self._evaluator_ref: Any = None
        self._remote: Any = None

    # ------------------------------------------------------------------ resources
    def num_gpus(self) -> float:
        if self.config.gpus_per_task is not None:
            return float(self.config.gpus_per_task)
        return 1.0 if self.evaluator.uses_gpu() else 0.0

    def num_cpus(self) -> float:
        if self.config.cpus_per_task is not None:
            return float(self.config.cpus_per_task)
        return float(self.plan.threads or 1)

    # ------------------------------------------------------------------ connection
    def start(self) -> None:
        """Connect to Ray (or start a local one) and ship the evaluator; once per pool."""
        if self._remote is not None:
            return
        try:
            import ray
        except ImportError:
            raise ConfigError(MISSING_RAY) from None
        self._ray = ray
        if not ray.is_initialized():
            self._connect(ray)
        self._check_resources(ray)
        try:
            self._evaluator_ref = ray.put(self.evaluator)
        except Exception as exc:  # a live object (a model, a lock) cannot leave this process
            raise ConfigError(
                f"the {self.evaluator.name} evaluator cannot be sent to Ray workers: "
                f"{type(exc).__name__}: {_first_line(exc)}"
            ) from None
        self._remote = ray.remote(evaluate_in_task).options(
            num_cpus=self.num_cpus(),
            num_gpus=self.num_gpus(),
            max_retries=self.config.max_retries,
            retry_exceptions=False,
        )

    def _connect(self, ray: Any) -> None:
        address = self.config.address
        kwargs: dict[str, Any] = {
            "log_to_driver": False,  # workers' output stays in the Ray session logs
            "logging_level": logging.WARNING,
        }
        if self.config.runtime_env:
            kwargs["runtime_env"] = dict(self.config.runtime_env)
        if address is None:
            kwargs.update(num_cpus=self.config.local_cpus, include_dashboard=False)
        else:
            _probe(address)
            kwargs["address"] = address
        # A local ray.init switches token authentication on in os.environ; put it back after.
        self._auth_mode = os.environ.get("RAY_AUTH_MODE")
        auth_logger = logging.getLogger(_AUTH_LOGGER)
        notice = _HideTokenNotice()
        auth_logger.addFilter(notice)
        try:
            ray.init(**kwargs)
        except Exception as exc:
            where = "a local Ray" if address is None else f"the Ray cluster at {address!r}"
            field = "`evaluation.ray.address`" if address is not None else "`evaluation.ray`"
            raise ConfigError(
                f"{field}: could not connect to {where}: {type(exc).__name__}: {_first_line(exc)}"
            ) from None
        finally:
            auth_logger.removeFilter(notice)
        self._owns = True

    def _check_resources(self, ray: Any) -> None:
        """A task no node can ever hold would wait forever: say so now instead."""
        cpus, gpus = self.num_cpus(), self.num_gpus()
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        if any(n.get("CPU", 0.0) >= cpus and n.get("GPU", 0.0) >= gpus for n in nodes):
            return
        most_cpus = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
        most_gpus = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
        raise ConfigError(
            f"`evaluation.ray`: one evaluation asks for {cpus:g} CPU(s) and {gpus:g} GPU(s) "
            f"but no node of the Ray cluster has that much (at most {most_cpus:g} CPU(s), "
            f"{most_gpus:g} GPU(s) on one of {len(nodes)} node(s)); set "
            "`evaluation.ray.cpus_per_task` / `gpus_per_task` or add nodes"
        )

    # ------------------------------------------------------------------ running
    def run(self, tasks: Sequence[Task]) -> Iterator[tuple[int, EvaluationResult]]:
        if not tasks:
            return
        self.start()
        ray = self._ray
        waiting = deque(tasks)
        limit = self.plan.workers or len(tasks)
        pending: dict[Any, Task] = {}
        try:
            while waiting or pending:
                while waiting and len(pending) < limit:
                    task = waiting.popleft()
                    ref = self._remote.remote(
                        self._evaluator_ref,
                        task.recipe,
                        task.space,
                        self.num_gpus() > 0,
                        task.race,
                    )
                    pending[ref] = task
                done, _ = ray.wait(list(pending), num_returns=1, timeout=_WAIT_S)
                for ref in done:
                    task = pending.pop(ref)
                    result = self._result(ref)
                    _raise_if_missing_paths(result)
                    yield task.key, result
        finally:
            # Stopped early (closed, interrupted, the caller crashed): nothing runs unwatched.
            for ref in pending:
                # Already finished or gone: nothing left to stop.
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)

    def _result(self, ref: Any) -> EvaluationResult:
        ray = self._ray
        try:
            result: EvaluationResult = ray.get(ref)
            return result
        except ray.exceptions.RayTaskError as exc:  # the task body itself raised
            cause = exc.cause if exc.cause is not None else exc
            name = type(cause).__name__
            reason = f"the Ray task evaluating it raised {name}: {_first_line(cause)}"
        except ray.exceptions.RayError as exc:
            name = type(exc).__name__
            retries = self.config.max_retries
            if any(cls.__name__ in _DIED for cls in type(exc).__mro__):
                reason = (
                    f"the Ray worker evaluating it died {retries + 1} time(s) "
                    f"(max_retries {retries}): {name}: {_first_line(exc)}"
                )
            else:
                reason = f"Ray could not run the evaluation: {name}: {_first_line(exc)}"
        meta = {
            "evaluator": self.evaluator.name,
            "ray": {"error": name, "max_retries": self.config.max_retries},
        }
        return EvaluationResult.failure(reason, meta)

    def close(self) -> None:
        self._evaluator_ref = None
        self._remote = None
        if self._ray is not None and self._owns:
            self._ray.shutdown()
            if self._auth_mode is None:
                os.environ.pop("RAY_AUTH_MODE", None)
            else:
                os.environ["RAY_AUTH_MODE"] = self._auth_mode
        self._owns = False
