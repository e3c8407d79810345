"""One evaluation, start to finish, inside a worker process: load, apply, measure.

``evaluate_in_worker`` is what ``TransformersEvaluator`` runs through ``fitness.worker``;
it takes and returns plain data only. Where each objective comes from:
accuracy - lm-eval on the compressed model (``accuracy.py``);
latency - median time per output token of greedy batched generation (``measure.py``);
memory - weight footprint plus peak memory growth while serving (``measure.py``);
energy - NVML / RAPL counters over the latency run, else CPU time x watts (``energy.py``);
co2 - energy x grid intensity, plus the compression's one-time CO2 amortised.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from evo_compress.fitness._base import EvaluationResult
from evo_compress.fitness.energy import (
    EnergyMeter,
    amortised_co2_per_1k,
    co2_grams,
    describe_energy,
)
from evo_compress.fitness.hf.accuracy import measure_tasks
from evo_compress.fitness.hf.apply import AppliedRecipe, apply_serving
from evo_compress.fitness.hf.measure import ModelPeakMeter, measure_latency, measure_memory
from evo_compress.fitness.model import plain
from evo_compress.fitness.model.load import load_and_compress
from evo_compress.fitness.model.memory import MALLOC_MMAP_THRESHOLD
from evo_compress.fitness.model.stages import all_done, finish_accuracy, quick_entries
from evo_compress.fitness.noise import N_KEY, STDERR_KEY
from evo_compress.fitness.racing import FULL, QUICK, STAGE_KEY, RaceRule


def load_and_apply(payload: dict[str, Any], recipe: dict[str, Any]) -> tuple[Any, AppliedRecipe]:
    """Load the model and tokenizer of ``payload``, compress its weights and apply the
    serving genes as ``recipe`` says."""
    tokenizer, compressed = load_and_compress(payload, recipe)
    return tokenizer, apply_serving(compressed, recipe, payload["device"])


def _return_freed_memory() -> None:
    """Have glibc's malloc serve every allocation of 1 MiB or more with its own mmap, so that
    a freed tensor goes back to the system. Its default threshold rises with the first large
    free, after which weight-sized temporaries (quantization, LoRA merges) are carved from
    the heap and kept: on a 106M model, int4 quantization left 330 MiB of freed temporaries
    resident, counted against the worker's memory limit."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(-3, MALLOC_MMAP_THRESHOLD)  # M_MMAP_THRESHOLD (fixed, no dynamic raise)
    except OSError:  # not glibc: nothing to tune
        pass


def evaluate_in_worker(payload: dict[str, Any]) -> EvaluationResult:
    _return_freed_memory()
    settings = payload["settings"]
    recipe = payload["recipe"]
    device = payload["device"]
    task = payload["task"]
    torch.set_num_threads(int(settings["threads"]))
    torch.manual_seed(int(settings["seed"]))
    started = time.perf_counter()

    # The model's part of the worker's peak (what ``fitness.model.memory`` estimates): the
    # peak from here on over the memory in use before the model is loaded.
    model_peak = ModelPeakMeter(device)
    tokenizer, applied = load_and_apply(payload, recipe)
    model = applied.model
    include_path = Path(task["include_path"]) if task.get("include_path") else None
    # Each task's own limit, else the run-wide one; None scores every document.
    entries = [
        {**entry, "limit": entry.get("limit") or settings["limit"]}
        for entry in task.get("entries") or [{"name": task["name"], "weight": 1.0}]
    ]

    def accuracy_on(
        entries: list[dict[str, Any]], samples: dict[str, list[int]] | None = None
    ) -> dict[str, Any]:
        return measure_tasks(
            model,
            tokenizer,
            entries,
            include_path=include_path,
            batch_size=int(settings["eval_batch_size"]),
            device=device,
            samples=samples,
            allow_code_execution=bool(settings.get("allow_code_execution")),
        )

    # Racing: the first `quick_limit` items of each task now, the rest only if the recipe
    # can still reach the front (``fitness.racing``); the recipe is applied and timed once
    # either way.
    race = RaceRule.from_data(payload["race"]) if payload.get("race") else None
    if race is not None:
        quick = quick_entries(entries, race.quick_limit)
        accuracy = accuracy_on(quick)
    else:
        accuracy = accuracy_on(entries)

    pool = list(task.get("prompts") or [])
    if not pool:
        raise ValueError("no prompts for the latency measurement: the task gave none")
    batch_size = int(recipe.get("serve.max_num_seqs", 1))
    n_prompts = max(int(settings["latency_prompts"]), batch_size)
    n_prompts = math.ceil(n_prompts / batch_size) * batch_size  # only full batches
    prompts = [pool[i % len(pool)] for i in range(n_prompts)]
    serving = EnergyMeter(device, watts_per_core=float(settings["watts_per_core"]))
    model_peak.checkpoint()  # the serving window below resets the peak counters
    memory, latency = measure_memory(
        model,
        lambda: measure_latency(
            model,
            tokenizer,
            prompts,
            max_new_tokens=int(settings["max_new_tokens"]),
            batch_size=batch_size,
            repeats=int(settings["latency_repeats"]),
            device=device,
            generate_kwargs=applied.generate_kwargs,
            energy_meter=serving,
        ),
        device,
    )
    model_peak.add_serving(memory)

    def result(accuracy: dict[str, Any], stage: str | None) -> EvaluationResult:
        objectives, metadata = _record(accuracy, rest)
        if stage is not None:
            metadata[STAGE_KEY] = stage
        metadata["seconds"] = round(time.perf_counter() - started, 3)
        return EvaluationResult.success(objectives, plain(metadata))

    rest = {
        "payload": payload,
        "device": device,
        "settings": settings,
        "latency": latency,
        "memory": memory,
        "energy": serving.result,
        "tokens": float(latency["tokens_generated"]),
        "batch_size": batch_size,
        "compression": applied.compression_energy,
        "details": applied.details,
        "model_memory": {**model_peak.result(), "estimate": payload.get("memory_estimate")},
    }
    if race is None:
        return result(accuracy, None)
    quick_result = result(accuracy, QUICK)
    if all_done(entries, quick, accuracy):
        return result(accuracy, FULL)  # the quick stage scored every item already
    if race.stop(quick_result.objectives or {}, quick_result.metadata):
        return quick_result
    return result(finish_accuracy(accuracy, entries, quick, accuracy_on), FULL)


def _record(
    accuracy: dict[str, Any], rest: dict[str, Any]
) -> tuple[dict[str, float], dict[str, Any]]:
    """The objectives and metadata of one evaluation from its accuracy and the rest of what
    was measured."""
    payload, device, settings = rest["payload"], rest["device"], rest["settings"]
    latency, memory, energy = rest["latency"], rest["memory"], rest["energy"]
    tokens, batch_size = rest["tokens"], rest["batch_size"]
    compression, details = rest["compression"], rest["details"]
    intensity = float(payload["carbon"]["grid_intensity_g_per_kwh"])
    energy_per_1k = energy.joules / tokens * 1000.0
    co2_serving = co2_grams(energy_per_1k, intensity)
    co2_once = amortised_co2_per_1k(
        compression.joules, intensity, float(payload["carbon"]["deployment_tokens"])
    )
    tasks = accuracy.get("tasks") or {}
    objectives = {
        "accuracy": float(accuracy["accuracy"]),
        "latency": float(latency["ms_per_token_median"]),
        "memory": float(memory["mib"]),
        "energy": energy_per_1k,
        "co2": co2_serving + co2_once,
    }
    energy_how = describe_energy(energy, "the latency run")
    metadata = {
        "evaluator": "transformers",
        "device": device,
        "torch_threads": int(settings["threads"]),
        # The accuracy's noise, in the place every back end keeps it (``fitness.noise``).
        STDERR_KEY: accuracy.get("stderr"),
        N_KEY: accuracy.get("n"),
        "objectives": {
            "accuracy": {
                "how": f"lm-eval `{accuracy.get('task')}` {accuracy.get('metric')}"
                if len(tasks) <= 1
                else f"lm-eval {accuracy.get('metric')}",
                "measured": True,
                "n": accuracy.get("n"),
                "stderr": accuracy.get("stderr"),
                "stderr_from": accuracy.get("stderr_from"),
            },
            "latency": {
                "how": "median ms per output token, greedy batched generate",
                "measured": True,
                "p95": latency["ms_per_token_p95"],
                "ttft_ms_median": latency["ttft_ms_median"],
                "ttft_ms_p95": latency["ttft_ms_p95"],
                "repeats": latency["repeats"],
                "samples": latency["samples"],
                "batch_size": batch_size,
                "spread": latency["spread"],
            },
            "memory": {"how": memory["how"], "measured": True, **plain(memory)},
            "energy": {
                "how": energy_how,
                "measured": energy.measured,
                "joules": energy.joules,
                "tokens": tokens,
            },
            "co2": {
                "how": "energy x grid intensity + one-time compression CO2 amortised over "
                f"{payload['carbon']['deployment_tokens']:g} tokens",
                "measured": energy.measured and compression.measured,
                "serving_g_per_1k": co2_serving,
                "compression_g_per_1k": co2_once,
            },
        },
        "compression": {"energy": compression.to_dict(), **details},
        # The estimate made before loading next to the measured peak it estimates.
        "model_memory": rest["model_memory"],
        # Per task: score, stderr, n, metric, weight (what reports and constraints read).
        "tasks": plain(tasks),
        "accuracy_run": plain({k: v for k, v in accuracy.items() if k != "tasks"}),
        "latency_run": plain(latency),
    }
    return objectives, metadata
