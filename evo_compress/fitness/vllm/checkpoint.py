"""The checkpoint a recipe is served from: its weights, built once and cached by the recipe's
weight genes (pruning, recovery, and quantization that needs a step before serving), so a
recipe that differs only in KV-cache or serving settings reuses the same folder.

Two steps, each optional: pruning and recovery run with the transformers back end's own code
in an isolated worker (``build_weights_in_worker``) and are saved as a standard checkpoint;
int4 / int8 quantization runs ``quantize_job.py`` (llm-compressor) with the vLLM
environment's Python and writes compressed-tensors. Their energy is measured (or estimated)
and kept beside the weights, so a reused checkpoint still carries its one-time CO2.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evo_compress.exceptions import EvaluationError
from evo_compress.fitness._base import EvaluationResult
from evo_compress.fitness.energy import EnergyMeter, EnergyResult, children_cpu_seconds
from evo_compress.fitness.model.environments import quantize_job_digest
from evo_compress.fitness.vllm.compile import ServePlan
from evo_compress.fitness.worker import WorkerLimits, run_in_worker

MARKER = "evo_checkpoint.json"
QUANTIZE_JOB = Path(__file__).with_name("quantize_job.py")
_PRELOAD = ("evo_compress.fitness.model._preload",)


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    key: str
    info: dict[str, Any]  # steps, their energy and seconds
    reused: bool

    @property
    def energy_joules(self) -> float:
        return float(self.info.get("energy_joules", 0.0))

    @property
    def energy_measured(self) -> bool:
        return bool(self.info.get("energy_measured", True))


def ensure_checkpoint(
    plan: ServePlan,
    *,
    model_path: Path,
    model_fingerprint: str,
    cache_root: Path,
    device: str,
    dtype: str,
    task: dict[str, Any],
    settings: dict[str, Any],
    python: str | None,
    env: Mapping[str, str] | None = None,
) -> Checkpoint:
    """The served folder for ``plan``: the base model itself when no weight changes, else a
    cached folder (built now if missing). Raises ``EvaluationError`` when a step fails."""
    key = plan.checkpoint_key(f"{model_fingerprint}:{_inputs_digest(task, settings)}")
    if not plan.weight_genes and plan.quant_step is None:
        return Checkpoint(model_path, key, {"steps": [], "energy_joules": 0.0}, reused=True)
    folder = cache_root / key[:24]
    marker = folder / MARKER
    if marker.is_file():
        return Checkpoint(folder, key, json.loads(marker.read_text()), reused=True)
    cache_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{key[:24]}-", dir=cache_root))
    try:
        info = _build(plan, work, model_path, device, dtype, task, settings, python, env or {})
        info["key"] = key
        (work / "final" / MARKER).write_text(json.dumps(info, indent=1))
        try:
            os.replace(work / "final", folder)  # atomic: a half-built folder never has a marker
        except OSError:
            if not marker.is_file():  # not another process finishing the same key first
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Checkpoint(folder, key, json.loads(marker.read_text()), reused=False)


def _inputs_digest(task: dict[str, Any], settings: dict[str, Any]) -> str:
    """What a build reads besides the model and the recipe: the calibration and recovery
    texts and the settings that steer the steps. Part of the checkpoint's key, so that a
    checkpoint built from other texts or settings is never served in its place."""
    inputs = {
        "texts": task.get("train_texts") or [],
        "calibration_samples": task.get("calibration_samples"),
        "quantize_job": quantize_job_digest(),
        **{
            name: settings.get(name)
            for name in ("calibration_samples", "recovery_lr", "recovery_batch_size", "seed")
        },
    }
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _build(
    plan: ServePlan,
    work: Path,
    model_path: Path,
    device: str,
    dtype: str,
    task: dict[str, Any],
    settings: dict[str, Any],
    python: str | None,
    env: Mapping[str, str],
) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    source = model_path
    weights_genes = {k: v for k, v in plan.weight_genes.items() if not k.startswith("quant.")}
    final = work / "final"
    if any(_changes_weights(k, v) for k, v in weights_genes.items()):
        out = work / "weights" if plan.quant_step is not None else final
        result = run_in_worker(
            "evo_compress.fitness.vllm.checkpoint:build_weights_in_worker",
            {
                "recipe": weights_genes,
                "model_path": str(model_path),
                "output": str(out),
                "device": device,
                "dtype": dtype,
                "task": task,
                "settings": settings,
            },
            WorkerLimits(
                timeout_s=float(settings["build_timeout_s"]),
                memory_limit_mib=settings.get("memory_limit_mib"),
            ),
            _PRELOAD,
            env=env,
        )
        if not result.ok:
            raise EvaluationError(
                f"building the pruned/recovered checkpoint failed: {result.reason}"
            )
        steps.append({"step": "prune+recover", **result.metadata})
        source = out
    if plan.quant_step is not None:
        steps.append(
            _quantize(plan, source, final, task, settings, python, device, work / "calib.txt", env)
        )
    elif source == model_path:  # nothing to build after all: serve a copy of the base
        shutil.copytree(model_path, final)
    energy = sum(float(s.get("energy", {}).get("joules", 0.0)) for s in steps)
    measured = all(bool(s.get("energy", {}).get("measured", True)) for s in steps)
    return {
        "steps": steps,
        "weight_genes": plan.weight_genes,
        "quant_step": plan.quant_step.to_json() if plan.quant_step else None,
        "energy_joules": energy,
        "energy_measured": measured,
        "built_at": time.time(),
    }


def _changes_weights(gene: str, value: Any) -> bool:
    return not (gene.endswith(".method") and value == "none")


def _quantize(
    plan: ServePlan,
    source: Path,
    output: Path,
    task: dict[str, Any],
    settings: dict[str, Any],
    python: str | None,
    device: str,
    calibration: Path,
    env: Mapping[str, str],
) -> dict[str, Any]:
    step = plan.quant_step
    assert step is not None
    if python is None:
        raise EvaluationError(
            f"{step.scheme} {step.algorithm} needs a quantization step: set "
            "`evaluator.settings.python` to the vLLM environment's Python (with llm-compressor)"
        )
    samples = task.get("calibration_samples") or settings.get("calibration_samples") or 64
    texts = list(task.get("train_texts") or [])[: int(samples)]
    calibration.write_text("\n".join(t.replace("\n", " ") for t in texts) + "\n")
    command = [
        python,
        str(QUANTIZE_JOB),
        "--input",
        str(source),
        "--output",
        str(output),
        "--scheme",
        step.scheme,
        "--algorithm",
        step.algorithm,
        "--samples",
        str(len(texts)),
        "--device",
        "cuda" if device.startswith("cuda") else "cpu",
    ]
    if step.group_size is not None:
        command += ["--group-size", str(step.group_size)]
    if texts:
        command += ["--calibration", str(calibration)]
    log = output.parent / "quantize.log"
    started = time.perf_counter()
    children_before = children_cpu_seconds()
    full_env = {**os.environ, **env}  # a parallel worker's GPU (CUDA_VISIBLE_DEVICES)
    meter = EnergyMeter(device, watts_per_core=float(settings["watts_per_core"]), env=full_env)
    with meter, log.open("w") as out:
        try:
            proc = subprocess.run(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=float(settings["build_timeout_s"]),
                check=False,
                env=full_env,
            )
        except subprocess.TimeoutExpired:
            raise EvaluationError(
                f"the quantization step ran past {settings['build_timeout_s']:g} s"
            ) from None
        except OSError as exc:
            raise EvaluationError(
                f"cannot run `evaluator.settings.python` {python!r}: {exc.strerror}"
            ) from None
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise EvaluationError(
            f"the quantization step ({step.scheme} {step.algorithm}) failed with exit code "
            f"{proc.returncode}: " + " | ".join(tail)
        )
    energy: EnergyResult = meter.result
    if energy.method == "cpu-time-estimate":
        # The job ran in a child process, which the meter's own CPU time misses: estimate
        # from the child's CPU time instead.
        cpu = children_cpu_seconds() - children_before
        watts = float(settings["watts_per_core"])
        energy = EnergyResult(
            cpu * watts,
            energy.seconds,
            energy.method,
            False,
            {"cpu_seconds": cpu, "watts_per_core": watts, "process": "quantize_job"},
        )
    return {
        "step": "quantize",
        **step.to_json(),
        "seconds": round(time.perf_counter() - started, 3),
        "energy": energy.to_dict(),
    }


def build_weights_in_worker(payload: dict[str, Any]) -> EvaluationResult:
    """Worker side: load the base model, prune and recover it as the recipe says (the
    shared weight compression of ``fitness/model``), save it as a standard Hugging Face
    checkpoint."""
    import torch

    from evo_compress.fitness.model import plain
    from evo_compress.fitness.model.load import load_and_compress

    settings = payload["settings"]
    torch.set_num_threads(int(settings["threads"]))
    torch.manual_seed(int(settings["seed"]))
    started = time.perf_counter()
    tokenizer, compressed = load_and_compress(payload, payload["recipe"])
    output = Path(payload["output"])
    model_out: Any = compressed.model
    model_out.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    return EvaluationResult(
        "ok",
        None,
        None,
        plain(
            {
                "energy": compressed.compression_energy.to_dict(),
                "details": compressed.details,
                "seconds": round(time.perf_counter() - started, 3),
            }
        ),
    )
