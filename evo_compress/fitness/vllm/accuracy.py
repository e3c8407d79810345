"""Task accuracy of a served model: lm-evaluation-harness against the server's
OpenAI-compatible completions endpoint (lm-eval's ``local-completions`` model type), with
the same task lookup, metric choice and weighting of several tasks as the transformers back
end (``fitness.model.tasks``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from evo_compress.fitness.model.tasks import (
    quiet_lm_eval_logging,
    score_tasks,
)
from evo_compress.reference import default_cache_dir, set_hf_cache_env


def _quiet_completions(**kwargs: Any) -> Any:
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    class QuietCompletions(LocalCompletionsAPI):
        def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().generate_until(requests, disable_tqdm=True)

        def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().loglikelihood(requests, disable_tqdm=True)

    return QuietCompletions(**kwargs)


def measure_server_tasks(
    base_url: str,
    served_model: str,
    tokenizer: Path,
    entries: list[dict[str, Any]],
    include_path: Path | None = None,
    limit: int | None = None,
    samples: dict[str, list[int]] | None = None,
    concurrency: int = 1,
    timeout_s: float = 300.0,
    allow_code_execution: bool = False,
) -> dict[str, Any]:
    """Score ``entries`` (``task_data``'s: name, lm-eval task, weight and per-task options)
    against ``base_url`` and combine them (``combine_tasks``); ``limit`` is the default
    per-task limit. Prompts go as text (not token ids), so any OpenAI-compatible completions
    server works; ``tokenizer`` (the served checkpoint's) is what lm-eval uses to count
    context length. ``samples`` (per configured name) scores those documents instead of the
    first ones (racing's second stage). Returns what the transformers back end's
    ``measure_tasks`` returns."""
    start = time.perf_counter()
    set_hf_cache_env(default_cache_dir())
    quiet_lm_eval_logging()
    lm = _quiet_completions(
        base_url=f"{base_url.rstrip('/')}/v1/completions",
        model=served_model,
        tokenizer=str(tokenizer),
        tokenizer_backend="huggingface",
        tokenized_requests=False,
        num_concurrent=concurrency,
        max_retries=3,
        timeout=int(timeout_s),
    )
    scores = score_tasks(lm, entries, include_path, limit, samples, allow_code_execution)
    return {
        **scores,
        "seconds": time.perf_counter() - start,
        "via": f"lm-eval local-completions at {base_url}",
    }
