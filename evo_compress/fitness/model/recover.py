"""Recovery training after compression, as a recipe's ``recovery.*`` genes say: LoRA merged
back (pruning masks re-applied), QLoRA adapters on an nf4 base, or KL distillation.

Training is seeded and self-contained: the global torch RNG is forked and restored, so a
recovery run neither depends on nor disturbs the caller's random state.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from evo_compress.exceptions import EvaluationError
from evo_compress.fitness.model.prune import (
    RecipeValueError,
    decoder_linears,
    is_quantized,
    measure_sparsity,
    model_device,
    reapply_masks,
    restore_4bit_layout,
)

__all__ = [
    "DEFAULT_LORA_RANK",
    "DEFAULT_STEPS",
    "DEFAULT_TEMPERATURE",
    "RECOVERY_METHODS",
    "TEACHER_TOP_K",
    "RecoveryResult",
    "TeacherLogits",
    "apply_recovery",
    "distillation_loss",
    "measure_sparsity",
    "precompute_teacher_logits",
    "reapply_masks",
]

RECOVERY_METHODS = ("none", "lora", "qlora", "distill")
# Defaults of the genes in the built-in `llm-compression` space.
DEFAULT_LORA_RANK = 16
DEFAULT_STEPS = 200
DEFAULT_TEMPERATURE = 2.0
# Global-norm gradient clipping: keeps a high recovery lr from blowing up a damaged model.
_MAX_GRAD_NORM = 1.0
_CURVE_POINTS = 20
# A vocabulary larger than this keeps only the teacher's top-k logits per position.
TEACHER_TOP_K = 64

Batch = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class RecoveryResult:
    """What ``apply_recovery`` did. ``model`` is the model to evaluate next (the same object
    for ``none``/``lora``/``distill``, a peft model for ``qlora``). ``loss_first`` and
    ``loss_last`` are the training losses of the first and last step, each measured before that
    step's update (NaN when nothing was trained). ``cpu_seconds`` is process CPU time, the
    basis of energy estimates on CPUs without power counters."""

    model: nn.Module
    steps: int
    wall_seconds: float
    cpu_seconds: float
    loss_first: float
    loss_last: float
    details: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- recipe genes


def _recovery_genes(recipe: Mapping[str, Any]) -> tuple[str, int, int, float]:
    method = recipe.get("recovery.method", "none")
    if method not in RECOVERY_METHODS:
        raise RecipeValueError(
            f"`recovery.method` must be one of {', '.join(RECOVERY_METHODS)}, got {method!r}"
        )
    rank = recipe.get("recovery.lora_rank", DEFAULT_LORA_RANK)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise RecipeValueError(f"`recovery.lora_rank` must be an integer >= 1, got {rank!r}")
    steps = recipe.get("recovery.steps", DEFAULT_STEPS)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise RecipeValueError(f"`recovery.steps` must be an integer >= 0, got {steps!r}")
    temperature = recipe.get("recovery.temperature", DEFAULT_TEMPERATURE)
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise RecipeValueError(f"`recovery.temperature` must be a number > 0, got {temperature!r}")
    return method, rank, steps, float(temperature)


# ---------------------------------------------------------------------------- losses


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    positions: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """``T^2 * KL(teacher || student)`` of the temperature-softened next-token distributions,
    averaged over the selected positions (``positions``: bool [B, S])."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ"
        )
    student = F.log_softmax(student_logits[positions].float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits[positions].float() / temperature, dim=-1)
    if student.shape[0] == 0:
        raise ValueError("no positions selected for the distillation loss")
    kl = F.kl_div(student, teacher, reduction="batchmean", log_target=True)
    return kl * (temperature * temperature)


def topk_distillation_loss(
    student_logits: torch.Tensor,
    log_probs: torch.Tensor,
    indices: torch.Tensor,
    positions: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """``distillation_loss`` against a teacher kept as its top-k log-probabilities at
    ``temperature`` per position (``log_probs``, ``indices``: [B, S, k]): the KL over k + 1
    outcomes, the k tokens and "any other token" (the tail's mass), so the student is not
    pushed to put all its mass on the k."""
    student = F.log_softmax(student_logits[positions].float() / temperature, dim=-1)
    if student.shape[0] == 0:
        raise ValueError("no positions selected for the distillation loss")
    teacher = log_probs[positions].float()
    picked = student.gather(-1, indices[positions].long())

    def with_tail(top: torch.Tensor) -> torch.Tensor:
        tail = torch.log((1.0 - top.exp().sum(-1, keepdim=True)).clamp_min(1e-12))
        return torch.cat([top, tail], dim=-1)

    teacher, picked = with_tail(teacher), with_tail(picked)
    kl = (teacher.exp() * (teacher - picked)).sum(-1).mean()
    return kl * (temperature * temperature)


@dataclass(frozen=True)
class TeacherLogits:
    """The uncompressed model's outputs on the recovery batches, computed before pruning and
    quantization: distillation then never holds a second model. ``values[i]`` are batch i's
    logits, or, when ``indices`` is not None, its top-k log-probabilities at ``temperature``
    with their token indices."""

    values: list[torch.Tensor]
    indices: list[torch.Tensor] | None
    temperature: float = DEFAULT_TEMPERATURE

    @property
    def nbytes(self) -> int:
        tensors = self.values + (self.indices or [])
        return sum(t.numel() * t.element_size() for t in tensors)


def precompute_teacher_logits(
    model: nn.Module,
    batches: Sequence[Batch],
    count: int,
    top_k: int = TEACHER_TOP_K,
    temperature: float = DEFAULT_TEMPERATURE,
) -> TeacherLogits:
    """``model``'s outputs (in its dtype) on the first ``count`` of ``batches``: all its
    logits when the vocabulary has at most ``top_k`` entries, else the top ``top_k``
    log-probabilities at ``temperature`` and their indices."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    values: list[torch.Tensor] = []
    indices: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for batch in batches[:count]:
                inputs = _to_device(batch, device)
                inputs.pop("labels", None)
                logits = model(**inputs, use_cache=False).logits
                if logits.shape[-1] > top_k:
                    log_probs = F.log_softmax(logits.float() / temperature, dim=-1)
                    top = log_probs.topk(top_k, dim=-1)
                    values.append(top.values.to(logits.dtype))
                    indices.append(top.indices.to(torch.int32))
                else:
                    values.append(logits)
    finally:
        model.train(was_training)
    return TeacherLogits(values, indices if indices else None, temperature)


def _loss_positions(batch: Batch, logits_shape: torch.Size) -> torch.Tensor:
    """Positions whose logits predict a labelled token (labels are shifted inside the model),
    or every non-padding position when the batch has no labels."""
    labels = batch.get("labels")
    if labels is not None:
        positions = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
        positions[:, :-1] = labels[:, 1:] != -100
        return positions
    mask = batch.get("attention_mask")
    if mask is not None:
        return mask.bool()
    return torch.ones(logits_shape[:2], dtype=torch.bool)


def _to_device(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    if "input_ids" not in batch:
        raise ValueError(f"a recovery batch needs `input_ids`, got keys {sorted(batch)}")
    keys = ("input_ids", "attention_mask", "labels")
    return {key: batch[key].to(device) for key in keys if batch.get(key) is not None}


# ---------------------------------------------------------------------------- training loop


def _hf_model(model: nn.Module) -> Any:
    """The transformers model inside a peft wrapper (or the model itself)."""
    base: Any = model
    while not hasattr(base, "supports_gradient_checkpointing") and hasattr(base, "model"):
        base = base.model
    return base


def _checkpointing(model: nn.Module, enabled: bool) -> bool:
    """Turn transformers' gradient (activation) checkpointing on, where the model supports
    it: activations are recomputed in the backward pass, one decoder layer's at a time. True
    if it did."""
    base = _hf_model(model)
    if not enabled or not getattr(base, "supports_gradient_checkpointing", False):
        return False
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # the name from transformers 5.x on
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return True


def _checkpointing_off(model: nn.Module) -> None:
    base = _hf_model(model)
    if hasattr(base, "activation_checkpointing_disable"):
        base.activation_checkpointing_disable()
    else:
        base.gradient_checkpointing_disable()


def _train(
    model: nn.Module,
    params: list[torch.Tensor],
    loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    batches: Sequence[Batch],
    steps: int,
    lr: float,
    after_step: Callable[[], None] | None = None,
    checkpointing: bool = False,
) -> list[float]:
    """AdamW (no weight decay) with global-norm clipping for ``steps`` steps, cycling over
    ``batches``; returns the loss of every step (before its update). With ``checkpointing``,
    gradient checkpointing is on while training (where the model supports it)."""
    if not params:
        raise ValueError("recovery found no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    device = model_device(model)
    losses: list[float] = []
    checkpointed = _checkpointing(model, checkpointing)
    model.train()
    try:
        for step in range(steps):
            batch = _to_device(batches[step % len(batches)], device)
            loss = loss_fn(batch)
            value = float(loss.detach().item())
            if not math.isfinite(value):
                raise EvaluationError(f"recovery loss is {value} at step {step}")
            losses.append(value)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, _MAX_GRAD_NORM)
            optimizer.step()
            if after_step is not None:
                after_step()
    finally:
        optimizer.zero_grad(set_to_none=True)
        if checkpointed:
            _checkpointing_off(model)
        model.eval()
    return losses


def _lm_loss(model: nn.Module) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "labels" not in batch:
            raise ValueError("lora / qlora recovery batches need `labels`")
        loss: torch.Tensor = model(**batch, use_cache=False).loss
        return loss

    return loss_fn


def _eval_loss(model: nn.Module, batch: Batch) -> float:
    with torch.no_grad():
        inputs = _to_device(batch, model_device(model))
        return float(model(**inputs, use_cache=False).loss.item())


def _with_lora(model: nn.Module, rank: int) -> nn.Module:
    """Wrap ``model`` in peft LoRA adapters on every decoder linear layer (exact module names,
    so ``lm_head`` and any vision tower stay untouched)."""
    from peft import LoraConfig, get_peft_model

    targets = sorted(decoder_linears(model))
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=targets,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model: nn.Module = get_peft_model(model, config)
    return peft_model


def _trainable(model: nn.Module) -> list[torch.Tensor]:
    return [param for param in model.parameters() if param.requires_grad]


def _curve(losses: list[float]) -> list[list[float]]:
    if not losses:
        return []
    stride = max(1, math.ceil(len(losses) / _CURVE_POINTS))
    points = [[step + 1, loss] for step, loss in enumerate(losses) if step % stride == 0]
    if points[-1][0] != len(losses):
        points.append([len(losses), losses[-1]])
    return [[float(step), round(loss, 6)] for step, loss in points]


def _recover_lora(
    model: nn.Module,
    rank: int,
    steps: int,
    batches: Sequence[Batch],
    masks: Mapping[str, torch.Tensor] | None,
    lr: float,
    checkpointing: bool,
) -> tuple[nn.Module, list[float], dict[str, Any]]:
    quantized = [name for name, lin in decoder_linears(model).items() if is_quantized(lin)]
    if quantized:
        raise ValueError(
            "lora merges adapters into full-precision weights but the model is 4-bit quantized "
            f"(`{quantized[0]}`); run lora before quantization, or use qlora"
        )
    previous = {id(param): param.requires_grad for param in model.parameters()}
    peft_model = _with_lora(model, rank)
    params = _trainable(peft_model)
    losses = _train(
        peft_model, params, _lm_loss(peft_model), batches, steps, lr, checkpointing=checkpointing
    )
    merged: nn.Module = peft_model.merge_and_unload()  # type: ignore[operator]
    for param in merged.parameters():  # peft froze the base; the merged model is plain again
        param.requires_grad_(previous.get(id(param), True))
    # A merge adds the dense B @ A to every weight: the pruned zeros come back unless re-masked.
    reapply_masks(merged, masks or {})
    details: dict[str, Any] = {
        "lora_rank": rank,
        "lora_alpha": 2 * rank,
        "target_modules": len(decoder_linears(merged)),
        "trainable_params": sum(p.numel() for p in params),
        "merged": True,
        "masks_reapplied": len(masks or {}),
    }
    if losses:
        # Re-masking drops the adapters' update to the pruned weights; this shows what it cost.
        details["loss_after_merge"] = _eval_loss(merged, batches[0])
    return merged, losses, details


def _recover_qlora(
    model: nn.Module,
    rank: int,
    steps: int,
    batches: Sequence[Batch],
    lr: float,
    checkpointing: bool,
) -> tuple[nn.Module, list[float], dict[str, Any]]:
    linears = decoder_linears(model)
    quantized = [name for name, lin in linears.items() if is_quantized(lin)]
    if not quantized:
        raise ValueError(
            "qlora trains adapters on a 4-bit base, but no decoder linear layer is a "
            "bitsandbytes Linear4bit; quantize the model to nf4 first"
        )
    from peft import prepare_model_for_kbit_training

    # Freezes the base and upcasts its non-quantized fp16/bf16 params to fp32; gradient
    # checkpointing is turned on (or not) by `_train`, like for the other methods.
    repacked = restore_4bit_layout(model)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_model = _with_lora(model, rank)
    params = _trainable(peft_model)
    losses = _train(
        peft_model, params, _lm_loss(peft_model), batches, steps, lr, checkpointing=checkpointing
    )
    details = {
        "lora_rank": rank,
        "lora_alpha": 2 * rank,
        "target_modules": len(linears),
        "quantized_modules": len(quantized),
        "cpu_packed_weights_restored": repacked,
        "trainable_params": sum(p.numel() for p in params),
        # Merging into nf4 would re-quantize (lossy); the dense adapters also mean the
        # effective weights are no longer sparse, although the nf4 base keeps its zeros.
        "merged": False,
    }
    return peft_model, losses, details


def _recover_distill(
    model: nn.Module,
    teacher: nn.Module | TeacherLogits | None,
    temperature: float,
    steps: int,
    batches: Sequence[Batch],
    masks: Mapping[str, torch.Tensor] | None,
    lr: float,
    checkpointing: bool,
) -> tuple[nn.Module, list[float], dict[str, Any]]:
    if teacher is None:
        raise ValueError("recovery.method `distill` needs a teacher (the uncompressed model)")
    linears = decoder_linears(model)
    quantized = [name for name, lin in linears.items() if is_quantized(lin)]
    if quantized:
        raise ValueError(
            "distill trains full-precision decoder weights but the model is 4-bit quantized "
            f"(`{quantized[0]}`); run distillation before quantization"
        )
    if (
        isinstance(teacher, TeacherLogits)
        and teacher.indices is not None
        and teacher.temperature != temperature
    ):
        raise ValueError(
            f"the teacher's top-k log-probabilities are at temperature {teacher.temperature}, "
            f"training is at {temperature}"
        )
    if isinstance(teacher, TeacherLogits) and len(teacher.values) < min(steps, len(batches)):
        raise ValueError(
            f"the teacher's logits cover {len(teacher.values)} batches, training needs "
            f"{min(steps, len(batches))}"
        )
    module = teacher if isinstance(teacher, nn.Module) else None
    teacher_was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    previous = {id(param): param.requires_grad for param in model.parameters()}
    for param in model.parameters():
        param.requires_grad_(False)
    params: list[torch.Tensor] = [linear.weight for linear in linears.values()]
    for weight in params:
        weight.requires_grad_(True)
    # `_train` calls the loss once per step, in order, on batches[step % len(batches)].
    step_of_call = itertools.count()

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        index = next(step_of_call) % len(batches)
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask") if key in batch}
        student_logits = model(**inputs, use_cache=False).logits
        positions = _loss_positions(batch, student_logits.shape).to(student_logits.device)
        if isinstance(teacher, TeacherLogits):
            values = teacher.values[index].to(student_logits.device)
            if teacher.indices is not None:
                indices = teacher.indices[index].to(student_logits.device)
                return topk_distillation_loss(
                    student_logits, values, indices, positions, temperature
                )
            return distillation_loss(student_logits, values, positions, temperature)
        assert module is not None
        with torch.no_grad():
            device = model_device(module)
            teacher_inputs = {key: value.to(device) for key, value in inputs.items()}
            teacher_logits = module(**teacher_inputs, use_cache=False).logits
        teacher_logits = teacher_logits.to(student_logits.device)
        return distillation_loss(student_logits, teacher_logits, positions, temperature)

    def after_step() -> None:
        reapply_masks(model, masks or {})

    try:
        losses = _train(
            model, params, loss_fn, batches, steps, lr, after_step, checkpointing=checkpointing
        )
    finally:
        for param in model.parameters():
            param.requires_grad_(previous[id(param)])
        if module is not None:
            module.train(teacher_was_training)
    details: dict[str, Any] = {
        "temperature": temperature,
        "trained": "decoder_linear_weights",
        "trainable_params": sum(p.numel() for p in params),
        "masks_reapplied": len(masks or {}),
    }
    if isinstance(teacher, TeacherLogits):
        details["teacher"] = {
            "kind": "logits precomputed before compression",
            "top_k": None if teacher.indices is None else int(teacher.indices[0].shape[-1]),
            "batches": len(teacher.values),
            "bytes": teacher.nbytes,
        }
    else:
        details["teacher"] = {"kind": "model"}
    return model, losses, details


# ---------------------------------------------------------------------------- entry point


def apply_recovery(
    model: nn.Module,
    recipe: Mapping[str, Any],
    batches: Sequence[Mapping[str, torch.Tensor]],
    masks: Mapping[str, torch.Tensor] | None = None,
    teacher: nn.Module | TeacherLogits | None = None,
    lr: float = 1e-3,
    seed: int = 0,
    gradient_checkpointing: bool = False,
) -> RecoveryResult:
    """Train the compressed ``model`` for ``recovery.steps`` AdamW steps, cycling over
    ``batches`` (``input_ids``, ``attention_mask``, ``labels`` with -100 on ignored positions).

    - ``none``: returns the model untouched.
    - ``lora``: peft LoRA (rank ``recovery.lora_rank``, alpha 2r, no dropout) on every decoder
      linear layer, trained on the LM loss, merged, then ``masks`` re-applied so the pruned
      weights are zero again; returns the plain model.
    - ``qlora``: the same adapters on a model whose decoder linears are bitsandbytes
      ``Linear4bit`` (nf4), left unmerged; returns the peft model.
    - ``distill``: trains the decoder linear weights themselves (everything else frozen) on
      ``T^2 * KL(teacher || student)`` at ``recovery.temperature`` over the positions that
      predict a labelled token, re-applying ``masks`` after every step. ``teacher`` is the
      uncompressed model (run in eval mode without gradients), or better its logits on the
      batches from ``precompute_teacher_logits``, so that no second model is held.

    With ``gradient_checkpointing``, activations are recomputed in the backward pass where
    the model supports it (less memory, about one more forward pass of compute per step).

    Deterministic for a given ``seed`` (LoRA initialisation included) on a given device.
    """
    method, rank, steps, temperature = _recovery_genes(recipe)
    if method != "none" and steps > 0 and len(batches) == 0:
        raise ValueError(f"recovery.method `{method}` needs at least one training batch")
    wall_start = time.perf_counter()
    cpu_start = time.process_time()
    losses: list[float] = []
    extra: dict[str, Any] = {}
    result_model = model
    with torch.random.fork_rng(devices=_cuda_devices(model)):
        torch.manual_seed(seed)
        if method == "lora":
            result_model, losses, extra = _recover_lora(
                model, rank, steps, batches, masks, lr, gradient_checkpointing
            )
        elif method == "qlora":
            result_model, losses, extra = _recover_qlora(
                model, rank, steps, batches, lr, gradient_checkpointing
            )
        elif method == "distill":
            result_model, losses, extra = _recover_distill(
                model, teacher, temperature, steps, batches, masks, lr, gradient_checkpointing
            )
    wall = time.perf_counter() - wall_start
    cpu = time.process_time() - cpu_start
    details: dict[str, Any] = {
        "method": method,
        "steps": len(losses),
        "lr": lr,
        "seed": seed,
        "optimizer": "AdamW(weight_decay=0)",
        "max_grad_norm": _MAX_GRAD_NORM if method != "none" else None,
        "loss_curve": _curve(losses),
        "gradient_checkpointing": gradient_checkpointing and method != "none",
        **extra,
    }
    if method in ("lora", "distill"):
        details["decoder_zero_fraction"] = measure_sparsity(result_model)
    return RecoveryResult(
        model=result_model,
        steps=len(losses),
        wall_seconds=wall,
        cpu_seconds=cpu,
        loss_first=losses[0] if losses else math.nan,
        loss_last=losses[-1] if losses else math.nan,
        details=details,
    )


def _cuda_devices(model: nn.Module) -> list[int]:
    """CUDA devices whose RNG a recovery run may draw from (forked and restored with the CPU's)."""
    device = model_device(model)
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []
