"""What the back ends that evaluate a real model (transformers, vLLM) share before any
model is loaded: the model folder and task prepared once, settings parsed with one-line
errors, what identifies the weights, and plain-data metadata.
"""

from __future__ import annotations

import hashlib
import platform
from abc import abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from evo_compress.config import ModelConfig, format_validation_error
from evo_compress.exceptions import ConfigError, EvaluationError
from evo_compress.fitness._base import EvaluationContext, Evaluator

REFERENCE_MODEL = "reference"  # `model.id` of the project's own trained model
REFERENCE_TASK = "reference"  # `evaluator.settings.task` of the project's addition task


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class ModelEvaluator(Evaluator):
    """What the back ends that evaluate a real model (transformers, vLLM) share: the model
    folder and task prepared once, per-evaluation torch ``threads`` in ``config``, and
    whether the resolved ``device`` is a GPU."""

    config: Any  # the back end's validated settings (task, threads, ...)

    def __init__(self, settings: Mapping[str, Any], context: EvaluationContext) -> None:
        super().__init__(settings, context)
        self._model_path: Path | None = None
        self._task: dict[str, Any] | None = None

    @property
    @abstractmethod
    def device(self) -> str:
        """``hardware.device`` resolved (auto: cuda when a GPU is seen, else cpu)."""

    def prepare(self) -> None:
        """Train (once per machine) or locate the model; write the reference task files.
        Idempotent: a second call does nothing."""
        if self._model_path is not None and self._task is not None:
            return
        self._model_path, self._task = prepare_model_and_task(
            self.context.model,
            self.config.task,
            self.config.task_include_path,
            self.config.calibration_file,
        )

    def scored_tasks(self) -> tuple[str, tuple[str, ...]] | None:
        return settings_tasks(self.settings)

    def shared_paths(self) -> list[Path]:
        paths = [self._model_path] if self._model_path is not None else []
        include = (self._task or {}).get("include_path")
        return paths + ([Path(include)] if include else [])

    def uses_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def threads(self) -> int | None:
        return int(self.config.threads)

    def with_threads(self, threads: int) -> Evaluator:
        if threads == self.config.threads:
            return self
        return type(self)({**self.settings, "threads": threads}, self.context)


class TaskEntry(BaseModel):
    """One entry of ``evaluator.settings.tasks``: an lm-eval task (or group) and how it is
    scored and weighed in the accuracy objective."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="lm-eval task or group name")
    weight: float = Field(1.0, gt=0, description="Weight in the accuracy's weighted mean")
    limit: int | None = Field(None, ge=1, description="Score at most this many documents")
    num_fewshot: int | None = Field(None, ge=0)
    metric: str | None = Field(None, description="Default: the task's first listed metric")
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False


class CalibrationSettings(BaseModel):
    """``evaluator.settings.calibration``: where calibration (Wanda, AWQ, GPTQ) and recovery
    text comes from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["task", "file", "hf"] = "task"
    path: Path | None = Field(None, description="file: .txt (a text a line) or .jsonl")
    name: str | None = Field(None, description="hf: data set name or local folder")
    split: str | None = Field(None, description="hf: split (default: train)")
    column: str = Field("text", min_length=1, description="jsonl / hf: the text column")
    subset: str | None = Field(None, description="hf: configuration name")
    samples: int = Field(64, ge=1, description="Calibration texts")
    max_tokens: int = Field(512, ge=1, description="Each text truncated to this many tokens")


class TaskSettings(BaseModel):
    """The settings both real-model back ends take for their tasks, calibration and
    recovery text (docs/config.md, "Tasks")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str = Field(REFERENCE_TASK, description="lm-eval task name, or `reference`")
    tasks: list[TaskEntry] | None = Field(
        None, description="Several lm-eval tasks, weighed; instead of `task`"
    )
    task_include_path: Path | None = Field(None, description="Folder of extra lm-eval YAMLs")
    limit: int | None = Field(None, ge=1, description="Evaluate at most this many task docs")
    allow_code_execution: bool = Field(
        False, description="Let lm-eval run code tasks (its `confirm_run_unsafe_code`)"
    )
    calibration: CalibrationSettings | None = Field(
        None, description="Where calibration and recovery text comes from"
    )
    calibration_file: Path | None = Field(
        None, description="Shorthand for calibration {source: file, path: ...}"
    )
    calibration_samples: int | None = Field(
        None, ge=1, description="Shorthand for calibration.samples (default 64)"
    )
    latency_prompt_file: Path | None = Field(
        None, description="Latency prompts, one a line (default: the tasks' documents)"
    )
    recovery_lr: float = Field(1e-3, gt=0)
    recovery_batch_size: int = Field(16, ge=1)


def resolved_calibration(config: Any) -> CalibrationSettings:
    """``calibration`` with the shorthands ``calibration_file`` / ``calibration_samples``
    folded in; a config error when a shorthand and ``calibration`` set the same thing."""
    calibration = getattr(config, "calibration", None) or CalibrationSettings()
    given = calibration.model_fields_set
    update: dict[str, Any] = {}
    file = getattr(config, "calibration_file", None)
    if file is not None:
        if given & {"source", "path"}:
            raise ConfigError(
                "`evaluator.settings.calibration_file` and `evaluator.settings.calibration` "
                "both say where calibration text comes from: keep one"
            )
        update.update(source="file", path=file)
    samples = getattr(config, "calibration_samples", None)
    if samples is not None:
        if "samples" in given:
            raise ConfigError(
                "`evaluator.settings.calibration_samples` and "
                "`evaluator.settings.calibration.samples` are both set: keep one"
            )
        update["samples"] = samples
    resolved = calibration.model_copy(update=update)
    if resolved.source == "file" and resolved.path is None:
        raise ConfigError("`evaluator.settings.calibration.path` is required for source `file`")
    if resolved.source == "hf" and not resolved.name:
        raise ConfigError("`evaluator.settings.calibration.name` is required for source `hf`")
    return resolved


def task_entries(config: Any) -> list[TaskEntry]:
    """The tasks a back end's settings name: ``tasks``, else the single ``task`` (weight 1,
    the run-wide ``limit``)."""
    tasks = getattr(config, "tasks", None)
    if tasks:
        return list(tasks)
    return [TaskEntry(name=getattr(config, "task", REFERENCE_TASK))]


def _check_tasks(config: Any) -> None:
    tasks = getattr(config, "tasks", None)
    if tasks is None:
        return
    if "task" in config.model_fields_set:
        raise ConfigError(
            "`evaluator.settings.task` and `evaluator.settings.tasks` are both set: use "
            "`tasks` (a list) alone"
        )
    if not tasks:
        raise ConfigError("`evaluator.settings.tasks` must name at least one task, got []")
    names = [entry.name for entry in tasks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"`evaluator.settings.tasks` names {twice[0]!r} more than once")
    if REFERENCE_TASK in names and len(names) > 1:
        raise ConfigError(
            "`evaluator.settings.tasks`: the `reference` task cannot be combined with others"
        )


_Settings = TypeVar("_Settings", bound=BaseModel)


def settings_tasks(settings: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
    """The setting of a real-model back end's (unparsed) settings that names its lm-eval
    tasks and their names: ``tasks`` (entries ``{name: ...}`` or bare names), else ``task``
    (default: the reference task). Read without the back end, so that `validate` can check
    every section of `evaluator.name: auto`; malformed entries are the back end's to report."""
    tasks = settings.get("tasks")
    if isinstance(tasks, (list, tuple)) and tasks:
        names = []
        for entry in tasks:
            name = entry.get("name") if isinstance(entry, Mapping) else entry
            if isinstance(name, str):
                names.append(name)
        return "tasks", tuple(names)
    task = settings.get("task", REFERENCE_TASK)
    return "task", (task,) if isinstance(task, str) else ()


def parse_model_settings(
    cls: type[_Settings], settings: Mapping[str, Any], context: EvaluationContext
) -> _Settings:
    """A real-model back end's ``evaluator.settings``, validated; one-line errors name the
    field. The reference model only knows its own task."""
    try:
        config = cls.model_validate(dict(settings))
    except ValidationError as exc:
        message = format_validation_error(exc, "", prefix="evaluator.settings.")
        raise ConfigError(message.removeprefix(": ")) from None
    _check_tasks(config)
    if hasattr(config, "calibration"):
        resolved_calibration(config)
    field = "tasks" if getattr(config, "tasks", None) else "task"
    for entry in task_entries(config):
        if context.model.id == REFERENCE_MODEL and entry.name != REFERENCE_TASK:
            raise ConfigError(
                f"`evaluator.settings.{field}`: the reference model only knows the "
                f"`reference` task, got `{entry.name}`"
            )
    return config


def model_fingerprint(model: ModelConfig) -> str:
    """What identifies the weights: the reference model's training recipe, or a local
    folder's config and weight files (names, sizes), or the hub id and revision."""
    if model.id == REFERENCE_MODEL:
        from evo_compress.reference import REFERENCE_VERSION

        return f"reference:{REFERENCE_VERSION}"
    folder = Path(model.id)
    if folder.is_dir():
        digest = hashlib.sha256()
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix in {".json", ".safetensors", ".bin", ".model"}:
                digest.update(path.name.encode())
                digest.update(str(path.stat().st_size).encode())
                if path.suffix == ".json":
                    digest.update(path.read_bytes())
        return f"folder:{digest.hexdigest()}"
    return f"hub:{model.id}@{model.revision or 'main'}"


def prepare_model_and_task(
    model: ModelConfig,
    task: str,
    task_include_path: Path | None,
    calibration_file: Path | None,
) -> tuple[Path, dict[str, Any]]:
    """The model folder (the reference model trained once per machine, a local folder, or
    a hub download) and the task as plain data (name, include path, calibration and
    training texts, latency prompts). Shared by the transformers and vLLM back ends."""
    from evo_compress.reference import (
        default_cache_dir,
        ensure_reference_model,
        ensure_reference_task,
        set_hf_cache_env,
    )

    cache_dir = default_cache_dir()
    set_hf_cache_env(cache_dir)
    if model.id == REFERENCE_MODEL:
        model_path = ensure_reference_model(cache_dir, progress=True)
    elif Path(model.id).is_dir():
        model_path = Path(model.id).resolve()
    else:
        model_path = _download(model.id, model.revision)
    if task == REFERENCE_TASK:
        spec = ensure_reference_task(cache_dir)
        return model_path, {
            "name": spec.name,
            "include_path": str(spec.include_path),
            # Calibration and recovery use the first few hundred; the worker gets no more.
            "train_texts": list(spec.train_texts[:2048]),
            "prompts": list(spec.prompts),
        }
    return model_path, {
        "name": task,
        "include_path": str(task_include_path or "") or None,
        "train_texts": _read_lines(calibration_file),
        "prompts": None,
    }


def _read_lines(path: Path | None) -> list[str] | None:
    if path is None:
        return None
    try:
        return [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise ConfigError(
            f"`evaluator.settings.calibration_file`: cannot read {path}: {exc.strerror}"
        ) from None


def _download(model_id: str, revision: str | None) -> Path:
    """A hub model through the Hugging Face cache (inside the project's cache folder)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, revision=revision))
    except Exception as exc:  # offline, unknown repo, gated model: all one clear line
        raise EvaluationError(
            f"`model.id` {model_id!r} is neither a local folder nor a model that could be "
            f"fetched from the hub ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        ) from None


def plain(value: Any) -> Any:
    """JSON-able copy: tensors and numpy scalars become numbers, everything else text."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        try:
            return value.item()
        except (ValueError, RuntimeError):
            pass
    return str(value)
