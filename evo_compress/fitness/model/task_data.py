"""The tasks of a real-model back end as plain data, computed once in the search process
(``prepare``): each configured task's lm-eval name and options, the latency prompts (the
tasks' documents or a file, cut to the served context) and the calibration / recovery
texts. Shared by the transformers and vLLM back ends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evo_compress.config import ModelConfig
from evo_compress.exceptions import ConfigError, EvaluationError
from evo_compress.fitness.model._base import (
    REFERENCE_TASK,
    CalibrationSettings,
    TaskEntry,
    prepare_model_and_task,
    resolved_calibration,
    task_entries,
)


def prepare_tasks(
    config: Any,
    model: ModelConfig,
    latency_prompts: int,
    min_new_tokens: int | None = None,
) -> tuple[Path, dict[str, Any]]:
    """The model folder and ``task_data`` of a back end's validated settings (``tasks`` or
    ``task``, ``task_include_path``, ``calibration`` and its shorthands,
    ``latency_prompt_file``, ``allow_code_execution``, ``max_new_tokens``)."""
    entries = task_entries(config)
    calibration = resolved_calibration(config)
    reference = entries[0].name == REFERENCE_TASK
    model_path, task = prepare_model_and_task(
        model,
        REFERENCE_TASK if reference else entries[0].name,
        config.task_include_path,
        None,
    )
    return model_path, task_data(
        config, entries, calibration, model_path, task, latency_prompts, min_new_tokens
    )


def task_data(
    config: Any,
    entries: list[TaskEntry],
    calibration: CalibrationSettings,
    model_path: Path,
    reference: dict[str, Any],
    latency_prompts: int,
    min_new_tokens: int | None = None,
) -> dict[str, Any]:
    """``payload["task"]``: ``entries`` (lm-eval name and options of each configured task),
    ``prompts`` (latency, up to ``max(64, latency_prompts)`` of the tasks' documents, cut
    to the served context less ``config.max_new_tokens``), ``train_texts`` (calibration and
    recovery, cut to ``max_tokens``), ``calibration_samples``; ``name`` and
    ``include_path`` as before.

    A context with no room for a prompt and ``max_new_tokens`` is a config error, unless
    the back end can ask fewer output tokens: ``min_new_tokens`` is then the room kept
    (the vLLM back end fits its requests to the served context itself)."""
    from transformers import AutoTokenizer

    from evo_compress.fitness.model import texts as T
    from evo_compress.fitness.model.tasks import find_task_manager, quiet_lm_eval_logging

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    for i, entry in enumerate(entries):
        if entry.apply_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"`evaluator.settings.tasks[{i}].apply_chat_template`: the tokenizer of "
                f"`model.id` {model_path} has no chat template"
            )
    is_reference = entries[0].name == REFERENCE_TASK
    include = reference.get("include_path")
    include_path = Path(include) if include else None
    lm_names = [reference["name"] if is_reference else e.name for e in entries]
    wanted_prompts = max(64, int(latency_prompts))
    wanted_texts = max(calibration.samples, T.RECOVERY_TEXTS)
    leaves: dict[str, list[Any]] = {}
    # Loaded even when neither prompts nor calibration come from them: an unknown name, an
    # unreachable data set or a code task is then refused before any evaluation.
    if not is_reference:
        quiet_lm_eval_logging()
        field = "tasks" if config.tasks else "task"
        for name in lm_names:
            try:
                manager = find_task_manager(name, include_path)
            except EvaluationError as exc:
                raise ConfigError(f"`evaluator.settings.{field}`: {exc}") from None
            try:
                leaves.update(T.load_tasks([name], manager))
            except Exception as exc:  # offline, not cached, a broken YAML: one clear line
                why = str(exc).splitlines()[0] if str(exc) else ""
                raise EvaluationError(
                    f"`evaluator.settings.{field}`: cannot load lm-eval task `{name}` (its data "
                    f"set is neither in the Hugging Face cache nor reachable, or its YAML is "
                    f"broken): {type(exc).__name__}: {why}"
                ) from None
    all_leaves = [t for name in lm_names for t in leaves.get(name, [])]
    unsafe = [t.task_name for t in all_leaves if getattr(t, "UNSAFE_CODE", False)]
    if unsafe and not config.allow_code_execution:
        raise ConfigError(
            f"`evaluator.settings.allow_code_execution`: task `{unsafe[0]}` runs code the "
            "model writes; set `allow_code_execution: true` to let it"
        )
    if config.latency_prompt_file is not None:
        prompts = T.read_prompt_file(config.latency_prompt_file)
    elif is_reference:
        prompts = list(reference["prompts"])
    else:
        prompts = T.document_prompts(all_leaves, wanted_prompts)
        if not prompts:
            raise ConfigError(
                "no latency prompts: the tasks have no test or validation documents; set "
                "`evaluator.settings.latency_prompt_file`"
            )
    context = T.served_context(tokenizer, model_path)
    if context is not None:
        room = context - int(config.max_new_tokens)
        if room < 1 and min_new_tokens is not None:
            room = context - int(min_new_tokens)
        if room < 1:
            raise ConfigError(
                f"`evaluator.settings.max_new_tokens` ({config.max_new_tokens}) leaves no room "
                f"for a prompt in the model's context of {context} tokens"
            )
        prompts = T.truncate_tokens(tokenizer, prompts, room, keep="tail")
    if calibration.source == "task" and is_reference:
        train_texts = list(reference["train_texts"])
    else:
        train_texts = T.calibration_texts(calibration, all_leaves, wanted_texts)
    train_texts = T.truncate_tokens(tokenizer, train_texts, calibration.max_tokens, keep="head")
    return {
        "name": lm_names[0],
        "include_path": include,
        "entries": [
            {**entry.model_dump(mode="json"), "task": lm_name}
            for entry, lm_name in zip(entries, lm_names, strict=True)
        ],
        "train_texts": train_texts,
        "prompts": prompts,
        "calibration_samples": calibration.samples,
    }


__all__ = ["prepare_tasks", "task_data"]
