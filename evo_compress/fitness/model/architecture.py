"""What each model architecture can take, decided from its config before any weight is loaded.

One place for the rules: the module layout per ``model_type`` (separate or fused attention and
MLP projections, fused mixture-of-experts parameters), the widths the quantized and pruned
layers will have after a recipe's pruning, and ``unsupported_reason(config, recipe)``, which
the transformers back end's ``infeasible_reason`` and ``restrict_space`` ask. A recipe refused
here is ``infeasible`` with the reason; it is never a failure after the model was loaded.

What a mixture of experts (fused 3-D expert parameters, transformers 5) takes:
- pruning: magnitude / Wanda (unstructured and N:M) prune each expert's matrices, Wanda over
  the tokens routed to it; ``structured_mlp`` removes the same number of intermediate channels
  from every expert; ``structured_heads`` prunes the attention as in a dense model;
- quantization: the attention projections only. The experts stay in the model's dtype (the
  torchao and bitsandbytes paths quantize ``nn.Linear`` layers); the evaluation's details
  record the experts' stored bytes before and after, so this is visible. Tried with torchao
  0.18's ``FqnToConfig`` on the expert parameters: int8 stores them, but Mixtral's experts
  forward then fails (``aten.transpose`` is not implemented for ``Int8Tensor``), and
  ``IntxWeightOnlyConfig`` (int4) takes only 2-D and 4-D tensors;
- the router (``mlp.gate``) is never pruned or quantized: it is tiny and decides routing;
- LoRA / QLoRA / distillation train the attention projections; the experts stay frozen.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "LAYOUTS",
    "SLIDING_WINDOW_MODEL_TYPES",
    "Layout",
    "allowed_values",
    "layout_of",
    "pruned_shape",
    "read_config",
    "unsupported_reason",
]

# Model types whose transformers implementation applies `config.sliding_window` to every layer
# (the mask and the cache), checked on transformers 5.24. Llama's does not; Gemma's applies it
# to its sliding layers only, between full-attention ones.
SLIDING_WINDOW_MODEL_TYPES = frozenset({"mistral", "mixtral"})

DEFAULT_GROUP_SIZE = 128  # the `quant.group_size` gene's default


@dataclass(frozen=True)
class Layout:
    """The module layout of one architecture's decoder block.

    ``attention``: ``separate`` (``q_proj``, ``k_proj``, ``v_proj``) or ``fused_qkv``.
    ``mlp``: ``gated`` (``gate_proj``, ``up_proj``, ``down_proj``), ``fused_gate_up``, or
    ``moe_experts`` (fused 3-D expert parameters behind a router). ``awq``: why the
    hand-written AWQ cannot fold its scales into this layout (None when it can).
    """

    attention: Literal["separate", "fused_qkv"]
    mlp: Literal["gated", "fused_gate_up", "moe_experts"]
    awq: str | None = None


_FUSED = "fused qkv_proj / gate_up_proj projections that its scales cannot be split over"
LAYOUTS: dict[str, Layout] = {
    "llama": Layout("separate", "gated"),
    "mistral": Layout("separate", "gated"),
    "qwen2": Layout("separate", "gated"),
    "qwen3": Layout("separate", "gated"),
    # Gemma's RMSNorm multiplies by (1 + weight): a 1/s scale does not fold into `weight`.
    "gemma2": Layout("separate", "gated", awq="RMSNorm weights applied as (1 + w), not foldable"),
    "gemma3_text": Layout(
        "separate", "gated", awq="RMSNorm weights applied as (1 + w), not foldable"
    ),
    "phi3": Layout("fused_qkv", "fused_gate_up", awq=_FUSED),
    "mixtral": Layout(
        "separate", "moe_experts", awq="fused 3-D expert parameters instead of mlp.*_proj"
    ),
}


def read_config(model_path: str | Path) -> Any:
    """The transformers config of a model folder (``config.json`` only, no weights)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_path))


def layout_of(config: Any) -> Layout | None:
    """The layout of ``config``'s architecture, or None for one this back end does not know."""
    return LAYOUTS.get(str(getattr(config, "model_type", "")))


# ------------------------------------------------------------------------------- shapes


def _head_dim(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim or config.hidden_size // config.num_attention_heads)


def pruned_shape(config: Any, recipe: Mapping[str, Any]) -> dict[str, int]:
    """``hidden``, ``intermediate``, ``heads``, ``kv_heads`` and ``head_dim`` after the
    recipe's structured pruning, computed as ``fitness.model.prune`` will prune."""
    from evo_compress.fitness.model.prune import (
        DEFAULT_SPARSITY,
        MLP_CHANNEL_MULTIPLE,
        kv_groups_kept,
        mlp_channels_kept,
    )

    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    shape = {
        "hidden": int(config.hidden_size),
        "intermediate": int(config.intermediate_size),
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": _head_dim(config),
    }
    method = recipe.get("prune.method", "none")
    sparsity = float(recipe.get("prune.sparsity", DEFAULT_SPARSITY))
    if method == "structured_mlp":
        multiple = int(recipe.get("quant.group_size", MLP_CHANNEL_MULTIPLE))
        shape["intermediate"] = mlp_channels_kept(shape["intermediate"], sparsity, multiple)
    elif method == "structured_heads":
        keep = kv_groups_kept(config, sparsity)
        shape["heads"] = keep * (heads // kv_heads)
        shape["kv_heads"] = keep
    return shape


def _widths(layout: Layout, shape: Mapping[str, int]) -> tuple[set[int], set[int]]:
    """Input widths of (the quantized ``nn.Linear`` layers, the pruned weight matrices)."""
    attention = {shape["hidden"], shape["heads"] * shape["head_dim"]}
    mlp = {shape["hidden"], shape["intermediate"]}
    if layout.mlp == "moe_experts":
        return attention, attention | mlp  # experts are pruned, not quantized
    return attention | mlp, attention | mlp


# ------------------------------------------------------------------------------- rules


def unsupported_reason(config: Any, recipe: Mapping[str, Any]) -> str | None:
    """Why the transformers back end cannot apply ``recipe`` to a model of ``config`` (None
    if it can), from the config alone."""
    from evo_compress.methods import METHODS

    model_type = str(getattr(config, "model_type", "unknown"))
    layout = layout_of(config)
    known = ", ".join(sorted(LAYOUTS))
    prune = recipe.get("prune.method", "none")
    if prune in ("structured_mlp", "structured_heads"):
        if layout is None:
            return f"{prune} needs a known decoder layout; {model_type!r} is not one of {known}"
        if prune == "structured_heads":
            heads = int(config.num_attention_heads)
            kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
            if kv_heads < 2:
                return (
                    f"structured_heads removes whole KV groups and must keep one; this "
                    f"{model_type} model has {kv_heads} KV head"
                )
            if heads % kv_heads:
                return f"{heads} attention heads are not a multiple of {kv_heads} KV heads"
    shape = pruned_shape(config, recipe)
    quantized, pruned = _widths(layout or Layout("separate", "gated"), shape)
    pattern = recipe.get("prune.pattern", "unstructured")
    if prune in ("magnitude", "wanda") and pattern in ("2:4", "4:8"):
        m = int(pattern.split(":")[1])
        bad = sorted(w for w in pruned if w % m)
        if bad:
            return f"{pattern} pruning needs input widths divisible by {m}; this model has {bad}"
    method = recipe.get("quant.method", "none")
    entry = METHODS.find(method, "quantization")
    if method == "awq":
        if layout is None:
            return f"awq needs a Llama-style decoder layout; {model_type!r} is not one of {known}"
        if layout.awq is not None:
            return f"awq (hand-written) cannot take {model_type}: {layout.awq}"
    if entry is not None and entry.grouped:
        group = int(recipe.get("quant.group_size", DEFAULT_GROUP_SIZE))
        bad = sorted(w for w in quantized if w % group)
        if bad:
            after = " after pruning" if prune in ("structured_mlp", "structured_heads") else ""
            return (
                f"{method} with group size {group} needs every quantized layer's input width "
                f"to be a multiple of it; this {model_type} model has widths {bad}{after}"
            )
    if recipe.get("kv.sliding_window", False) and model_type not in SLIDING_WINDOW_MODEL_TYPES:
        return (
            f"transformers' {model_type} model has no sliding-window attention on the "
            f"transformers back end (only {', '.join(sorted(SLIDING_WINDOW_MODEL_TYPES))} "
            "models have it)"
        )
    if recipe.get("kv.dtype", "auto") == "fp8":
        if recipe.get("kv.sliding_window", False):
            return "transformers' quantized (fp8) KV cache supports only full-attention layers"
        layer_types = set(getattr(config, "layer_types", None) or ())
        if layer_types - {"full_attention"}:
            return (
                "transformers' quantized (fp8) KV cache supports only full-attention layers; "
                f"this {model_type} model has {sorted(layer_types - {'full_attention'})} layers"
            )
    return None


# Candidate values of the genes whose whole choices an architecture can rule out.
_GROUP_CANDIDATES = (8, 16, 32, 64, 128, 256, 512, 1024)


def allowed_values(config: Any) -> dict[str, list[Any]]:
    """For ``restrict_space``: the values of ``prune.method``, ``prune.pattern``,
    ``quant.method``, ``quant.group_size``, ``kv.dtype`` and ``kv.sliding_window`` that some
    recipe can take on a model of ``config`` (a value refused in every recipe is left out)."""
    from evo_compress.fitness.model.prune import PATTERNS, PRUNE_METHODS
    from evo_compress.methods import METHODS

    def ok(recipe: Mapping[str, Any]) -> bool:
        return unsupported_reason(config, recipe) is None

    quant_methods = METHODS.names("quantization", backend="transformers")
    grouped = [m for m in quant_methods if METHODS.get(m, "quantization").grouped]
    sizes = sorted(
        {g for m in grouped for g in METHODS.get(m, "quantization").group_sizes}
        | set(_GROUP_CANDIDATES)
    )

    def method_ok(method: str, sizes: list[int]) -> bool:
        if method not in grouped:
            return ok({"quant.method": method})
        return any(ok({"quant.method": method, "quant.group_size": g}) for g in sizes)

    group_ok = [g for g in sizes if any(method_ok(m, [g]) for m in grouped)]
    return {
        "prune.method": [m for m in PRUNE_METHODS if ok({"prune.method": m, "prune.sparsity": 0})],
        "prune.pattern": [
            p for p in PATTERNS if ok({"prune.method": "magnitude", "prune.pattern": p})
        ],
        "quant.method": [m for m in quant_methods if method_ok(m, group_ok)],
        "quant.group_size": group_ok,
        "kv.dtype": [d for d in ("auto", "fp8") if ok({"kv.dtype": d})],
        "kv.sliding_window": [w for w in (False, True) if ok({"kv.sliding_window": w})],
    }
