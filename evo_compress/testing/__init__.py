"""Test doubles and helpers for evo-compress and its plugins (Optuna's ``optuna.testing``).

Production code never imports this package. ``contracts`` has the suites every evaluator
and operator passes (pytest needed); ``methods`` the contract every compression method passes
on each back end it claims; ``tasks`` a back end that records per-task scores
(``metadata["tasks"]``) over the synthetic landscape. The large stand-ins (a fake LLM provider,
a CPU stand-in for ``vllm serve``) are the separate distribution ``evo-compress-doubles`` in
the repository's ``doubles/`` folder, so they do not ship in the wheel.
"""

from evo_compress.testing._helpers import (
    CACHE_CORRUPTIONS,
    CLI,
    SEED_MAX,
    Messages,
    PidFileEvaluator,
    assert_one_line_error,
    corrupt_cache,
    crash_evaluations,
    final_state,
    invoke_cli,
    pins_except,
    resume_search,
    rng,
    run_cli,
    run_search,
    samples,
    save_random_llama,
    search_front,
    worker_allocate,
    worker_crash,
    worker_echo,
    worker_env,
    worker_print_then_raise,
    worker_raise,
    worker_sleep,
)
from evo_compress.testing.tasks import TaskScoresEvaluator, register_task_evaluator

__all__ = [
    "CACHE_CORRUPTIONS",
    "CLI",
    "SEED_MAX",
    "Messages",
    "PidFileEvaluator",
    "TaskScoresEvaluator",
    "assert_one_line_error",
    "corrupt_cache",
    "crash_evaluations",
    "final_state",
    "invoke_cli",
    "pins_except",
    "register_task_evaluator",
    "resume_search",
    "rng",
    "run_cli",
    "run_search",
    "samples",
    "save_random_llama",
    "search_front",
    "worker_allocate",
    "worker_crash",
    "worker_echo",
    "worker_env",
    "worker_print_then_raise",
    "worker_raise",
    "worker_sleep",
]
