"""What the real-model back ends (transformers, vLLM) share: preparing the model and task
(``_base.py``) and the tasks' data, prompts and calibration texts (``task_data.py``,
``texts.py``), loading a model and compressing its weights (``load.py``, ``compress.py``
with ``prune.py``, ``recover.py``, ``quantize.py``: the kernels of the compression methods)
and lm-eval tasks (``tasks.py``) with racing's two stages over them (``stages.py``).

Importing this package loads no torch: the modules that need it are imported by name.
"""

from evo_compress.fitness.model._base import (
    REFERENCE_MODEL,
    REFERENCE_TASK,
    ModelEvaluator,
    cpu_name,
    model_fingerprint,
    parse_model_settings,
    plain,
    prepare_model_and_task,
    settings_tasks,
    task_entries,
)

__all__ = [
    "REFERENCE_MODEL",
    "REFERENCE_TASK",
    "ModelEvaluator",
    "cpu_name",
    "model_fingerprint",
    "parse_model_settings",
    "plain",
    "prepare_model_and_task",
    "settings_tasks",
    "task_entries",
]
