"""The vLLM back end: a recipe is compressed into a checkpoint vLLM can load, served by a
separate ``vllm serve`` process, and measured through its OpenAI-compatible API.

Where each step lives: ``compile.py`` turns a recipe into engine arguments and the weight
changes to make (or says why vLLM cannot serve it); ``checkpoint.py`` builds and caches the
checkpoint; ``server.py`` runs the server (own process group, health wait, no orphans);
``client.py`` measures latency and reads ``/metrics``; ``accuracy.py`` runs lm-eval against
the server. The search process never imports vllm: it may live in another environment (see
``command`` and ``python``).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import psutil
from pydantic import ConfigDict, Field, field_validator

from evo_compress.exceptions import EvaluationError
from evo_compress.fitness._base import (
    EvaluationContext,
    EvaluationResult,
    Placement,
)
from evo_compress.fitness.energy import (
    EnergyMeter,
    EnergyResult,
    amortised_co2_per_1k,
    co2_grams,
    describe_energy,
    nvml_device_handle,
)
from evo_compress.fitness.model import (
    ModelEvaluator,
    cpu_name,
    model_fingerprint,
    parse_model_settings,
)
from evo_compress.fitness.model._base import TaskSettings
from evo_compress.fitness.model.stages import all_done, finish_accuracy, quick_entries
from evo_compress.fitness.noise import N_KEY, STDERR_KEY
from evo_compress.fitness.racing import FULL, QUICK, STAGE_KEY, RaceRule
from evo_compress.fitness.vllm.compile import (
    CPU_KV_CACHE_GIB,
    CPU_KV_CACHE_VARIABLE,
    VLLMCapabilities,
    capabilities,
    compile_recipe,
    unsupported_reason,
)
from evo_compress.fitness.vllm.environment import (
    QUANT_PACKAGES,
    SERVING_PACKAGES,
    VLLMBuild,
    cpu_isa,
    default_command,
    default_python,
    python_of,
    quantize_job_digest,
    read_build,
    read_versions,
)
from evo_compress.genomes import Recipe, SearchSpace

log = logging.getLogger(__name__)

DEFAULT_VERSION = "0.32.0"  # assumed when the serving environment cannot be asked: the
# release `make vllm-env` pins
SERVED_NAME = "evo-compress"
_MIN_NEW_TOKENS = 2  # the fewest output tokens a latency request can be measured with


class VLLMSettings(TaskSettings):
    """``evaluator.settings`` of the vLLM back end (docs/config.md lists them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: tuple[str, ...] | None = Field(
        None,
        description="The serve command (a string is split like a shell). Default: "
        "`.venv-vllm/bin/vllm serve` from `make vllm-env`, else `vllm serve`",
    )
    python: str | None = Field(
        None,
        description="Python of the environment with llm-compressor, for the quantization "
        "step. Default, when `command` is not set either: `.venv-quant` from `make vllm-env`",
    )
    vllm_version: str | None = Field(
        None, description="Default: the serving environment's package metadata"
    )
    env: dict[str, str] = Field(default_factory=dict, description="Extra server environment")
    extra_args: tuple[str, ...] = Field((), description="More engine arguments, verbatim")
    latency_requests: int = Field(32, ge=1, description="Measured requests per evaluation")
    max_new_tokens: int = Field(64, ge=1, description="Output tokens per latency request")
    concurrency: int | None = Field(
        None, ge=1, description="Requests in flight (default: serve.max_num_seqs, capped)"
    )
    share_servers: bool = Field(
        True,
        description="Recipes of one batch that differ only in serve.max_num_seqs are measured "
        "on one server started with the largest value, each with its own requests in flight",
    )
    warmup_requests: int = Field(2, ge=0)
    startup_timeout_s: float = Field(900.0, gt=0)
    request_timeout_s: float = Field(300.0, gt=0)
    build_timeout_s: float = Field(3600.0, gt=0)
    checkpoint_dir: Path | None = Field(
        None, description="Compressed checkpoints (default: the project cache)"
    )
    threads: int = Field(2, ge=1, description="torch threads while building checkpoints")
    watts_per_core: float = Field(15.0, gt=0)
    seed: int = Field(0, ge=0)

    @field_validator("command", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = tuple(shlex.split(value))
        if isinstance(value, (list, tuple)) and not value:
            raise ValueError("must name a program")
        return value

    @property
    def serve_command(self) -> tuple[str, ...]:
        """``command``, or the environment ``make vllm-env`` made."""
        return self.command if self.command is not None else default_command()

    @property
    def quant_python(self) -> str | None:
        """``python``; or, when neither it nor ``command`` is set, ``.venv-quant``'s."""
        if self.python is not None or self.command is not None:
            return self.python
        return default_python()


class VLLMEvaluator(ModelEvaluator):
    """Serves each recipe with vLLM and measures it through the OpenAI-compatible API."""

    name: ClassVar[str] = "vllm"
    # Racing's two stages share one server start (``_measure``).
    supports_racing: ClassVar[bool] = True

    def __init__(self, settings: Mapping[str, Any], context: EvaluationContext) -> None:
        super().__init__(settings, context)
        self.config = parse_model_settings(VLLMSettings, settings, context)
        self._caps: VLLMCapabilities | None = None
        self._build: VLLMBuild | None = None
        self._build_read = False
        self._gpu: dict[str, Any] | None = None
        self._defaults: dict[str, Any] | None = None
        self._context_warned = False  # the output-token clamp is logged once
        self._packages: dict[str, str | None] | None = None
        # Server sharing within a batch (``plan_batch``): recipe hash -> (group, largest
        # max_num_seqs), evaluations each group still has to come, the server kept running.
        self._groups: dict[str, tuple[str, int]] = {}
        self._pending: dict[str, int] = {}
        self._warm: _Warm | None = None

    # ------------------------------------------------------------------ environment
    @property
    def device(self) -> str:
        wanted = self.context.hardware.device
        if wanted == "auto":
            wanted = "cuda" if self.gpu["name"] is not None else "cpu"
        return wanted

    @property
    def gpu(self) -> dict[str, Any]:
        """Name and compute capability of the GPU the server will use (None: none seen)."""
        if self._gpu is None:
            info: dict[str, Any] = {"name": None, "capability": None}
            try:
                import torch

                if torch.cuda.is_available():
                    index = _cuda_index(self.context.hardware.device)
                    info["name"] = torch.cuda.get_device_name(index)
                    info["capability"] = tuple(torch.cuda.get_device_capability(index))
            except Exception:  # no torch or no driver: a stand-in server on the CPU
                pass
            self._gpu = info
        return self._gpu

    @property
    def build(self) -> VLLMBuild | None:
        """The vLLM build of the serving environment, from its package metadata; None when
        the serve command is not in a virtual environment (a wrapper, a stand-in)."""
        if not self._build_read:
            python = python_of(self.config.serve_command)
            self._build = read_build(python) if python is not None else None
            self._build_read = True
        return self._build

    @property
    def caps(self) -> VLLMCapabilities:
        if self._caps is None:
            build = self.build
            version = (
                self.config.vllm_version
                or (build.version if build is not None else None)
                or probe_version(self.config.serve_command)
            )
            window, switch = _sliding_window_config(self.context.model.id)
            self._caps = VLLMCapabilities(
                version=VLLMCapabilities.parse_version(version or DEFAULT_VERSION),
                compute_capability=self.gpu["capability"],
                quantizer=self.config.quant_python is not None,
                cpu_build=build is not None and build.platform == "cpu",
                cpu_isa=cpu_isa(),
                sliding_window_model=window,
                sliding_window_switch=switch,
            )
        return self._caps

    def capabilities(self) -> Mapping[str, Collection[Any] | None]:
        caps = dict(capabilities(self.caps))
        # QLoRA's adapters are trained on an nf4 base; its checkpoint is not built here yet.
        recovery = caps.get("recovery.method")
        methods = recovery if recovery is not None else ("none", "lora", "qlora", "distill")
        caps["recovery.method"] = [m for m in methods if m != "qlora"]
        if self.caps.cpu_build:
            # Served at its default only (``CPU_BUILD``): left out, the space pins it.
            caps.pop("serve.gpu_memory_utilization", None)
        return caps

    def infeasible_reason(self, recipe: Recipe, space: SearchSpace) -> str | None:
        # A custom space's genes are servable at their defaults: remember them for compile.
        self._defaults = {name: gene.default for name, gene in space.genes.items()}
        # vLLM's own reason first: it says why (e.g. no bitsandbytes loader in this version).
        return unsupported_reason(
            dict(recipe), self.caps, defaults=self._defaults
        ) or super().infeasible_reason(recipe, space)

    def plan_batch(self, recipes: Sequence[Recipe], space: SearchSpace) -> list[int]:
        """Recipes that differ only in ``serve.max_num_seqs`` share a checkpoint and every
        other engine argument: with ``share_servers`` (and evaluations one at a time) they
        are grouped, next to each other, and measured on one server started with the
        group's largest ``max_num_seqs``. Each still has at most its own ``max_num_seqs``
        requests in flight, so the scheduler never batches more sequences than that value
        allows; the KV cache is sized by ``gpu_memory_utilization`` (on the CPU build by
        its fixed KV cache space), not by ``max_num_seqs``."""
        self._stop_warm()
        self._groups, self._pending = {}, {}
        order = list(range(len(recipes)))
        if not self.config.share_servers or not self.sequential:
            return order
        members: dict[str, list[int]] = {}
        for i, recipe in enumerate(recipes):
            if self.infeasible_reason(recipe, space) is None:
                members.setdefault(_server_group(recipe), []).append(i)
        for group, indices in members.items():
            if len(indices) < 2:
                continue
            largest = max(_max_num_seqs(recipes[i]) for i in indices)
            for i in indices:
                self._groups[recipes[i].hash] = (group, largest)
            self._pending[group] = len(indices)
        position = {i: n for n, indices in enumerate(members.values()) for i in indices}
        # Each group where its first member stood; the rest (infeasible) keep their places.
        return sorted(order, key=lambda i: (position.get(i, i), i))

    def close(self) -> None:
        self._stop_warm()

    def _stop_warm(self) -> None:
        warm, self._warm = self._warm, None
        if warm is not None:
            warm.server.stop()

    def limits(self) -> dict[str, float | None]:
        return {
            name: getattr(self.config, name)
            for name in ("startup_timeout_s", "request_timeout_s", "build_timeout_s")
        }

    def packages(self) -> dict[str, str | None]:
        """The vLLM version served (declared, read or probed), the serving environment's
        build, torch, transformers and compressed-tensors where its Python is known, and
        the quantization environment's llm-compressor, compressed-tensors, torch and
        transformers (``quantization <name>``). Read once."""
        if self._packages is None:
            found: dict[str, str | None] = {"vllm": ".".join(map(str, self.caps.version))}
            python = python_of(self.config.serve_command)
            if python is not None:
                serving = read_versions(python, SERVING_PACKAGES) or {}
                found.update({k: v for k, v in serving.items() if k != "vllm"})
            if self.config.quant_python is not None:
                quant = read_versions(self.config.quant_python, QUANT_PACKAGES) or {}
                found.update({f"quantization {k}": v for k, v in quant.items()})
                found["quantize_job"] = quantize_job_digest()
            self._packages = found
        return dict(self._packages)

    def fingerprint_data(self) -> dict[str, Any]:
        data = super().fingerprint_data()
        data["settings"] = self.config.model_dump(
            mode="json",
            exclude={
                "startup_timeout_s",
                "request_timeout_s",
                "build_timeout_s",
                "checkpoint_dir",
            },
        )
        data["model_content"] = model_fingerprint(self.context.model)
        # The vLLM version is a package (``packages``): a run resumes after an upgrade.
        data["serving"] = {
            "vllm_build": None if self.build is None else self.build.distribution,
            "gpu": self.gpu["name"],
            "cpu": cpu_name(),
        }
        if self.concurrent > 1 and not self.uses_gpu():
            data["serving"]["concurrent_evaluations"] = self.concurrent
        return data

    def prepare(self) -> None:
        """The model folder, and the tasks as plain data: each entry's lm-eval name and
        options, latency prompts and calibration texts (``fitness.model.task_data``), as the
        transformers back end computes them, once. A served context too short for
        ``max_new_tokens`` is no error here: each request asks fewer (``_fit_to_context``).
        Idempotent."""
        if self._model_path is not None and self._task is not None:
            return
        from evo_compress.fitness.model.task_data import prepare_tasks

        self._model_path, self._task = prepare_tasks(
            self.config,
            self.context.model,
            self.config.latency_requests,
            min_new_tokens=_MIN_NEW_TOKENS,
        )

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, recipe: Recipe, placement: Placement) -> EvaluationResult:
        return self._run(recipe, placement, None)

    def _evaluate_raced(
        self, recipe: Recipe, placement: Placement, race: RaceRule
    ) -> EvaluationResult:
        # Both stages on one server start: `_measure` asks `race.stop` between them.
        return self._run(recipe, placement, race)

    def checkpoint(self, recipe: Recipe, placement: Placement | None = None) -> tuple[Any, Any]:
        """The serve plan of ``recipe`` and the checkpoint vLLM serves for it (built now, or
        the cached one): what an evaluation serves and what ``export --weights`` copies.
        Raises ``EvaluationError`` where vLLM cannot serve the recipe or a step fails."""
        from evo_compress.fitness.vllm.checkpoint import ensure_checkpoint
        from evo_compress.reference import default_cache_dir

        placement = placement or Placement()
        self.prepare()
        assert self._model_path is not None and self._task is not None
        plan = compile_recipe(dict(recipe), self.caps, defaults=self._defaults)
        checkpoint = ensure_checkpoint(
            plan,
            model_path=self._model_path,
            model_fingerprint=model_fingerprint(self.context.model),
            cache_root=self.config.checkpoint_dir or default_cache_dir() / "vllm-checkpoints",
            device=placement.device or self.device,
            dtype=self.context.model.dtype,
            task=self._task,
            settings=self.config.model_dump(mode="json"),
            python=self.config.quant_python,
            env=placement.env,
        )
        return plan, checkpoint

    def save_weights(
        self, recipe: Recipe, out: Path, message: Any = lambda _text: None
    ) -> dict[str, Any]:
        """Write the checkpoint vLLM serves for ``recipe`` into the folder ``out``: the
        compressed-tensors checkpoint of its quantization step, or the pruned and recovered
        dense one, or the base model. ``export --weights`` and ``compress`` of vLLM runs.
        Returns what was done, as ``runs.weights`` records it."""
        import shutil

        from evo_compress.fitness.vllm.checkpoint import MARKER

        message("building (or finding the cached) vLLM checkpoint")
        plan, checkpoint = self.checkpoint(recipe)
        message(f"copying {checkpoint.path} to {out}")
        for item in Path(checkpoint.path).iterdir():
            if item.name == MARKER:
                continue
            target = out / item.name
            if item.is_dir():
                shutil.copytree(item, target)
            else:
                shutil.copy2(item, target)
        config = json.loads((out / "config.json").read_text())
        step = plan.quant_step
        return {
            "details": {
                "format": "compressed-tensors" if step is not None else "dense safetensors",
                "checkpoint_key": checkpoint.key,
                "steps": checkpoint.info.get("steps", []),
                "serve": ["vllm", "serve", "FOLDER", *plan.engine_args],
                "notes": list(plan.notes),
            },
            "quantization_config": config.get("quantization_config"),
            "compression_energy": {
                "joules": checkpoint.energy_joules,
                "measured": checkpoint.energy_measured,
            },
        }

    def _run(
        self, recipe: Recipe, placement: Placement, race: RaceRule | None
    ) -> EvaluationResult:
        from evo_compress.reference import default_cache_dir

        started = time.perf_counter()
        plan, checkpoint = self.checkpoint(recipe, placement)
        built = time.perf_counter() - started
        args = (*plan.engine_args, "--seed", str(self.config.seed), *self.config.extra_args)
        shared = self._groups.get(recipe.hash)
        if shared is not None:  # one server for the group: started with its largest value
            args = _with_max_num_seqs(args, shared[1])
        log_dir = (self.run_dir or default_cache_dir()) / "logs"
        build_seconds = _build_seconds(checkpoint, built)

        def result(measured: dict[str, Any]) -> EvaluationResult:
            measured = {**measured, "seconds": {**build_seconds, **measured["seconds"]}}
            return self._result(recipe, plan, checkpoint, args, measured, started)

        measured = self._serve_and_measure(
            recipe, checkpoint.path, args, plan.env, log_dir, placement, race, result
        )
        return result(measured)

    def _serve_and_measure(
        self,
        recipe: Recipe,
        model: Path,
        args: tuple[str, ...],
        env: Mapping[str, str],
        log_dir: Path,
        placement: Placement,
        race: RaceRule | None = None,
        as_result: Callable[[dict[str, Any]], EvaluationResult] | None = None,
    ) -> dict[str, Any]:
        from evo_compress.fitness.vllm.client import ClientError
        from evo_compress.fitness.vllm.server import ServerSpec, VLLMServer

        settings = self.config
        task = self._task or {}
        prompts = _latency_prompts(task, settings.latency_requests)
        max_num_seqs = int(recipe.get("serve.max_num_seqs", 32))
        concurrency = settings.concurrency or min(max_num_seqs, settings.latency_requests)
        spec = ServerSpec(
            command=settings.serve_command,
            model=str(model),
            args=args,
            env=self._server_env({**settings.env, **env, **placement.env}),
            served_model_name=SERVED_NAME,
        )
        log_path = log_dir / f"vllm-{recipe.short_hash}-{int(time.time())}.log"
        device = placement.device or self.device
        gpu_env = {**os.environ, **placement.env}  # which physical GPU `device` is
        memory = _MemorySampler(device, gpu_env)
        shared = self._groups.get(recipe.hash)
        key = (spec.command, spec.model, spec.args, tuple(sorted(spec.env.items())))
        warm = self._warm
        if warm is not None and (shared is None or warm.key != key):
            self._stop_warm()
            warm = None
        started = 0.0
        if warm is None:
            memory.baseline()
            server = VLLMServer(spec, log_path, startup_timeout_s=settings.startup_timeout_s)
            starting = time.perf_counter()
            try:
                server.start()
            except BaseException:
                server.stop()
                raise
            started = time.perf_counter() - starting
            warm = _Warm(key, server, log_path, memory.base)
        else:  # the group's server, already running: its log and memory baseline
            server, log_path = warm.server, warm.log_path
            memory.base = warm.base
        reused = started == 0.0
        try:
            measured = self._measure(
                server,
                model,
                prompts,
                concurrency,
                memory,
                log_path,
                device,
                gpu_env,
                race,
                as_result,
            )
        except ClientError as exc:
            # Asked while the server is still ours: once stopped it is never alive.
            died = _server_died(server, grace_s=0.0 if exc.status is not None else 3.0)
            self._warm = None
            server.stop()
            if died:
                raise EvaluationError(
                    f"the vLLM server died while being measured ({exc}); last lines of "
                    f"{log_path}: {server.log_tail(8)}"
                ) from None
            raise
        except BaseException:
            self._warm = None
            server.stop()
            raise
        measured["seconds"] = {"server_start": round(started, 3), **measured["seconds"]}
        if shared is not None:
            group, largest = shared
            self._pending[group] = self._pending.get(group, 1) - 1
            measured["server"] = {
                "shared": True,
                "reused": reused,
                "started_with_max_num_seqs": largest,
                "max_num_seqs": _max_num_seqs(recipe),
            }
            if self._pending[group] > 0:
                self._warm = warm  # the next member of the group is measured on it
                return measured
        self._warm = None
        server.stop()
        return measured

    def _server_env(self, env: dict[str, str]) -> dict[str, str]:
        """The server's environment on top of ours. Unless the user's environment or
        ``evaluator.settings.env`` says otherwise: vLLM's caches (compiled graphs) stay in
        the project's cache folder, and the CPU build's KV cache is 1 GiB (without the
        variable it would reserve ``gpu_memory_utilization`` of the machine's memory)."""
        from evo_compress.reference import default_cache_dir

        given = {**os.environ, **env}
        extra = {}
        if "VLLM_CACHE_ROOT" not in given:
            extra["VLLM_CACHE_ROOT"] = str(default_cache_dir() / "vllm")
        if self.caps.cpu_build and CPU_KV_CACHE_VARIABLE not in given:
            extra[CPU_KV_CACHE_VARIABLE] = CPU_KV_CACHE_GIB
        return {**env, **extra}

    def _measure(
        self,
        server: Any,
        model: Path,
        prompts: list[str],
        concurrency: int,
        memory: _MemorySampler,
        log_path: Path,
        device: str,
        gpu_env: Mapping[str, str],
        race: RaceRule | None = None,
        as_result: Callable[[dict[str, Any]], EvaluationResult] | None = None,
    ) -> dict[str, Any]:
        """Latency, then accuracy, on the running ``server``. With ``race``: the accuracy of
        the first ``race.quick_limit`` documents of each task first; when ``race.stop`` says
        the result (made by ``as_result``, as the evaluation's would be) cannot reach the
        front it is returned as it is (``stage: "quick"``), else the rest are scored on the
        same server and combined with them (``stage: "full"``), as the transformers back
        end does (``fitness.model.stages``)."""
        from evo_compress.fitness.vllm.accuracy import measure_server_tasks
        from evo_compress.fitness.vllm.client import measure_latency, scrape_metrics, warm_up

        settings = self.config
        task = self._task or {}
        max_tokens, note = _fit_to_context(
            server.base_url, prompts, settings.max_new_tokens, settings.request_timeout_s
        )
        if note is not None and not self._context_warned:
            self._context_warned = True
            log.warning(note)
        memory.watch(server.pid)
        # Warm-up requests stay out of the timing, the energy and the server's own figures.
        warm_up(
            server.base_url,
            SERVED_NAME,
            prompts,
            max_tokens,
            settings.warmup_requests,
            settings.request_timeout_s,
        )
        before = scrape_metrics(server.base_url)
        cpu_before = _tree_cpu_seconds(server.pid)
        meter = EnergyMeter(device, watts_per_core=settings.watts_per_core, env=gpu_env)
        kv_usage = _KVUsageSampler(server.base_url)
        timing = time.perf_counter()
        with meter, kv_usage:
            latency = measure_latency(
                server.base_url,
                SERVED_NAME,
                prompts,
                max_tokens=max_tokens,
                concurrency=concurrency,
                warmup=0,
                timeout_s=settings.request_timeout_s,
            )
        cpu_serving = _tree_cpu_seconds(server.pid) - cpu_before
        metrics = scrape_metrics(server.base_url)
        tpot = _time_per_output_token(latency, before, metrics)
        kv_cache = kv_usage.record(metrics)
        latency_s = time.perf_counter() - timing
        energy = meter.result
        if energy.method == "cpu-time-estimate":
            # The server is another process: estimate from its CPU time, not ours.
            energy = EnergyResult(
                cpu_serving * settings.watts_per_core,
                energy.seconds,
                energy.method,
                False,
                {"cpu_seconds": cpu_serving, "watts_per_core": settings.watts_per_core},
            )

        def accuracy_on(
            entries: list[dict[str, Any]], samples: dict[str, list[int]] | None = None
        ) -> dict[str, Any]:
            return measure_server_tasks(
                server.base_url,
                SERVED_NAME,
                model,
                entries,
                Path(task["include_path"]) if task.get("include_path") else None,
                limit=settings.limit,
                samples=samples,
                concurrency=min(concurrency, 8),
                timeout_s=settings.request_timeout_s,
                allow_code_execution=settings.allow_code_execution,
            )

        def measured(
            accuracy: dict[str, Any], peak: dict[str, Any], seconds: dict[str, float]
        ) -> dict[str, Any]:
            return {
                "latency": latency,
                "tpot": tpot,
                "metrics": metrics,
                "kv_cache": kv_cache,
                "accuracy": accuracy,
                "memory": peak,
                "energy": energy,
                "log": str(log_path),
                "concurrency": concurrency,
                "notes": [] if note is None else [note],
                "seconds": {"latency": round(latency_s, 3), **seconds},
            }

        entries = list(task.get("entries") or [{"name": task.get("name"), "weight": 1.0}])
        timing = time.perf_counter()
        if race is None:
            accuracy = accuracy_on(entries)
            return measured(
                accuracy, memory.stop(), {"accuracy": round(time.perf_counter() - timing, 3)}
            )
        assert as_result is not None
        # Each task's own limit, else the run-wide one (None: every document), as in one stage.
        entries = [{**e, "limit": e.get("limit") or settings.limit} for e in entries]
        quick = quick_entries(entries, race.quick_limit)
        accuracy = accuracy_on(quick)
        quick_s = round(time.perf_counter() - timing, 3)
        seconds = {"accuracy": quick_s, "accuracy_quick": quick_s}
        if all_done(entries, quick, accuracy):  # the quick stage scored every item already
            return {**measured(accuracy, memory.stop(), seconds), "stage": FULL}
        so_far = {**measured(accuracy, memory.peak(), seconds), "stage": QUICK}
        stopping = as_result(so_far)
        if race.stop(stopping.objectives or {}, stopping.metadata):
            memory.stop()
            return so_far
        timing = time.perf_counter()
        accuracy = finish_accuracy(accuracy, entries, quick, accuracy_on)
        rest_s = round(time.perf_counter() - timing, 3)
        seconds = {"accuracy": round(quick_s + rest_s, 3), "accuracy_quick": quick_s}
        seconds["accuracy_rest"] = rest_s
        return {**measured(accuracy, memory.stop(), seconds), "stage": FULL}

    def _result(
        self,
        recipe: Recipe,
        plan: Any,
        checkpoint: Any,
        args: tuple[str, ...],
        measured: dict[str, Any],
        started: float,
    ) -> EvaluationResult:
        latency = measured["latency"]
        energy: EnergyResult = measured["energy"]
        carbon = self.context.carbon
        tokens = float(latency.output_tokens)
        energy_per_1k = energy.joules / tokens * 1000.0
        co2_serving = co2_grams(energy_per_1k, carbon.grid_intensity_g_per_kwh)
        co2_once = amortised_co2_per_1k(
            checkpoint.energy_joules, carbon.grid_intensity_g_per_kwh, carbon.deployment_tokens
        )
        memory = measured["memory"]
        accuracy = measured["accuracy"]
        tasks = accuracy.get("tasks") or {}
        objectives = {
            "accuracy": float(accuracy["accuracy"]),
            "latency": float(measured["tpot"]["ms"]),
            "memory": float(memory["mib"]),
            "energy": energy_per_1k,
            "co2": co2_serving + co2_once,
        }
        energy_how = describe_energy(energy, "the latency run", whose="the server's")
        metadata = {
            "evaluator": "vllm",
            "device": self.device,
            "vllm_version": ".".join(map(str, self.caps.version)),
            "gpu": self.gpu["name"],
            # The accuracy's noise, in the place every back end keeps it (``fitness.noise``).
            STDERR_KEY: accuracy["stderr"],
            N_KEY: accuracy["n"],
            "command": list(self.config.serve_command),
            "vllm_build": None if self.build is None else self.build.distribution,
            "engine_args": list(args),
            "notes": [*plan.notes, *measured["notes"]],
            "checkpoint": {
                "key": checkpoint.key,
                "path": str(checkpoint.path),
                "reused": checkpoint.reused,
                "steps": checkpoint.info.get("steps", []),
            },
            "objectives": {
                "accuracy": {
                    # A weighted mean's metric names each task, its metric and weight.
                    "how": (
                        f"lm-eval `{accuracy['task']}` {accuracy['metric']}"
                        if len(tasks) <= 1
                        else f"lm-eval {accuracy['metric']}"
                    )
                    + " against the server (local-completions)",
                    "measured": True,
                    "n": accuracy["n"],
                    "stderr": accuracy["stderr"],
                    "stderr_from": accuracy.get("stderr_from"),
                },
                "latency": {
                    "how": measured["tpot"]["how"],
                    "measured": True,
                    "source": measured["tpot"]["source"],
                    "server_mean_ms": measured["tpot"]["server_mean_ms"],
                    **latency.to_json(),
                },
                "memory": {"measured": True, **memory},
                "energy": {
                    "how": energy_how,
                    "measured": energy.measured,
                    "joules": energy.joules,
                    "tokens": tokens,
                },
                "co2": {
                    "how": "energy x grid intensity + one-time compression CO2 amortised "
                    f"over {carbon.deployment_tokens:g} tokens",
                    "measured": energy.measured and checkpoint.energy_measured,
                    "serving_g_per_1k": co2_serving,
                    "compression_g_per_1k": co2_once,
                },
            },
            # Per task: score, stderr, n, metric, weight (what reports and constraints read).
            "tasks": tasks,
            "accuracy_run": {k: v for k, v in accuracy.items() if k != "tasks"},
            "kv_cache": measured["kv_cache"],
            "server_metrics": measured["metrics"],
            "server_log": measured["log"],
            "seconds": round(time.perf_counter() - started, 3),
            "seconds_split": measured["seconds"],
        }
        if measured.get("server") is not None:  # measured on a server shared by its group
            metadata["server"] = measured["server"]
        if measured.get("stage") is not None:  # racing's stage (``fitness.racing``)
            metadata[STAGE_KEY] = measured["stage"]
        return EvaluationResult.success(objectives, json.loads(json.dumps(metadata, default=str)))


# ---------------------------------------------------------------------- helpers
@dataclass
class _Warm:
    """A server kept running for the next member of its group (``plan_batch``)."""

    key: tuple[Any, ...]  # command, model, engine arguments, environment
    server: Any
    log_path: Path
    base: float  # the memory used before it started (``_MemorySampler.base``)


def _max_num_seqs(recipe: Recipe) -> int:
    return int(recipe.get("serve.max_num_seqs", 32))


def _server_group(recipe: Recipe) -> str:
    """What recipes share when they differ only in ``serve.max_num_seqs``."""
    rest = {k: v for k, v in recipe.items() if k != "serve.max_num_seqs"}
    return json.dumps(rest, sort_keys=True, default=str)


def _with_max_num_seqs(args: tuple[str, ...], value: int) -> tuple[str, ...]:
    """``args`` with ``--max-num-seqs`` set to ``value`` (added when absent)."""
    out = list(args)
    if "--max-num-seqs" in out:
        out[out.index("--max-num-seqs") + 1] = str(value)
    else:
        out += ["--max-num-seqs", str(value)]
    return tuple(out)


def _time_per_output_token(
    latency: Any, before: Mapping[str, Any], after: Mapping[str, Any]
) -> dict[str, Any]:
    """The latency objective: the server's own mean time per output token over the measured
    requests (``client.server_tpot_ms``, from the engine's timestamps) wherever the server
    reports it, so that every evaluation is timed the same way. Chunk arrival times say as
    much only when the API server got the CPU to send each token as it came: on two shared
    cores it often did not (streams held back, then sent together), and at concurrency 16
    the streamed median was up to 3x the server's figure for the same recipe. The streamed
    median over the paced requests (``client.RequestTiming.paced``) is kept beside it, and
    is the objective only for a server without the histogram (then at least half the
    requests must be paced)."""
    from evo_compress.fitness.vllm.client import server_tpot_ms

    runs = f"{latency.requests} requests at concurrency {latency.concurrency}"
    streamed = (
        f"streamed median {latency.tpot_median_ms:.2f} ms over {latency.paced_requests} of "
        f"{latency.requests} paced streams"
        if latency.paced_requests
        else f"none of the {latency.requests} streams arrived paced"
    )
    server = server_tpot_ms(before, after)
    if server is not None:
        ms, name = server
        return {
            "ms": ms,
            "source": "server",
            "how": f"the server's mean time per output token ({name}), {runs}; {streamed}",
            "server_mean_ms": ms,
        }
    if latency.paced:
        return {
            "ms": float(latency.tpot_median_ms),
            "source": "stream",
            "how": f"median time per output token of streamed completions, {runs} (the "
            "server reports no time-per-output-token histogram)",
            "server_mean_ms": None,
        }
    unpaced = f"{latency.requests - latency.paced_requests} of {latency.requests}"
    raise EvaluationError(
        f"the time per output token cannot be measured: {unpaced} streams arrived in "
        "bursts (tokens held back, then delivered together) and the server reports no "
        "time-per-output-token histogram in /metrics"
    )


def _build_seconds(checkpoint: Any, seconds: float) -> dict[str, float]:
    """The checkpoint's share of an evaluation's seconds: each build step (prune+recover,
    quantize) by its own clock, the rest (copying, caching) as ``checkpoint``; all 0 when
    the checkpoint was reused."""
    if checkpoint.reused:
        return {"checkpoint": 0.0}
    split: dict[str, float] = {}
    for step in checkpoint.info.get("steps", []):
        step_s = step.get("seconds", step.get("energy", {}).get("seconds"))
        if isinstance(step_s, (int, float)):
            name = "quantization" if step.get("step") == "quantize" else str(step.get("step"))
            split[name] = round(float(step_s), 3)
    split["checkpoint"] = round(max(seconds - sum(split.values()), 0.0), 3)
    return split


def probe_version(command: tuple[str, ...], timeout_s: float = 120.0) -> str | None:
    """Ask the serving environment its vLLM version (``vllm --version``); None if it cannot
    say (a container wrapper, a stand-in server)."""
    program = list(command[:-1]) if command and command[-1] == "serve" else list(command)
    try:
        proc = subprocess.run(
            [*program, "--version"], capture_output=True, text=True, timeout=timeout_s
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in (proc.stdout + "\n" + proc.stderr).splitlines():
        try:
            VLLMCapabilities.parse_version(line.strip())
            return line.strip()
        except ValueError:
            continue
    return None


def _server_died(server: Any, grace_s: float) -> bool:
    """Whether the server process (or its guard) has exited, waiting up to ``grace_s`` for
    the exit of a server that broke a connection as it died."""
    deadline = time.monotonic() + grace_s
    while True:
        if not server.alive() or not _running(server.pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _running(pid: int | None) -> bool:
    if pid is None:
        return True  # not known yet: the guard's state decides
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _fit_to_context(
    base_url: str, prompts: list[str], wanted: int, timeout_s: float
) -> tuple[int, str | None]:
    """Output tokens per latency request that fit the served context with the longest
    prompt (vLLM refuses a request whose prompt + max_tokens exceed ``max_model_len``), and
    a note when fewer than ``wanted``. A server without ``/tokenize`` gets ``wanted``."""
    from evo_compress.fitness.vllm.client import ClientError, tokenize

    longest, limit = 0, None
    try:
        for prompt in dict.fromkeys(prompts):
            count, limit = tokenize(base_url, SERVED_NAME, prompt, timeout_s)
            longest = max(longest, count)
    except ClientError as exc:
        if exc.status in (404, 405, 501):
            return wanted, None
        raise
    if limit is None or longest + wanted <= limit:
        return wanted, None
    room = limit - longest
    if room < 2:
        raise EvaluationError(
            f"the longest latency prompt has {longest} tokens and the served model's context "
            f"is {limit}: no room for the 2 output tokens a latency measurement needs; use "
            "shorter prompts (`evaluator.settings.latency_prompt_file`) or a longer context "
            "(`evaluator.settings.extra_args`: --max-model-len)"
        )
    return room, (
        f"`evaluator.settings.max_new_tokens` {wanted} plus the longest latency prompt "
        f"({longest} tokens) exceed the served context of {limit} tokens: each latency "
        f"request asked for {room} output tokens instead"
    )


def _cuda_index(device: str) -> int:
    return int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0


def _sliding_window_config(model_id: str) -> tuple[bool, bool]:
    """Whether the model's config defines sliding-window attention (Mistral, Qwen2, ...),
    and whether a ``use_sliding_window`` switch gates it (Qwen2, Qwen3)."""
    config = Path(model_id) / "config.json"
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return False, False
    if not isinstance(data, dict) or "sliding_window" not in data:
        return False, False
    return True, "use_sliding_window" in data


def _latency_prompts(task: Mapping[str, Any], count: int) -> list[str]:
    """``count`` latency prompts, taken in turn from the task data's (``task_data``)."""
    pool = list(task.get("prompts") or [])
    if not pool:
        raise EvaluationError(
            "no prompts for the latency measurement: set `evaluator.settings.latency_prompt_file`"
        )
    return [pool[i % len(pool)] for i in range(count)]


def _tree(root: int | None) -> list[psutil.Process]:
    """``root`` and every process below it; none when ``root`` has exited. A process that
    exits while the tree is walked is left out."""
    if root is None:
        return []
    try:
        top = psutil.Process(root)
        return [top, *top.children(recursive=True)]
    except psutil.Error:
        return []


def _tree_cpu_seconds(root: int | None) -> float:
    """User and system CPU seconds of ``root`` and the processes below it."""
    total = 0.0
    for process in _tree(root):
        try:
            times = process.cpu_times()
        except psutil.Error:  # exited, or not ours to read
            continue
        total += times.user + times.system
    return total


class _KVUsageSampler:
    """vLLM's KV-cache usage while the latency run goes, read from ``/metrics`` every
    ``interval_s`` (vLLM keeps no peak of its own); then the named KV-cache figures."""

    def __init__(self, base_url: str, interval_s: float = 0.1) -> None:
        self.base_url = base_url
        self.interval_s = interval_s
        self.peak: float | None = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> _KVUsageSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _loop(self) -> None:
        from evo_compress.fitness.vllm.client import (
            ClientError,
            kv_cache_figures,
            scrape_metrics,
        )

        while not self._stop.is_set():
            try:
                usage = kv_cache_figures(scrape_metrics(self.base_url, 5.0))["usage"]
            except ClientError:
                usage = None  # a failing server fails the latency run, which says why
            if usage is not None:
                self.peak = usage if self.peak is None else max(self.peak, usage)
                self.samples += 1
            self._stop.wait(self.interval_s)

    def record(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        from evo_compress.fitness.vllm.client import kv_cache_figures

        figures = kv_cache_figures(metrics)
        after = figures.pop("usage")
        return {
            **figures,
            "usage_peak": self.peak,
            "usage_after": after,
            "usage_samples": self.samples,
            "how": "vLLM's /metrics: vllm:cache_config_info (configuration, capacity = "
            "num_gpu_blocks x block_size) and vllm:kv_cache_usage_perc (fraction of the "
            f"cache in use), sampled every {self.interval_s:g}s during the latency run",
        }


class _MemorySampler:
    """Peak memory while serving: the GPU's used memory (NVML) minus what was used before
    the server started; without a GPU, the server processes' resident memory."""

    def __init__(
        self, device: str, env: Mapping[str, str] | None = None, interval_s: float = 0.2
    ) -> None:
        self.device = device
        self.interval_s = interval_s
        self._nvml: Any = None
        self.base = 0.0
        self._peak = 0.0
        self._pid: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if device.startswith("cuda"):
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = (pynvml, nvml_device_handle(pynvml, device, env))
            except Exception:
                self._nvml = None

    def _read(self) -> float:
        if self._nvml is not None:
            pynvml, handle = self._nvml
            return float(pynvml.nvmlDeviceGetMemoryInfo(handle).used) / 2**20
        from evo_compress.fitness.worker import rss_mib

        return sum(rss_mib(process.pid) or 0.0 for process in _tree(self._pid))

    def baseline(self) -> None:
        self.base = self._read() if self._nvml is not None else 0.0

    def watch(self, pid: int | None) -> None:
        self._pid = pid
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._read())
            self._stop.wait(self.interval_s)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        return self.peak()

    def peak(self) -> dict[str, Any]:
        """The peak so far (sampling goes on until ``stop``)."""
        self._peak = max(self._peak, self._read())
        if self._nvml is not None:
            return {
                "mib": max(self._peak - self.base, 0.0),
                "how": "peak GPU memory used while serving (NVML) minus the GPU's use "
                "before the server started",
                "gpu_used_before_mib": self.base,
            }
        return {
            "mib": self._peak,
            "how": "peak resident memory of the server processes (no GPU)",
        }


__all__ = ["VLLMEvaluator", "VLLMSettings", "probe_version"]
