"""The project's own reference model and task, so evo-compress works fully offline.

A character tokenizer, a synthetic addition task (also an lm-eval task backed by local
files) and a ~1M-parameter Llama trained on it by the project, cached under
``default_cache_dir()``. Importing this package is cheap: torch and transformers are imported
by the functions that need them.
"""

from evo_compress.reference._cache import default_cache_dir, set_hf_cache_env
from evo_compress.reference.model import (
    MIN_ACCURACY,
    REFERENCE_VERSION,
    TrainingSettings,
    ensure_reference_model,
    greedy_exact_match,
    read_reference_info,
    reference_model_dir,
    train_reference_model,
)
from evo_compress.reference.task import (
    AdditionSplits,
    Problem,
    TaskSpec,
    ensure_reference_task,
    make_splits,
)
from evo_compress.reference.tokenizer import build_tokenizer

__all__ = [
    "MIN_ACCURACY",
    "REFERENCE_VERSION",
    "AdditionSplits",
    "Problem",
    "TaskSpec",
    "TrainingSettings",
    "build_tokenizer",
    "default_cache_dir",
    "ensure_reference_model",
    "ensure_reference_task",
    "greedy_exact_match",
    "make_splits",
    "read_reference_info",
    "reference_model_dir",
    "set_hf_cache_env",
    "train_reference_model",
]
