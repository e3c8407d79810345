"""Where a recipe's weight genes are applied to a model: prune, recover, quantize.

Order matters and is fixed: pruning first (Wanda and AWQ read activations of the model as
it will be served), then LoRA or distillation recovery on the full-precision pruned model
(masks re-applied after the merge), then quantization; QLoRA, by definition, trains its
adapters on the already-quantized nf4 base. The energy of all of it is measured (or, on
CPUs without power counters, estimated) as the recipe's one-time compression cost.
Serving settings (attention, KV cache) are each back end's own business.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evo_compress.exceptions import EvaluationError
from evo_compress.fitness.energy import EnergyMeter, EnergyResult
from evo_compress.fitness.model.prune import apply_pruning, decoder_experts
from evo_compress.fitness.model.quantize import apply_quantization, tensor_bytes
from evo_compress.fitness.model.recover import (
    DEFAULT_STEPS,
    DEFAULT_TEMPERATURE,
    apply_recovery,
    precompute_teacher_logits,
)
from evo_compress.methods import METHODS


@dataclass
class CompressedModel:
    """The model with its weights compressed, and what it took to make it."""

    model: nn.Module
    compression_energy: EnergyResult
    details: dict[str, Any] = field(default_factory=dict)


def compress_weights(
    model: nn.Module,
    recipe: Mapping[str, Any],
    *,
    device: str,
    calibration: torch.Tensor | None,
    batches: Sequence[Mapping[str, torch.Tensor]],
    workdir: Path,
    recovery_lr: float = 1e-3,
    seed: int = 0,
    watts_per_core: float = 15.0,
    gradient_checkpointing: bool = True,
) -> CompressedModel:
    """Compress ``model`` as ``recipe`` says. ``model`` is consumed: use the returned one.
    Distillation's teacher is ``model`` itself before compression: its logits on the
    recovery batches are computed first, so a second model is never loaded."""
    details: dict[str, Any] = {}
    recovery = recipe.get("recovery.method", "none")
    quant = METHODS.find(recipe.get("quant.method"), "quantization")
    needs_data = recipe.get("prune.method") == "wanda" or (quant is not None and quant.calibration)
    if needs_data and calibration is None:
        raise EvaluationError(
            "this recipe needs calibration text (Wanda, AWQ, GPTQ or another calibrated "
            "quantization method) and the task gave none: set "
            "`evaluator.settings.calibration` (or its shorthand `calibration_file`)"
        )
    if recovery != "none" and not batches:
        raise EvaluationError(
            "recovery needs training text and the task gave none: set "
            "`evaluator.settings.calibration` (or its shorthand `calibration_file`)"
        )
    with EnergyMeter(device, watts_per_core=watts_per_core) as meter:
        teacher = None
        if recovery == "distill":
            steps = int(recipe.get("recovery.steps", DEFAULT_STEPS))
            temperature = float(recipe.get("recovery.temperature", DEFAULT_TEMPERATURE))
            teacher = precompute_teacher_logits(
                model, batches, min(steps, len(batches)), temperature=temperature
            )
        masks: dict[str, torch.Tensor] = {}
        if recipe.get("prune.method", "none") != "none":
            pruned = apply_pruning(model, recipe, calibration)
            masks = pruned.masks
            details["prune"] = {"sparsity": pruned.sparsity, **pruned.details}
        if recovery in ("lora", "distill"):
            recovered = apply_recovery(
                model,
                recipe,
                batches,
                masks=masks,
                teacher=teacher,
                lr=recovery_lr,
                seed=seed,
                gradient_checkpointing=gradient_checkpointing,
            )
            teacher = None
            model = recovered.model
            details["recovery"] = _recovery_details(recovered)
        experts_before = expert_bytes(model)
        quantized = apply_quantization(model, recipe, device, calibration, workdir)
        model = quantized.model
        details["quant"] = {**quantized.details, "weight_bytes": quantized.weight_bytes}
        if experts_before is not None:
            # Fused 3-D expert parameters are not nn.Linear: what quantization did to them
            # is measured from the stored tensors, not assumed.
            after = expert_bytes(model) or (0, 0)
            details["quant"]["experts"] = {
                "params": after[0],
                "bytes_before": experts_before[1],
                "bytes_after": after[1],
            }
        if recovery == "qlora":
            recovered = apply_recovery(
                model,
                recipe,
                batches,
                lr=recovery_lr,
                seed=seed,
                gradient_checkpointing=gradient_checkpointing,
            )
            model = recovered.model
            details["recovery"] = _recovery_details(recovered)
    model.eval()
    return CompressedModel(model, _with_subprocess(meter.result, details, watts_per_core), details)


def _with_subprocess(
    energy: EnergyResult, details: dict[str, Any], watts_per_core: float
) -> EnergyResult:
    """``energy`` with the CPU time of a quantization job run in a child process (gptq: the
    llm-compressor job) added to a CPU-time estimate, which counts this process alone. A
    power counter (RAPL, NVML) covers the whole CPU or GPU, the child included."""
    cpu = float(details.get("quant", {}).get("subprocess_cpu_seconds") or 0.0)
    if cpu <= 0 or energy.method != "cpu-time-estimate":
        return energy
    return EnergyResult(
        energy.joules + cpu * watts_per_core,
        energy.seconds,
        energy.method,
        energy.measured,
        {
            **energy.details,
            "subprocess_cpu_seconds": cpu,
            "scope": "estimate: this process's and its quantization job's CPU seconds x "
            "watts per busy core; not measured, idle and other processes not included",
        },
    )


def expert_bytes(model: nn.Module) -> tuple[int, int] | None:
    """(parameter count, stored bytes) of a mixture of experts' fused expert parameters, or
    None for a dense model."""
    experts = decoder_experts(model)
    if not experts:
        return None
    params: list[torch.Tensor] = [p for m in experts.values() for p in m.parameters()]
    return sum(p.numel() for p in params), tensor_bytes(params)


def _recovery_details(result: Any) -> dict[str, Any]:
    return {
        "steps": result.steps,
        "wall_seconds": result.wall_seconds,
        "cpu_seconds": result.cpu_seconds,
        "loss_first": result.loss_first,
        "loss_last": result.loss_last,
        **result.details,
    }
