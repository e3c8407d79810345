"""lm-evaluation-harness tasks, shared by the real-model back ends: finding a task (the
project's reference task or any lm-eval task name), scoring one or several on an lm-eval
model object, in memory (transformers) or a server client (vLLM), and combining several
scores into one weighted accuracy (``combine_tasks``). lm-eval is imported on first use:
importing it takes seconds.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from evo_compress.exceptions import EvaluationError
from evo_compress.fitness.noise import accuracy_stderr
from evo_compress.numeric import finite_float

# Indexing lm-eval's built-in tasks takes seconds: keep one TaskManager per set of paths.
_TASK_MANAGERS: dict[tuple[tuple[str, ...], bool], Any] = {}
_LOCK = threading.RLock()


class _DropMessages(logging.Filter):
    """Drops known, expected warnings: we pass a model object on purpose, in one process."""

    FRAGMENTS = (
        "`pretrained` model kwarg is not of type `str`",
        "Passed an already-initialized model through `pretrained`",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.FRAGMENTS)


_logging_quieted = False


def quiet_lm_eval_logging() -> None:
    """lm-eval logs warnings only, less the expected ones (``_DropMessages``)."""
    global _logging_quieted
    if _logging_quieted:
        return
    _logging_quieted = True
    logger = logging.getLogger("lm_eval")
    if logger.level == logging.NOTSET or logger.level < logging.WARNING:
        logger.setLevel(logging.WARNING)
    logging.getLogger("lm_eval.models.huggingface").addFilter(_DropMessages())


def task_manager(include_path: Path | None, with_defaults: bool) -> Any:
    """One TaskManager per set of paths (indexing lm-eval's built-in tasks takes seconds)."""
    from lm_eval.tasks import TaskManager

    paths = (str(Path(include_path).resolve()),) if include_path is not None else ()
    key = (paths, with_defaults)
    with _LOCK:
        if key not in _TASK_MANAGERS:
            _TASK_MANAGERS[key] = TaskManager(
                include_path=list(paths) or None, include_defaults=with_defaults
            )
        return _TASK_MANAGERS[key]


def find_task_manager(name: str, include_path: Path | None) -> Any:
    """The lm-eval TaskManager that knows task ``name``: ``include_path`` alone first."""
    if include_path is not None:
        # The project's own tasks: index only their folder (milliseconds, not seconds).
        manager = task_manager(include_path, with_defaults=False)
        if name in manager.all_tasks:
            return manager
    # lm-eval's own tasks are indexed once per process, whatever the include path: a name
    # neither there nor in the include path is unknown without indexing both together.
    defaults = task_manager(None, with_defaults=True)
    if name not in defaults.all_tasks:
        where = f" (include_path {include_path})" if include_path is not None else ""
        raise EvaluationError(f"lm-eval knows no task `{name}`{where}")
    if include_path is None:
        return defaults
    return task_manager(include_path, with_defaults=True)


@contextlib.contextmanager
def _no_context_progress_bar() -> Iterator[None]:
    """lm-eval draws a "building contexts" bar per task with no switch to turn it off; in a
    search that is one bar per evaluation, so swap in a disabled tqdm for the call.

    Two fixed costs of every ``simple_evaluate`` call go for the call too, neither changing
    a score: ``add_env_info`` (torch's ``collect_env`` runs ``pip list`` and more in
    subprocesses, ~0.25 s, for a field we never read) and compiling each document's Jinja
    template again (compiled once per template text instead). On a small model they are
    most of an accuracy measurement, and racing makes two calls."""
    import lm_eval.api.task as task_module
    import lm_eval.evaluator as evaluator_module
    import lm_eval.utils as utils_module
    from tqdm import tqdm

    saved = (task_module.tqdm, evaluator_module.add_env_info, utils_module.apply_template)
    task_module.tqdm = functools.partial(tqdm, disable=True)
    evaluator_module.add_env_info = _no_env_info
    utils_module.apply_template = _apply_template
    try:
        yield
    finally:
        task_module.tqdm, evaluator_module.add_env_info, utils_module.apply_template = saved


def _no_env_info(storage: dict[str, Any]) -> None:
    """Stands in for lm-eval's ``add_env_info``: the results' environment fields stay unset."""


@functools.lru_cache(maxsize=256)
def _template(text: str) -> Any:
    from lm_eval.utils import env

    return env.from_string(text)


def _apply_template(template: str, doc: dict[str, Any]) -> str:
    """lm-eval's ``apply_template`` (same Jinja environment), the template compiled once."""
    return str(_template(template).render(**doc))


def _main_metric(
    results: dict[str, Any], name: str, wanted: str | None = None
) -> tuple[str, float, float | None]:
    """The task's first metric under its first filter, e.g. ``exact_match,none`` or, for
    gsm8k, ``exact_match,strict-match``; a group reports its aggregate. ``wanted`` names
    the metric instead (its first filter)."""
    scores: dict[str, Any] = results["results"].get(name, {})
    config = results.get("configs", {}).get(name, {})
    metrics = [m["metric"] for m in config.get("metric_list", []) if isinstance(m, dict)]
    keys = [k for k in scores if "," in k and not k.split(",")[0].endswith("_stderr")]
    if wanted is not None:
        found = [k for k in keys if k.split(",")[0] == wanted]
        if not found:
            known = sorted({k.split(",")[0] for k in keys})
            raise EvaluationError(
                f"task `{name}` reports no metric `{wanted}` (it reports {', '.join(known)})"
            )
        keys = found
    elif metrics:  # stable sort: the first listed metric first, filters in lm-eval's order
        keys.sort(key=lambda k: k.split(",")[0] != metrics[0])
    for key in keys:
        value = finite_float(scores[key])
        if value is not None:
            metric, _, filt = key.partition(",")
            return metric, value, finite_float(scores.get(f"{metric}_stderr,{filt}"))
    raise EvaluationError(f"lm-eval returned no numeric metric for task `{name}`: {scores}")


def _n_docs(results: dict[str, Any], name: str) -> int:
    counts = results.get("n-samples", {})
    if name in counts:
        return int(counts[name]["effective"])
    members = results.get("group_subtasks", {}).get(name, [])
    return sum(_n_docs(results, member) for member in members)


def run_task(
    lm: Any, name: str, manager: Any, limit: int | None, samples: list[int] | None = None
) -> dict[str, Any]:
    """One lm-eval task on an lm-eval model object (in memory, or a server client): its main
    metric, the documents scored and the metric's standard error (lm-eval's, else the
    binomial one; ``stderr_from`` says which)."""
    from lm_eval import simple_evaluate

    with _LOCK, _no_context_progress_bar():
        results = simple_evaluate(
            model=lm,
            tasks=[name],
            task_manager=manager,
            limit=limit,
            samples={name: list(samples)} if samples is not None else None,
            log_samples=False,
            bootstrap_iters=1000,
            # Greedy decoding needs no seed; leave the caller's global RNGs untouched.
            random_seed=None,
            numpy_random_seed=None,
            torch_random_seed=None,
        )
    if results is None:  # only on non-zero ranks of a distributed run
        raise EvaluationError(f"lm-eval returned no results for task `{name}`")
    return _scores(results, name, None)


def _overlap(leaves: set[str], call: dict[str, Any]) -> bool:
    return bool(leaves & call["leaves"])


def run_tasks(
    lm: Any,
    entries: list[dict[str, Any]],
    include_path: Path | None,
    default_limit: int | None = None,
    samples: dict[str, list[int]] | None = None,
    allow_code_execution: bool = False,
) -> dict[str, dict[str, Any]]:
    """Several lm-eval tasks (or groups) on one lm-eval model object, in as few
    ``simple_evaluate`` calls as lm-eval allows: one, unless entries differ in
    ``apply_chat_template`` / ``fewshot_as_multiturn`` (call-wide in lm-eval) or share
    documents (a task listed alone and inside a group).

    ``entries`` are plain dicts: ``name`` (the configured name, the key of the answer),
    ``task`` (the lm-eval name, default ``name``), ``limit`` (default ``default_limit``),
    ``num_fewshot``, ``metric``, ``apply_chat_template``, ``fewshot_as_multiturn``.
    ``samples`` maps a configured name to the document indices to score instead of its
    limit (racing's second stage). Per-task limits and few-shot counts are set on lm-eval's
    task objects, which lm-eval takes as they are. Returns, per configured name, what
    ``run_task`` returns for one task."""
    from lm_eval import simple_evaluate

    calls: list[dict[str, Any]] = []
    with _LOCK:
        for entry in entries:
            name = str(entry["name"])
            lm_name = str(entry.get("task") or name)
            manager = find_task_manager(lm_name, include_path)
            loaded = manager.load([lm_name])
            top = loaded["groups"].get(lm_name) or loaded["tasks"].get(lm_name)
            if top is None:
                raise EvaluationError(
                    f"`{lm_name}` is an lm-eval tag, not a task or group: list its tasks "
                    "one by one"
                )
            leaves = dict(loaded["tasks"])
            fewshot = entry.get("num_fewshot")
            if fewshot is not None:
                for leaf in leaves.values():
                    leaf.set_config(key="num_fewshot", value=int(fewshot))
            wanted: dict[str, list[int]] = {}
            limit = entry.get("limit") or default_limit
            for leaf_name, leaf in leaves.items():
                if samples is not None and name in samples:
                    total = len(leaf.eval_docs)
                    wanted[leaf_name] = [i for i in samples[name] if i < total]
                elif limit is not None:
                    wanted[leaf_name] = list(range(min(int(limit), len(leaf.eval_docs))))
            options = (
                bool(entry.get("apply_chat_template")),
                bool(entry.get("fewshot_as_multiturn")),
            )
            call = next(
                (c for c in calls if c["options"] == options and not _overlap(set(leaves), c)),
                None,
            )
            if call is None:
                call = {"options": options, "objects": [], "samples": {}, "leaves": set()}
                call["manager"] = manager
                call["entries"] = []
                calls.append(call)
            call["objects"].append(top)
            call["samples"].update(wanted)
            call["leaves"] |= set(leaves)
            call["entries"].append((name, lm_name, entry.get("metric")))

        out: dict[str, dict[str, Any]] = {}
        for call in calls:
            chat, multiturn = call["options"]
            with _no_context_progress_bar():
                results = simple_evaluate(
                    model=lm,
                    tasks=call["objects"],
                    task_manager=call["manager"],
                    samples=call["samples"] or None,
                    log_samples=False,
                    bootstrap_iters=1000,
                    apply_chat_template=chat,
                    fewshot_as_multiturn=multiturn,
                    confirm_run_unsafe_code=allow_code_execution,
                    # Greedy decoding needs no seed; leave the caller's global RNGs untouched.
                    random_seed=None,
                    numpy_random_seed=None,
                    torch_random_seed=None,
                )
            if results is None:  # only on non-zero ranks of a distributed run
                raise EvaluationError("lm-eval returned no results")
            for name, lm_name, metric_name in call["entries"]:
                out[name] = _scores(results, lm_name, metric_name)
    return out


def _scores(results: dict[str, Any], name: str, wanted: str | None) -> dict[str, Any]:
    metric, value, reported = _main_metric(results, name, wanted)
    n = _n_docs(results, name)
    stderr, stderr_from = accuracy_stderr(value, n, reported)
    counts = results.get("n-samples", {}).get(name, {})
    aggregation = _aggregation(results, name, metric)
    return {
        **({"available": int(counts["original"])} if "original" in counts else {}),
        **({"aggregation": aggregation} if aggregation is not None else {}),
        "accuracy": value,
        "metric": metric,
        "n": n,
        "stderr": stderr,
        "stderr_from": stderr_from,
        "task": name,
    }


def score_tasks(
    lm: Any,
    entries: list[dict[str, Any]],
    include_path: Path | None,
    limit: int | None = None,
    samples: dict[str, list[int]] | None = None,
    allow_code_execution: bool = False,
) -> dict[str, Any]:
    """``run_tasks`` on ``entries`` and their scores combined by the entries' weights
    (``combine_tasks``): what both back ends record as the accuracy."""
    scores = run_tasks(
        lm,
        entries,
        include_path,
        default_limit=limit,
        samples=samples,
        allow_code_execution=allow_code_execution,
    )
    weights = {str(e["name"]): float(e.get("weight", 1.0)) for e in entries}
    return combine_tasks(scores, weights)


def combine_tasks(scores: dict[str, dict[str, Any]], weights: dict[str, float]) -> dict[str, Any]:
    """One accuracy from per-task scores: the weighted mean, its standard error
    sqrt(sum((w_i / W)^2 se_i^2)) (the tasks' documents are independent; None when a task
    has none), ``n`` the documents scored in all. ``tasks`` keeps each task's ``score``,
    ``stderr``, ``n``, ``metric`` and ``weight`` (and what lm-eval said besides)."""
    total = sum(weights[name] for name in scores)
    mean = sum(weights[name] * float(s["accuracy"]) for name, s in scores.items()) / total
    errors = [s.get("stderr") for s in scores.values()]
    stderr: float | None = None
    if len(errors) == 1:  # the task's own, exactly (not sqrt(se^2), one rounding off)
        stderr = None if errors[0] is None else float(errors[0])
    elif all(e is not None for e in errors):
        stderr = math.sqrt(
            sum(
                (weights[name] / total) ** 2 * float(s["stderr"]) ** 2
                for name, s in scores.items()
            )
        )
    tasks = {
        name: {
            **{k: v for k, v in s.items() if k != "accuracy"},
            "score": float(s["accuracy"]),
            "weight": weights[name],
        }
        for name, s in scores.items()
    }
    if len(scores) == 1:
        (only,) = scores.values()
        combined = {**only, "stderr": stderr, "task": only["task"]}
    else:
        froms = {s.get("stderr_from") for s in scores.values()}
        combined = {
            "metric": "weighted mean of "
            + ", ".join(
                f"`{name}` {s['metric']} (weight {weights[name]:g})" for name, s in scores.items()
            ),
            "stderr_from": "combined from the tasks' ("
            + ", ".join(sorted(str(f) for f in froms))
            + ")",
            "task": ", ".join(scores),
        }
    return {
        **combined,
        "accuracy": mean,
        "n": sum(int(s["n"]) for s in scores.values()),
        "stderr": stderr,
        "tasks": tasks,
    }


def _aggregation(results: dict[str, Any], name: str, metric: str) -> str | None:
    """How the task aggregates ``metric`` over documents, when its config names it (``mean``:
    the scores of two sets of documents combine into the score of both)."""
    config = results.get("configs", {}).get(name, {})
    for entry in config.get("metric_list", []):
        if isinstance(entry, dict) and entry.get("metric") == metric:
            aggregation = entry.get("aggregation")
            return aggregation if isinstance(aggregation, str) else None
    return None


__all__ = [
    "combine_tasks",
    "find_task_manager",
    "quiet_lm_eval_logging",
    "run_task",
    "run_tasks",
    "task_manager",
]
