"""Task accuracy of an in-memory Hugging Face model, measured by lm-evaluation-harness.

``measure_accuracy`` wraps the model in lm-eval's ``HFLM`` (no reload from disk, so a
compressed model is measured as it is) and runs ``simple_evaluate`` on one task: the project's
reference task (a ``TaskSpec`` or its name plus ``include_path``) or any lm-eval task name
(``fitness/model/tasks.py`` finds and scores it). ``measure_tasks`` scores several tasks with
weights and combines them into one accuracy (``fitness.model.tasks.combine_tasks``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evo_compress.fitness.model.tasks import (
    find_task_manager,
    quiet_lm_eval_logging,
    run_task,
    score_tasks,
)
from evo_compress.reference import TaskSpec, default_cache_dir, set_hf_cache_env

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase


def _quiet_hflm(model: Any, tokenizer: Any, batch_size: int) -> Any:
    """HFLM without its per-request progress bars (one evaluation of many in a search)."""
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().generate_until(requests, disable_tqdm=True)

        def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

    return QuietHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def measure_accuracy(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: str | TaskSpec,
    include_path: Path | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    samples: list[int] | None = None,
) -> dict[str, Any]:
    """Run one lm-eval task on ``model`` as it is in memory.

    ``task`` is a ``TaskSpec`` (its ``include_path`` is used) or an lm-eval task name, looked
    up in ``include_path`` first and then among lm-eval's built-in tasks. The model is moved
    to ``device`` if it is elsewhere. Returns ``accuracy`` (the task's main metric, e.g.
    ``exact_match``), ``metric``, ``n`` (documents scored), ``stderr`` (lm-eval's, else
    the binomial sqrt(p(1-p)/(n-1)); None for a single document), ``stderr_from``,
    ``seconds`` (wall time, loading the task included) and ``task``; ``available`` (the
    task's documents, when one task) and ``aggregation`` (of the main metric, when named).
    ``samples`` (instead of ``limit``) scores only the documents at those indices: racing
    scores the first k documents with ``limit`` and the rest this way.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"`limit` must be >= 1 or None, got {limit}")
    if isinstance(task, TaskSpec):
        name, include_path = task.name, task.include_path
    else:
        name = task
    start = time.perf_counter()
    # Before lm-eval imports `datasets`: keep every Hugging Face cache in the project's.
    set_hf_cache_env(default_cache_dir())
    quiet_lm_eval_logging()
    manager = find_task_manager(name, include_path)
    current = next(model.parameters()).device
    if current.type != device.split(":")[0] or (":" in device and str(current) != device):
        model.to(device)
    was_training = model.training
    model.eval()
    try:
        lm = _quiet_hflm(model, tokenizer, batch_size)
        scores = run_task(lm, name, manager, limit, samples)
    finally:
        model.train(was_training)
    return {**scores, "seconds": time.perf_counter() - start}


def _on_device(model: Any, device: str) -> None:
    current = next(model.parameters()).device
    if current.type != device.split(":")[0] or (":" in device and str(current) != device):
        model.to(device)


def measure_tasks(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    entries: list[dict[str, Any]],
    include_path: Path | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    samples: dict[str, list[int]] | None = None,
    allow_code_execution: bool = False,
) -> dict[str, Any]:
    """Score ``entries`` (``payload["task"]["entries"]``: name, lm-eval task, weight and
    per-task options) on ``model`` as it is in memory, and combine them (``combine_tasks``).
    ``limit`` is the default per-task limit; ``samples`` (per configured name) scores those
    documents instead."""
    start = time.perf_counter()
    set_hf_cache_env(default_cache_dir())
    quiet_lm_eval_logging()
    _on_device(model, device)
    was_training = model.training
    model.eval()
    try:
        lm = _quiet_hflm(model, tokenizer, batch_size)
        scores = score_tasks(lm, entries, include_path, limit, samples, allow_code_execution)
    finally:
        model.train(was_training)
    return {**scores, "seconds": time.perf_counter() - start}


__all__ = ["measure_accuracy", "measure_tasks"]
