"""Where a recipe is applied on the transformers back end: the weight genes by the shared
compression (``fitness/model/compress.py``: prune, recover, quantize), then the serving
genes (attention kernel, KV cache) on the transformers model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from evo_compress.exceptions import EvaluationError
from evo_compress.fitness.energy import EnergyResult
from evo_compress.fitness.hf.measure import apply_kv, set_attention
from evo_compress.fitness.model.compress import CompressedModel


@dataclass
class AppliedRecipe:
    """The compressed model, ready to serve, and what it took to make it."""

    model: nn.Module
    generate_kwargs: dict[str, Any]
    compression_energy: EnergyResult
    details: dict[str, Any] = field(default_factory=dict)


def apply_serving(
    compressed: CompressedModel, recipe: Mapping[str, Any], device: str
) -> AppliedRecipe:
    """The recipe's attention backend and KV-cache settings on the compressed model."""
    model = compressed.model
    reason = set_attention(model, recipe.get("serve.attention_backend", "auto"), device)
    if reason is not None:
        raise EvaluationError(reason)
    generate_kwargs = apply_kv(model, recipe, device)
    details = {
        **compressed.details,
        "serving": {
            "attention_backend": recipe.get("serve.attention_backend", "auto"),
            "kv": {k: v for k, v in recipe.items() if k.startswith("kv.")},
        },
    }
    return AppliedRecipe(model, generate_kwargs, compressed.compression_energy, details)


__all__ = ["AppliedRecipe", "apply_serving"]
