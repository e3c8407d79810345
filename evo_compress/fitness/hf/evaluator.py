"""The transformers back end: apply a recipe to a real causal LM and measure five objectives.

The search process only validates settings, resolves the model and task and fingerprints
them; every evaluation runs in its own worker process (``fitness.worker``), where
``pipeline.evaluate_in_worker`` loads the model, applies the recipe (``apply.py``, with
the shared weight compression of ``fitness/model/``) and measures it (``measure.py``,
``accuracy.py``, ``fitness/energy.py``).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from evo_compress.exceptions import ConfigError, EvaluationError
from evo_compress.fitness._base import EvaluationContext, EvaluationResult, Placement
from evo_compress.fitness.model import (
    REFERENCE_TASK,
    ModelEvaluator,
    cpu_name,
    model_fingerprint,
    parse_model_settings,
    prepare_model_and_task,
)
from evo_compress.fitness.model._base import (
    CalibrationSettings,
    TaskEntry,
    resolved_calibration,
    task_entries,
)
from evo_compress.fitness.racing import RaceRule
from evo_compress.fitness.worker import WorkerLimits, run_in_worker

if TYPE_CHECKING:
    from evo_compress.fitness.model.memory import MemoryEstimate, MemoryGuard
from evo_compress.genomes import Recipe, SearchSpace
from evo_compress.methods import METHODS

_ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2", "flashinfer")
_PRELOAD = ("evo_compress.fitness.hf._preload",)


class TransformersSettings(BaseModel):
    """``evaluator.settings`` of the transformers back end (docs/config.md lists them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str = Field(REFERENCE_TASK, description="lm-eval task name, or `reference`")
    tasks: list[TaskEntry] | None = Field(
        None, description="Several lm-eval tasks, weighed; instead of `task`"
    )
    task_include_path: Path | None = Field(None, description="Folder of extra lm-eval YAMLs")
    limit: int | None = Field(None, ge=1, description="Evaluate at most this many task docs")
    eval_batch_size: int = Field(32, ge=1)
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
    latency_prompts: int = Field(16, ge=1, description="Prompts per latency batch round")
    max_new_tokens: int = Field(8, ge=1)
    latency_repeats: int = Field(3, ge=1)
    threads: int = Field(2, ge=1, description="torch threads in the worker")
    watts_per_core: float = Field(
        15.0, gt=0, description="CPU energy estimate where no power counter can be read"
    )
    timeout_s: float = Field(900.0, gt=0)
    memory_limit_mib: float | None = Field(
        None, gt=0, description="Worker memory limit (default: 75% of the machine's RAM)"
    )
    seed: int = Field(0, ge=0)
    gradient_checkpointing: bool = Field(
        True, description="Recompute activations in recovery's backward pass (less memory)"
    )


def _machine_memory_mib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    except (ValueError, OSError):
        return 8192.0


class TransformersEvaluator(ModelEvaluator):
    """Applies recipes with transformers, torchao, bitsandbytes and peft (pruning is
    ``fitness/model/prune.py``); measures accuracy with lm-eval and serving latency, memory
    and energy itself."""

    name: ClassVar[str] = "transformers"
    supports_racing: ClassVar[bool] = True

    def __init__(self, settings: Mapping[str, Any], context: EvaluationContext) -> None:
        super().__init__(settings, context)
        self.config = parse_model_settings(TransformersSettings, settings, context)
        self._device: str | None = None
        self._capabilities: dict[str, Collection[Any] | None] | None = None
        self._arch_config: tuple[Path, Any] | None = None
        self._arch_caps: tuple[Any, dict[str, Collection[Any] | None]] | None = None
        self._memory: MemoryGuard | None = None

    # ------------------------------------------------------------------ environment
    @property
    def device(self) -> str:
        """``hardware.device`` resolved: auto means CUDA when torch sees a GPU."""
        if self._device is None:
            wanted = self.context.hardware.device
            if wanted == "auto":
                import torch

                wanted = "cuda" if torch.cuda.is_available() else "cpu"
            self._device = wanted
        return self._device

    def _usable_device(self) -> str:
        """``device``, refused in one line when it is CUDA and torch sees none: else the first
        CUDA call fails deep inside a probe. Not part of ``validate``, which checks a GPU
        config on any machine."""
        wanted = self.device
        if wanted.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise EvaluationError(
                    f"`hardware.device` is {wanted} but torch sees no CUDA GPU on this machine"
                )
        return wanted

    def capabilities(self) -> Mapping[str, Collection[Any] | None]:
        if self._capabilities is None:  # probed once: it imports and tries the kernels
            self._capabilities = self._probe_capabilities()
        config = self._model_config()
        if config is None:
            return self._capabilities
        if self._arch_caps is None or self._arch_caps[0] is not config:
            from evo_compress.fitness.model.architecture import allowed_values

            # What the device can run, narrowed to what the model's architecture can take.
            caps = dict(self._capabilities)
            for gene, values in allowed_values(config).items():
                # A sliding window is a question of the model alone (the probe above, without
                # a model, can only say no): the architecture decides it.
                device_ok = None if gene == "kv.sliding_window" else caps.get(gene)
                caps[gene] = [v for v in values if device_ok is None or v in device_ok]
            self._arch_caps = (config, caps)
        return self._arch_caps[1]

    def _model_config(self) -> Any | None:
        """The model's transformers config (``config.json``, no weights), when its folder is
        known without preparing: a local ``model.id`` folder or an already prepared model.
        None otherwise (a hub model not fetched yet: ``_run`` checks after preparing)."""
        path = self._model_path
        if path is None and Path(self.context.model.id).is_dir():
            path = Path(self.context.model.id)
        if path is None:
            return None
        if self._arch_config is None or self._arch_config[0] != path:
            from evo_compress.fitness.model.architecture import read_config

            try:
                config = read_config(path)
            except Exception:  # not a transformers folder: loading will say why
                config = None
            self._arch_config = (path, config)
        return self._arch_config[1]

    def _architecture_reason(self, recipe: Recipe) -> str | None:
        config = self._model_config()
        if config is None:
            return None
        from evo_compress.fitness.model.architecture import unsupported_reason

        return unsupported_reason(config, dict(recipe))

    def _probe_capabilities(self) -> dict[str, Collection[Any] | None]:
        from evo_compress.fitness.model._quiet import quiet_output

        device = self._usable_device()
        # torchao and bitsandbytes announce missing optional kernels on first use: the
        # probes below would print that over the search's display.
        with quiet_output():
            from evo_compress.fitness.hf.measure import attention_unsupported, kv_unsupported
            from evo_compress.fitness.model.quantize import quantization_unsupported

            quant = [
                m
                for m in METHODS.names("quantization", backend="transformers")
                if quantization_unsupported(m, device) is None
            ]
            attention = [a for a in _ATTENTION if attention_unsupported(a, device) is None]
            kv_dtype = [
                d for d in ("auto", "fp8") if kv_unsupported({"kv.dtype": d}, device) is None
            ]
            window = [
                w
                for w in (False, True)
                if kv_unsupported({"kv.sliding_window": w}, device) is None
            ]
        return {
            "quant.method": quant,
            "quant.group_size": None,
            "prune.method": None,
            "prune.pattern": None,
            "prune.sparsity": None,
            "recovery.method": None,
            "recovery.lora_rank": None,
            "recovery.steps": None,
            "recovery.temperature": None,
            "kv.dtype": kv_dtype,
            "kv.sliding_window": window,
            "kv.window": None,
            "serve.max_num_seqs": None,  # the batch size of the latency measurement
            "serve.attention_backend": attention,
            # serve.gpu_memory_utilization is a vLLM setting: pinned to its default here.
        }

    def infeasible_reason(self, recipe: Recipe, space: SearchSpace) -> str | None:
        # The architecture's own reason first (it says why), then the device's.
        reason = self._architecture_reason(recipe) or super().infeasible_reason(recipe, space)
        if reason is not None:
            return reason
        # A recipe whose estimated memory exceeds the limit is refused before loading.
        from evo_compress.fitness.model.memory import device_limit_mib, over_limit

        estimate = self._estimate_or_none(recipe)
        if estimate is None:
            return None
        limit, source = device_limit_mib(
            self.device, self.context.hardware.memory_gb, self._memory_limit()
        )
        return over_limit(estimate, limit, source)

    def memory_estimate(self, recipe: Recipe) -> MemoryEstimate:
        """The model's part of ``recipe``'s peak memory, estimated from the config on the
        meta device before anything is loaded (``fitness.model.memory``)."""
        if self._memory is None:
            from evo_compress.fitness.model.memory import MemoryGuard

            if self._model_path is None or self._task is None:
                self.prepare()
            assert self._model_path is not None and self._task is not None
            self._memory = MemoryGuard(
                self._model_path,
                self._task,
                self.config.model_dump(),
                self.device,
                self.context.model.dtype,
            )
        return self._memory.estimate(dict(recipe))

    def _estimate_or_none(self, recipe: Recipe) -> MemoryEstimate | None:
        try:
            return self.memory_estimate(recipe)
        except Exception:  # no estimate (model not found yet): the evaluation says why
            return None

    def limits(self) -> dict[str, float | None]:
        return {"timeout_s": self.config.timeout_s, "memory_limit_mib": self._memory_limit()}

    def _memory_limit(self) -> float:
        return float(self.config.memory_limit_mib or 0.75 * _machine_memory_mib())

    def fingerprint_data(self) -> dict[str, Any]:
        data = super().fingerprint_data()
        # The worker's limits change whether an evaluation finishes, not what it measures.
        data["settings"] = self.config.model_dump(mode="json", exclude=set(self.limits()))
        data["model_content"] = self._model_fingerprint()
        data["machine"] = {"cpu": cpu_name(), "device": self.device}
        if self.concurrent > 1 and not self.uses_gpu():
            data["machine"]["concurrent_evaluations"] = self.concurrent
        return data

    def _model_fingerprint(self) -> str:
        return model_fingerprint(self.context.model)

    def prepare(self) -> None:
        """The model folder, and the tasks as plain data: each entry's lm-eval name and
        options, latency prompts and calibration texts (``fitness.model.texts``), computed
        here once rather than in every evaluation. Idempotent."""
        if self._model_path is not None and self._task is not None:
            return
        self._usable_device()
        entries = task_entries(self.config)
        calibration = resolved_calibration(self.config)
        reference = entries[0].name == REFERENCE_TASK
        model_path, task = prepare_model_and_task(
            self.context.model,
            REFERENCE_TASK if reference else entries[0].name,
            self.config.task_include_path,
            None,
        )
        self._model_path, self._task = (
            model_path,
            _task_data(self.config, entries, calibration, model_path, task),
        )

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, recipe: Recipe, placement: Placement) -> EvaluationResult:
        return self._run(recipe, placement, None)

    def _evaluate_raced(
        self, recipe: Recipe, placement: Placement, race: RaceRule
    ) -> EvaluationResult:
        # The worker decides between its quick and full stages (``pipeline``).
        return self._run(recipe, placement, race)

    def worker_payload(
        self, recipe: Recipe, placement: Placement | None = None, race: RaceRule | None = None
    ) -> dict[str, Any]:
        """What the worker gets to apply ``recipe``: the model folder, the task with its
        calibration and training texts, the settings (seed, threads) and the carbon context,
        as plain data. ``pipeline.evaluate_in_worker`` evaluates ``recipe`` from it, and
        ``load_and_compress(payload, dict(recipe))`` rebuilds the compressed model from it,
        which is how ``export --weights`` makes the weights it saves."""
        if self._model_path is None or self._task is None:
            self.prepare()
        assert self._model_path is not None and self._task is not None
        placement = placement or Placement()
        payload = {
            "recipe": dict(recipe),
            "recipe_hash": recipe.hash,
            "model_path": str(self._model_path),
            "dtype": self.context.model.dtype,
            "device": placement.device or self.device,
            "task": self._task,
            "settings": self.config.model_dump(mode="json"),
            "carbon": self.context.carbon.model_dump(mode="json"),
            "memory_estimate": _data(self._estimate_or_none(recipe)),
        }
        if race is not None:
            payload["race"] = race.to_data()
        return payload

    def _run(
        self, recipe: Recipe, placement: Placement, race: RaceRule | None
    ) -> EvaluationResult:
        if self._model_path is None or self._task is None:
            self.prepare()
        # A model fetched only now (hub, reference) is checked here, still before loading.
        reason = self._architecture_reason(recipe)
        if reason is not None:
            return EvaluationResult.failure(reason, {"evaluator": self.name}, "infeasible")
        payload = self.worker_payload(recipe, placement, race)
        limits = WorkerLimits(self.config.timeout_s, memory_limit_mib=self._memory_limit())
        return run_in_worker(
            "evo_compress.fitness.hf.pipeline:evaluate_in_worker",
            payload,
            limits,
            _PRELOAD,
            env=placement.env,
        )


def _data(estimate: MemoryEstimate | None) -> dict[str, Any] | None:
    return estimate.to_data() if estimate is not None else None


def _task_data(
    config: TransformersSettings,
    entries: list[TaskEntry],
    calibration: CalibrationSettings,
    model_path: Path,
    reference: dict[str, Any],
) -> dict[str, Any]:
    """``payload["task"]``: ``entries`` (lm-eval name and options of each configured task),
    ``prompts`` (latency, cut to the served context), ``train_texts`` (calibration and
    recovery, cut to ``max_tokens``), ``calibration_samples``; ``name`` and
    ``include_path`` as before."""
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
    wanted_prompts = max(64, int(config.latency_prompts))
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


__all__ = ["TransformersEvaluator", "TransformersSettings"]
