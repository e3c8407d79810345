"""Saving a compressed model as a checkpoint that ``AutoModelForCausalLM.from_pretrained``
loads back as the same model: the weights an evaluation measured, rebuilt through the same
``load_and_compress`` and saved with their quantization config.

What each method saves as (transformers 5, torchao 0.18, bitsandbytes 0.50):
- torchao methods (``int8_weight_only``, ``int8_w8a8``, ``fp8``, ``rtn``, ``awq``, ``gptq``):
  the quantized tensors in safetensors with a ``TorchAoConfig`` naming the storage config
  (``quantize.torchao_storage_config``); GPTQ and AWQ values are stored as torchao int4, so
  the config names the int4 format and the model card names the algorithm.
- ``nf4`` and ``int8_bnb``: bitsandbytes' serialization (packed 4-bit weights and their
  quantization state; int8 weights and their per-row scales) with the ``BitsAndBytesConfig``
  they were loaded with.
- pruning and LoRA / distillation recovery: plain weights (LoRA merged, masks re-applied).
- QLoRA: refused (its adapters stay unmerged on the nf4 base, see ``unsaveable_reason``).

Every save is checked by loading the folder again: every parameter must come back with the
same class, dtype and shape, and the logits on task texts must match, else it is refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evo_compress.exceptions import EvaluationError
from evo_compress.fitness.model.load import load_and_compress, load_model
from evo_compress.fitness.model.quantize import DEFAULT_GROUP_SIZE, torchao_storage_config

# Logits of the reloaded model may differ from the saved one's by this much, relative to
# their largest magnitude: the same tensors run through the same kernels, so in practice 0.
LOGIT_TOLERANCE = 1e-4
_CHECK_TEXTS = 8


class WeightsNotSaveableError(EvaluationError):
    """A recipe's compressed model cannot be saved as a checkpoint that loads as itself."""


def unsaveable_reason(recipe: Mapping[str, Any]) -> str | None:
    """Why the compressed model of ``recipe`` cannot be saved loadably (None if it can),
    decided from the recipe alone, before anything is loaded."""
    if recipe.get("recovery.method") == "qlora":
        return (
            "`recovery.method=qlora` cannot be saved as one checkpoint: its LoRA adapters stay "
            "unmerged on the nf4 base (merging them into 4-bit weights would re-quantize them "
            "and change the model that was measured), and transformers saves a peft model as "
            "the adapters alone"
        )
    return None


def save_compressed(
    payload: dict[str, Any],
    recipe: Mapping[str, Any],
    out: Path,
    message: Callable[[str], None] = lambda _text: None,
) -> dict[str, Any]:
    """Rebuild the compressed model of ``recipe`` from the worker ``payload`` (as an
    evaluation does: same seed, threads, calibration and training texts), save it and its
    tokenizer to the folder ``out`` and check that it loads back as the same model.
    Returns what was done (the compression details, the quantization config saved, the
    check), as plain data. Raises ``WeightsNotSaveableError`` for a recipe whose model
    cannot be saved loadably."""
    method = str(recipe.get("quant.method", "none"))
    reason = unsaveable_reason(recipe)
    if reason is not None:
        raise WeightsNotSaveableError(reason)
    settings = payload["settings"]
    device = str(payload["device"])
    # What `evaluate_in_worker` sets before it applies a recipe: the same numbers come out.
    torch.set_num_threads(int(settings["threads"]))
    torch.manual_seed(int(settings["seed"]))
    message(f"loading {payload['model_path']} and applying the recipe on {device}")
    tokenizer, compressed = load_and_compress(payload, dict(recipe))
    model: Any = compressed.model  # a transformers model
    declared = _declare_quantization(model, recipe, device)
    message(f"saving the compressed model to {out}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    message("loading the saved folder again to check it")
    check = _check_reload(model, tokenizer, out, payload, method)
    return {
        "details": compressed.details,
        "compression_energy": compressed.compression_energy.to_dict(),
        "quantization_config": declared,
        "check": check,
    }


def _declare_quantization(
    model: Any, recipe: Mapping[str, Any], device: str
) -> dict[str, Any] | None:
    """Give a torchao-quantized model the ``TorchAoConfig`` and quantizer that
    ``from_pretrained`` would have given it, so that ``save_pretrained`` serializes its
    tensors and writes the config a reload needs. A bitsandbytes model (nf4, int8_bnb) was
    loaded through ``from_pretrained`` and has both already."""
    method = str(recipe.get("quant.method", "none"))
    group_size = int(recipe.get("quant.group_size", DEFAULT_GROUP_SIZE))
    existing = getattr(model.config, "quantization_config", None)
    config = torchao_storage_config(method, group_size, device, _dtype(model))
    if config is None:  # plain weights, or bitsandbytes' own config (as JSON: it has enums)
        return json.loads(existing.to_json_string()) if existing is not None else None
    from transformers import TorchAoConfig
    from transformers.quantizers.auto import AutoHfQuantizer

    declared = TorchAoConfig(quant_type=config)
    model.config.quantization_config = declared
    # `save_pretrained` serializes quantized tensors only through the model's quantizer.
    model.hf_quantizer = AutoHfQuantizer.from_config(declared, pre_quantized=True)
    return {"quant_method": "torchao", "quant_type": type(config).__name__, "repr": repr(config)}


def _dtype(model: nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _signature(model: nn.Module) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    return {
        name: (type(p).__name__, str(p.dtype), tuple(p.shape))
        for name, p in model.named_parameters()
    }


@torch.no_grad()
def _check_reload(
    model: nn.Module, tokenizer: Any, out: Path, payload: dict[str, Any], method: str
) -> dict[str, Any]:
    """Load ``out`` as the transformers back end does and compare it with ``model``: the same
    parameters (class, dtype, shape) and the same logits on a few task texts."""
    device = str(payload["device"])
    try:
        reloaded = load_model(str(out), payload["dtype"], device)
    except Exception as exc:
        raise WeightsNotSaveableError(
            f"`quant.method={method}`: the saved checkpoint does not load back "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    saved, loaded = _signature(model), _signature(reloaded)
    if saved != loaded:
        name = next(
            (n for n in sorted(set(saved) | set(loaded)) if saved.get(n) != loaded.get(n)), "?"
        )
        raise WeightsNotSaveableError(
            f"`quant.method={method}`: the saved checkpoint loads as a different model "
            f"(`{name}` was {saved.get(name)}, loads as {loaded.get(name)})"
        )
    texts = list(payload["task"].get("prompts") or payload["task"].get("train_texts") or [])
    texts = texts[:_CHECK_TEXTS] or [tokenizer.eos_token or "0"]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(texts, return_tensors="pt", padding=True).to(device)
    model.eval()
    expected = model(**batch).logits.float()
    got = reloaded(**batch).logits.float()
    mask = batch["attention_mask"].bool()
    scale = float(expected[mask].abs().max().clamp(min=1e-6))
    diff = float((expected - got)[mask].abs().max())
    if not diff <= LOGIT_TOLERANCE * scale:
        raise WeightsNotSaveableError(
            f"`quant.method={method}`: the saved checkpoint loads with different outputs "
            f"(largest logit difference {diff:.3g}, logits up to {scale:.3g})"
        )
    return {
        "parameters": len(saved),
        "texts": len(texts),
        "max_logit_difference": diff,
        "max_logit": scale,
    }


__all__ = [
    "LOGIT_TOLERANCE",
    "WeightsNotSaveableError",
    "save_compressed",
    "unsaveable_reason",
]
