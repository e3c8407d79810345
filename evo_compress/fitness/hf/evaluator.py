"""The transformers back end: apply a recipe to a real causal LM and measure five objectives.

The search process only validates settings, resolves the model and task and fingerprints
them; every evaluation runs in its own worker process (``fitness.worker``), where
``pipeline.evaluate_in_worker`` loads the model, applies the recipe (``apply.py``, with
the shared weight compression of ``fitness/model/``) and measures it (``measure.py``,
``accuracy.py``, ``fitness/energy.py``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import ConfigDict, Field

from evo_compress.exceptions import EvaluationError
from evo_compress.fitness._base import (
    EvaluationContext,
    EvaluationResult,
    Placement,
    installed_versions,
)
from evo_compress.fitness.model import (
    ModelEvaluator,
    cpu_name,
    model_fingerprint,
    parse_model_settings,
)
from evo_compress.fitness.model._base import TaskSettings
from evo_compress.fitness.racing import RaceRule
from evo_compress.fitness.worker import WorkerLimits, run_in_worker

if TYPE_CHECKING:
    from evo_compress.fitness.model.memory import MemoryEstimate, MemoryGuard
from evo_compress.genomes import Recipe, SearchSpace
from evo_compress.methods import METHODS

_ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2", "flashinfer")
_PRELOAD = ("evo_compress.fitness.hf._preload",)
# What an outcome depends on besides the recipe and settings (``Evaluator.packages``).
PACKAGES = ("torch", "transformers", "torchao", "bitsandbytes", "peft", "lm_eval")


class TransformersSettings(TaskSettings):
    """``evaluator.settings`` of the transformers back end (docs/config.md lists them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    eval_batch_size: int = Field(32, ge=1)
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
        self._packages: dict[str, str | None] | None = None

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

    def packages(self) -> dict[str, str | None]:
        """torch, transformers, the quantization and recovery libraries, and lm-eval: a
        changed one may change any objective. Where the quantization environment exists
        (gptq runs llm-compressor there), its packages (``quantization <name>``) and the
        job's digest too."""
        if self._packages is None:
            from evo_compress.fitness.model.environments import (
                QUANT_PACKAGES,
                default_python,
                quantize_job_digest,
                read_versions,
            )

            found = installed_versions(PACKAGES)
            python = default_python()
            if python is not None:
                quant = read_versions(python, QUANT_PACKAGES) or {}
                found.update({f"quantization {k}": v for k, v in quant.items()})
                found["quantize_job"] = quantize_job_digest()
            self._packages = found
        return dict(self._packages)

    def _model_fingerprint(self) -> str:
        return model_fingerprint(self.context.model)

    def prepare(self) -> None:
        """The model folder, and the tasks as plain data: each entry's lm-eval name and
        options, latency prompts and calibration texts (``fitness.model.task_data``), computed
        here once rather than in every evaluation. Idempotent."""
        if self._model_path is not None and self._task is not None:
            return
        from evo_compress.fitness.model.task_data import prepare_tasks

        self._usable_device()
        self._model_path, self._task = prepare_tasks(
            self.config, self.context.model, self.config.latency_prompts
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
        # In a run, what the libraries print in the worker (warnings, transformers' bars)
        # is kept in the run's logs/, as the vLLM back end keeps its server's output.
        log_path = None
        if self.run_dir is not None:
            name = f"worker-{recipe.short_hash}-{time.time_ns()}.log"
            log_path = Path(self.run_dir) / "logs" / name
        return run_in_worker(
            "evo_compress.fitness.hf.pipeline:evaluate_in_worker",
            payload,
            limits,
            _PRELOAD,
            env=placement.env,
            log_path=log_path,
        )


def _data(estimate: MemoryEstimate | None) -> dict[str, Any] | None:
    return estimate.to_data() if estimate is not None else None


__all__ = ["TransformersEvaluator", "TransformersSettings"]
