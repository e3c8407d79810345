"""Task accuracy of a served model: lm-evaluation-harness against the server's
OpenAI-compatible completions endpoint (lm-eval's ``local-completions`` model type), with
the same task lookup and metric choice as the transformers back end."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from evo_compress.fitness.model.tasks import (
    find_task_manager,
    quiet_lm_eval_logging,
    run_task,
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


def measure_server_accuracy(
    base_url: str,
    served_model: str,
    tokenizer: Path,
    task: str,
    include_path: Path | None = None,
    limit: int | None = None,
    concurrency: int = 1,
    timeout_s: float = 300.0,
) -> dict[str, Any]:
    """Run one lm-eval task against ``base_url``. Prompts go as text (not token ids), so any
    OpenAI-compatible completions server works; ``tokenizer`` (the served checkpoint's) is
    what lm-eval uses to count context length. Returns what ``measure_accuracy`` returns."""
    start = time.perf_counter()
    set_hf_cache_env(default_cache_dir())
    quiet_lm_eval_logging()
    manager = find_task_manager(task, include_path)
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
    scores = run_task(lm, task, manager, limit)
    return {
        **scores,
        "seconds": time.perf_counter() - start,
        "via": f"lm-eval local-completions at {base_url}",
    }
